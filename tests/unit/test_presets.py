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


def test_the_refit_and_the_residual_metric_are_counted(tiny_models):
    # --refit and --fluctuation residual cost time the search's passes do not: the estimate adds the
    # planner's refit time once (after every iteration with loop) and the second moments to every dense pass
    from bonsai_lite.prune.refit import refit_peak_bytes
    from bonsai_lite.search.planner import refit_seconds, second_moment_seconds

    spec = load_spec(tiny_models["llama-gqa-tied"])
    machine = nominal_machine(device="cpu", budget=2**30)
    settings = dict(LADDER[0][1])
    kw = dict(method="bonsai", sparsity=0.5, machine=machine)
    n_iter = 5  # quick: p_iter 0.1 to 0.5
    rows = settings["prior_samples"] * (settings["prior_seq_len"] or settings["seq_len"])
    t = settings["prior_seq_len"] or settings["seq_len"]
    base = estimate(spec, settings, **kw)
    ls = estimate(spec, settings, refit="ls", refit_samples=4, **kw)
    assert ls.seconds == pytest.approx(base.seconds + refit_seconds(spec, None, 4 * t, t, machine))
    assert ls.forward_tokens == base.forward_tokens + 4 * t
    loop = estimate(spec, settings, refit="loop", refit_samples=4, **kw)
    assert loop.seconds == pytest.approx(base.seconds + n_iter * refit_seconds(spec, None, 4 * t, t, machine))
    residual = estimate(spec, settings, fluctuation="residual", **kw)
    per_pass = second_moment_seconds(spec, spec.layers, rows, machine)
    shares = sum(max(0.05, 1 - it * settings["p_iter"]) for it in range(n_iter))
    assert residual.seconds == pytest.approx(base.seconds + shares * per_pass)
    # auto: the refit where its memory fits, the residual metric with it where the dense pass has the rows
    auto = estimate(spec, settings, refit="auto", refit_samples=4, fluctuation="auto", **kw)
    assert auto.seconds == pytest.approx(ls.seconds + shares * per_pass)
    many = 2**30 // t  # windows whose refit cannot fit the 1 GiB budget
    assert refit_peak_bytes(spec, many * t, t) > machine.budget
    off = estimate(spec, settings, refit="auto", refit_samples=many, fluctuation="auto", **kw)
    assert (off.seconds, off.forward_tokens) == (base.seconds, base.forward_tokens)
    # --regression none evaluates no sub-models: only the dense passes (and the refit) are left
    none = estimate(spec, settings, regression="none", **kw)
    flap_like = estimate(spec, settings, **dict(kw, method="wanda-sp"))  # the same dense passes, no column read
    assert none.seconds < base.seconds and none.forward_tokens == flap_like.forward_tokens
    # a chosen structure's refit only grams the layers that lost units
    one = tuple(s if l else type(s)(s.heads[:1], s.kv_of_head[:1], s.mlp) for l, s in enumerate(spec.layers))
    assert 0 < refit_seconds(spec, spec.layers, 64, 16, machine) < refit_seconds(spec, one, 64, 16, machine)
    assert refit_seconds(spec, one, 64, 16, machine) < refit_seconds(spec, None, 64, 16, machine)
