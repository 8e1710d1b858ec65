"""--time-budget: the most expensive rung of the ladder predicted to fit, from the planner's model."""

import pytest

from bonsai_lite.errors import BonsaiError
from bonsai_lite.prune.presets import LADDER, estimate, fit_time_budget, parse_seconds
from bonsai_lite.search.planner import nominal_machine
from bonsai_lite.structure import load_spec

pytestmark = pytest.mark.unit


def test_parse_seconds():
    assert parse_seconds("90") == 90 and parse_seconds("20m") == 1200 and parse_seconds("1.5h") == 5400
    with pytest.raises(BonsaiError, match="time budget"):
        parse_seconds("soon")


def test_picks_most_expensive_rung_that_fits(tiny_models):
    spec = load_spec(tiny_models["llama-gqa-tied"])
    machine = nominal_machine(device="cpu", budget=2**30)
    kw = dict(method="bonsai", sparsity=0.5, machine=machine)
    est = [estimate(spec, s, **kw) for _, s in LADDER]
    # reference: scan the ladder by hand
    for budget in [e.seconds for e in est] + [est[-1].seconds * 10]:
        fitting = [name for (name, _), e in zip(LADDER, est) if e.seconds <= budget]
        assert fit_time_budget(spec, budget, **kw).name == fitting[-1]
    assert est[0].seconds < est[-1].seconds and est[0].forward_tokens < est[-1].forward_tokens
    with pytest.raises(BonsaiError, match="cheapest"):
        fit_time_budget(spec, est[0].seconds * 0.5, **kw)
    flap = [estimate(spec, s, method="flap", sparsity=0.5, machine=machine) for _, s in LADDER]
    names = [n for n, _ in LADDER]
    budget = flap[names.index("standard")].seconds * 1.001
    want = [n for n, f in zip(names, flap) if f.seconds <= budget][-1]
    assert fit_time_budget(spec, budget, method="flap", sparsity=0.5, machine=machine).name == want
    assert "standard" in [n for n, f in zip(names, flap) if f.seconds <= budget]
    # FLAP pays one dense pass: any rung costs it less than Bonsai's
    assert estimate(spec, LADDER[-1][1], method="flap", sparsity=0.5, machine=machine).seconds < est[-1].seconds
