"""--time-budget: the most expensive rung of the ladder predicted to fit, from the planner's model."""

import pytest

from bonsai_lite.errors import BonsaiError
from bonsai_lite.prune.presets import LADDER, estimate, fit_time_budget, parse_seconds
from bonsai_lite.search.machine import nominal_machine
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
    from bonsai_lite.search.pass_costs import refit_seconds, second_moment_seconds

    spec = load_spec(tiny_models["llama-gqa-tied"])
    machine = nominal_machine(device="cpu", budget=2**30)
    settings = dict(LADDER[0][1])
    kw = dict(method="bonsai", sparsity=0.5, machine=machine)
    n_iter = 5  # quick: p_iter 0.1 to 0.5
    rows = settings["prior_samples"] * (settings["prior_seq_len"] or settings["seq_len"])
    t = settings["prior_seq_len"] or settings["seq_len"]
    base = estimate(spec, settings, **kw)
    ls = estimate(spec, settings, refit="ls", refit_samples=4, **kw)
    assert ls.seconds == pytest.approx(base.seconds + refit_seconds(spec, None, 4 * t, t, machine, keep=0.5))
    assert ls.forward_tokens == base.forward_tokens + 4 * t
    loop = estimate(spec, settings, refit="loop", refit_samples=4, **kw)
    assert loop.seconds == pytest.approx(base.seconds + n_iter * refit_seconds(spec, None, 4 * t, t, machine, keep=0.5))
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
    # its solves are on the kept inputs: a structure keeping half of every layer costs what a structure
    # not chosen yet costs at keep=0.5, less than at keep=1
    half = tuple(type(s)(s.heads[:len(s.heads) // 2], s.kv_of_head[:len(s.heads) // 2], s.mlp[:len(s.mlp) // 2])
                 for s in spec.layers)
    assert all(2 * len(h.heads) == len(s.heads) and 2 * len(h.mlp) == len(s.mlp) for h, s in zip(half, spec.layers))
    assert refit_seconds(spec, half, 64, 16, machine) == pytest.approx(refit_seconds(spec, None, 64, 16, machine, keep=0.5))
    assert refit_seconds(spec, None, 64, 16, machine, keep=0.5) < refit_seconds(spec, None, 64, 16, machine)


def test_regression_auto_drops_sub_models_below_the_measured_size(tiny_models, tmp_path):
    # `prune`'s default --regression auto: the paper's regression where each sub-model gets at least
    # REGRESSION_MIN_TOKENS tokens, the prior alone below (what the quick and standard presets give)
    from bonsai_lite.cli.main import build_parser
    from bonsai_lite.cli.prune import config_from_args
    from bonsai_lite.config import PRESETS, REGRESSION_MIN_TOKENS

    model = str(tiny_models["llama-gqa-tied"])

    def regression(*flags):
        args = build_parser().parse_args(["prune", model, "--sparsity", "0.5", "--out", str(tmp_path / "o"), *flags])
        return config_from_args(args).search.regression

    for preset in ("quick", "standard"):
        assert PRESETS[preset]["samples"] * PRESETS[preset]["seq_len"] < REGRESSION_MIN_TOKENS
        assert regression("--preset", preset) == "none"
        assert regression("--preset", preset, "--regression", "unit") == "unit"
    assert regression("--preset", "paper") == regression() == "unit"  # 32 x 2048 per sub-model
    assert regression("--calib-samples", "16", "--seq-len", "128") == "unit"  # 2048: at the threshold
    assert regression("--calib-samples", "15", "--seq-len", "128") == "none"
    assert regression("--calib-samples", "2", "--seq-len", "16", "--method", "flap") == "unit"  # not bonsai's: unused
    # the time budget's estimate resolves auto per rung: no sub-models below the threshold, so only
    # the dense passes are paid (the same as --regression none)
    spec = load_spec(tiny_models["llama-gqa-tied"])
    kw = dict(method="bonsai", sparsity=0.5, machine=nominal_machine(device="cpu", budget=2**30))
    for _, settings in LADDER:
        auto = estimate(spec, settings, regression="auto", **kw)
        small = settings["samples"] * settings["seq_len"] < REGRESSION_MIN_TOKENS
        assert auto == estimate(spec, settings, regression="none" if small else "unit", **kw)


def test_first_step_auto_prunes_a_small_target_in_one_step_on_the_residual_prior(tiny_models, tmp_path):
    # --first-step auto (resolved by prune.api once --fluctuation is): a target of at most
    # ONE_STEP_SPARSITY in one step (its dense pass over the windows of the steps it replaces) where
    # the frame ranks by FLAP's residual metric alone; otherwise the paper's equal steps (with
    # sub-models, with FLAP's variance, for larger targets, or where p_iter is the target already)
    from bonsai_lite.cli.main import build_parser
    from bonsai_lite.cli.prune import config_from_args
    from bonsai_lite.config import ONE_STEP_SPARSITY, REGRESSION_MIN_TOKENS
    from bonsai_lite.prune.api import _resolve_refit

    model = str(tiny_models["llama-gqa-tied"])
    spec = load_spec(tiny_models["llama-gqa-tied"])

    def search(*flags):
        args = build_parser().parse_args(["prune", model, "--sparsity", "0.2", "--out", str(tmp_path / "o"), *flags])
        cfg = config_from_args(args)
        assert cfg.search.first_step == ("auto" if "--first-step" not in flags else float(flags[-1]))
        return _resolve_refit(cfg, spec, 2**30).search

    s = search("--preset", "standard")
    assert ONE_STEP_SPARSITY == 0.2 and s.fluctuation == "residual"
    assert (s.regression, s.first_step, s.iterations, s.dense_scale(0)) == ("none", 0.2, 1, 4)
    assert search("--preset", "standard", "--sparsity", "0.15").first_step == 0.15
    assert search("--preset", "standard", "--fluctuation", "variance").first_step == 0.0
    assert search("--preset", "standard", "--refit", "off").first_step == 0.0  # variance without the refit
    assert search("--preset", "standard", "--sparsity", "0.35").first_step == 0.0  # larger targets: equal steps
    assert search("--preset", "standard", "--regression", "unit").first_step == 0.0
    assert search("--preset", "standard", "--prior", "wanda").first_step == 0.0
    assert search("--preset", "paper").first_step == 0.0  # the paper's regression
    assert search("--preset", "standard", "--p-iter", "0.2").first_step == 0.0  # one step already
    assert search("--preset", "standard", "--method", "flap").first_step == 0.0
    assert search("--preset", "standard", "--first-step", "0").iterations == 4
    assert search("--preset", "standard", "--first-step", "0.1").first_step == 0.1
    # the time budget's estimate resolves it as the run will
    for sparsity in (0.2, 0.5):
        kw = dict(method="bonsai", sparsity=sparsity, machine=nominal_machine(device="cpu", budget=2**30),
                  refit="auto", fluctuation="auto", regression="auto")
        for _, settings in LADDER:
            auto = estimate(spec, settings, first_step="auto", **kw)
            one = (sparsity <= 0.2 and settings["p_iter"] < sparsity and settings["prior_samples"]
                   and settings["samples"] * settings["seq_len"] < REGRESSION_MIN_TOKENS)
            assert auto == estimate(spec, settings, first_step=sparsity if one else 0.0, **kw)
    # ... and with FLAP's variance (no refit) never one step
    assert estimate(spec, LADDER[2][1], method="bonsai", sparsity=0.2, machine=nominal_machine(device="cpu", budget=2**30),
                    regression="auto", first_step="auto") == \
        estimate(spec, LADDER[2][1], method="bonsai", sparsity=0.2, machine=nominal_machine(device="cpu", budget=2**30),
                 regression="auto", first_step=0.0)


def test_a_larger_first_step_pays_its_larger_dense_pass(tiny_models):
    # --first-step 0.2 at p_iter 0.05 draws 4x the dense-pass windows once (config.dense_scale): the
    # same forward tokens as the four equal steps it replaces
    spec = load_spec(tiny_models["llama-gqa-tied"])
    kw = dict(method="bonsai", sparsity=0.5, machine=nominal_machine(device="cpu", budget=2**30), regression="none")
    settings = dict(LADDER[2][1])  # standard: p_iter 0.05, 16 windows of 512
    window = settings["prior_samples"] * settings["prior_seq_len"]
    assert estimate(spec, settings, **kw).forward_tokens == 10 * window
    stepped = estimate(spec, settings, first_step=0.2, **kw)
    assert stepped.forward_tokens == (4 + 6) * window  # 0.2, then six steps of 0.05
    # ... but all four passes' windows run on the parent, where equal steps run three on smaller models
    assert stepped.seconds > estimate(spec, settings, **kw).seconds
    reused = dict(settings, prior_samples=0)  # the search windows, whatever the step
    assert estimate(spec, reused, first_step=0.2, **kw).forward_tokens == 7 * settings["samples"] * settings["seq_len"]


def test_the_estimate_splits_into_iterations_and_the_refit(tiny_models):
    # seconds = FLAP's column read + each iteration (its own refit under --refit loop) + the refit after
    # the search; what is left after k iterations: the rest of the search at the measured pace, then the refit
    from bonsai_lite.prune.presets import seconds_left
    from bonsai_lite.search.pass_costs import column_norm_seconds, refit_seconds

    spec = load_spec(tiny_models["llama-gqa-tied"])
    machine = nominal_machine(device="cpu", budget=2**30)
    settings, kw = dict(LADDER[0][1]), dict(method="bonsai", sparsity=0.5, machine=machine, refit_samples=4)
    t = settings["prior_seq_len"] or settings["seq_len"]
    one = refit_seconds(spec, None, 4 * t, t, machine, keep=0.5)
    off, ls, loop = (estimate(spec, settings, refit=r, **kw) for r in ("off", "ls", "loop"))
    for e in (off, ls, loop):
        # a float32 checkpoint and a float32 pass on the CPU: the norms are taken in the first dense pass
        assert len(e.iterations) == 5 and e.start == pytest.approx(column_norm_seconds(spec, machine, read=False))
        assert e.seconds == pytest.approx(e.start + sum(e.iterations) + e.refit)
    assert off.refit == 0 and ls.refit == loop.refit == pytest.approx(one)
    assert ls.iterations == off.iterations  # the search's passes do not depend on the refit after it
    assert loop.iterations == pytest.approx([i + one for i in off.iterations[:-1]] + [off.iterations[-1]])
    assert seconds_left(ls, 0, 1.0) == pytest.approx(ls.seconds - ls.start)
    assert seconds_left(ls, 2, 1.5) == pytest.approx(1.5 * sum(ls.iterations[2:]) + one)  # the refit at its own
    assert seconds_left(loop, 5, 2.0) == pytest.approx(one)
    # the iterations shrink with the model the search leaves (the planner's time is its compute)
    assert all(a > b for a, b in zip(off.iterations, off.iterations[1:]))


def test_progress_pace_is_measured_over_planned_seconds(monkeypatch):
    import bonsai_lite.progress as P

    clock = iter([0.0, 3.0, 10.0, 11.0, 20.0, 26.0])  # stage starts and ends
    monkeypatch.setattr(P.time, "perf_counter", lambda: next(clock))
    p = P.NullProgress()
    assert p.pace() is None
    with p.stage("priors", predicted=2.0):  # 3 s measured
        pass
    with p.stage("export"):  # no prediction: not part of the pace
        pass
    assert p.pace() == pytest.approx(1.5)
    with p.stage("evaluate", predicted=8.0):  # 6 s measured
        pass
    assert p.pace() == pytest.approx(9 / 10)
    assert [P.fmt_duration(s) for s in (42, 600, 9000)] == ["42 s", "10 min", "2.5 h"]


def test_the_allocation_search_is_counted(tiny_models):
    """--allocation search: every iteration adds the grid's sub-models and a confirming pair on the
    step's windows, priced as the planner prices that many sub-models on the structure left."""
    from bonsai_lite.search.offsets import allocation_grid
    from bonsai_lite.search.planner import Work, make_plan

    spec = load_spec(tiny_models["llama-gqa-tied"])
    machine = nominal_machine(device="cpu", budget=2**30)
    settings = dict(LADDER[2][1])  # standard
    kw = dict(method="bonsai", sparsity=0.35, machine=machine, regression="none")
    base = estimate(spec, settings, **kw)
    searched = estimate(spec, settings, allocation="search", **kw)
    k = len(allocation_grid()) + 2
    n_iter = 7  # p_iter 0.05 to 0.35
    assert searched.forward_tokens == base.forward_tokens + n_iter * k * settings["samples"] * settings["seq_len"]
    per = make_plan(spec, spec.layers, Work(k, settings["samples"], settings["seq_len"]), machine).predicted_seconds
    shares = sum(max(0.05, 1 - it * settings["p_iter"]) for it in range(n_iter))
    assert searched.seconds == pytest.approx(base.seconds + shares * per)
    # FLAP evaluates no sub-models: the setting costs it nothing
    assert estimate(spec, settings, **dict(kw, method="flap"), allocation="search") == estimate(spec, settings, **dict(kw, method="flap"))
    # auto: the prior's allocation on standard's 5% steps, the search on quick's 10% steps (config.auto_allocation)
    assert estimate(spec, settings, allocation="auto", **kw) == base
    quick = dict(LADDER[0][1])
    assert estimate(spec, quick, allocation="auto", **kw) == estimate(spec, quick, allocation="search", **kw)
