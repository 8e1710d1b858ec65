"""`--regression none`, the ablation that separates Bonsai's prior from its sub-model losses: it must
select exactly what Bonsai selects when the regression learns nothing (every beta 0, ties broken
by the group-normalised prior), without evaluating a single sub-model."""
from __future__ import annotations

import pytest
import torch

from bonsai_lite.config import CalibConfig, RunConfig, SearchConfig
from bonsai_lite.io.model import StreamedModel
from bonsai_lite.prune import loop as L
from bonsai_lite.prune import ranking
from bonsai_lite.prune import run as R
from bonsai_lite.search.regression import fit_relevance, tau_null_sd
from bonsai_lite.structure import UnitLayout

pytestmark = pytest.mark.integration


def _run(model_dir, tmp_path, name, regression, *, guard=True, sparsity=0.4, seed=4, prior="wanda", rank="relevance",
         candidates="layer", prior_memory="auto", allocation="prior"):
    cfg = RunConfig(model=str(model_dir), out=str(tmp_path / name), calib=CalibConfig(text=None, samples=2, seq_len=16),
                    search=SearchConfig(method="bonsai", sparsity=sparsity, p_iter=0.2, masks_per_iter=8, seed=seed,
                                        regression=regression, guard=guard, prior=prior, rank=rank,
                                        candidates=candidates, prior_memory=prior_memory, allocation=allocation),
                    device="cpu")
    ids = torch.randint(0, 211, (400,), generator=torch.Generator().manual_seed(0))
    return R.run_pruning(cfg, ids=ids, run_dir=tmp_path / f"{name}.run")


def test_prior_only_equals_bonsai_with_zero_beta(tiny_models, tmp_path, monkeypatch):
    model_dir = tiny_models["llama-gqa-tied"]
    evaluated = []
    real_evaluate = L.Pruner._evaluate_masks
    monkeypatch.setattr(L.Pruner, "_evaluate_masks",
                        lambda self, *a, **k: evaluated.append(1) or real_evaluate(self, *a, **k))
    prior_only = _run(model_dir, tmp_path, "none", "none")
    assert not evaluated  # no sub-model was evaluated
    assert all(h["forward_tokens"] == 2 * 16 for h in prior_only.history)

    def zero_beta(*a, **k):
        res = fit_relevance(*a, **k)
        return type(res)(**{**res.__dict__, "beta": torch.zeros_like(res.beta)})

    monkeypatch.setattr(ranking, "fit_relevance", zero_beta)
    reference = _run(model_dir, tmp_path, "zero", "unit")
    assert evaluated  # the reference did evaluate its sub-models
    assert prior_only.layers == reference.layers
    # and the prior is not a no-op here: a different regression outcome selects differently
    monkeypatch.undo()
    learned = _run(model_dir, tmp_path, "learned", "unit", guard=False)
    assert learned.layers != prior_only.layers


@pytest.mark.parametrize("prior", ["wanda", "flap"])
def test_guard_ranks_by_whichever_predicts_held_out_pairs_better(tiny_models, tmp_path, prior):
    """One iteration: the guarded run must select what the unguarded run selects when its betas'
    held-out pair tau beats the prior's, and what the prior alone selects otherwise."""
    model_dir = tiny_models["llama-gqa-tied"]
    choices = set()
    for seed in range(10):
        kw = dict(sparsity=0.2, seed=seed, prior=prior)
        guarded = _run(model_dir, tmp_path, f"g{seed}", "unit", **kw)
        betas = _run(model_dir, tmp_path, f"b{seed}", "unit", guard=False, **kw)
        alone = _run(model_dir, tmp_path, f"p{seed}", "none", **kw)
        (h,) = guarded.history
        assert h["guard_margin"] == pytest.approx(2.0 * tau_null_sd(4))  # 8 masks: 4 pairs
        expect = "regression" if h["cv_kendall_tau"] > h["prior_pair_tau"] + h["guard_margin"] else "prior"
        assert h["ranked_by"] == expect
        assert betas.history[0]["ranked_by"] == "regression"  # --no-guard always ranks by the betas
        if betas.layers != alone.layers:  # otherwise this seed cannot tell the two apart
            choices.add(expect)
            assert guarded.layers == (betas.layers if expect == "regression" else alone.layers)
    assert choices  # at least one seed discriminates


def test_rank_within_keeps_the_prior_allocation(tiny_models, tmp_path):
    """--rank within: each layer loses as many heads and MLP units as the prior-only run's first
    iteration removes (the prior allocates), while which units go follows the betas."""
    model_dir = tiny_models["llama-gqa-tied"]
    differs = False
    for seed in range(4):
        kw = dict(sparsity=0.2, seed=seed, prior="flap")
        within = _run(model_dir, tmp_path, f"w{seed}", "unit", guard=False, rank="within", **kw)
        alone = _run(model_dir, tmp_path, f"a{seed}", "none", **kw)
        widths = lambda res: [(len(s.heads), len(s.mlp)) for s in res.layers]  # noqa: E731
        assert widths(within) == widths(alone)
        differs |= within.layers != alone.layers
    assert differs  # the betas did choose other units somewhere


def test_global_candidates_prior_only_is_iterative_global_ranking(tiny_models, tmp_path, monkeypatch):
    """--candidates global with --regression none: each iteration removes what a global greedy on the
    prior over *all* units would (the candidates hold that whole removal), unlike the per-layer rule."""
    model_dir = tiny_models["llama-gqa-tied"]
    seen, priors = [], []
    real, real_prior = L.greedy_drop, L.comparable_prior

    def spy(scores, costs, need, *, tiebreak=None):
        drop = real(scores, costs, need, tiebreak=tiebreak)
        seen.append((drop, real(priors[-1], costs, need, tiebreak=tiebreak)))  # over every unit
        return drop

    monkeypatch.setattr(L, "greedy_drop", spy)
    monkeypatch.setattr(L, "comparable_prior", lambda *a: priors.append(real_prior(*a)) or priors[-1])
    _run(model_dir, tmp_path, "glob", "none", prior="flap", candidates="global", sparsity=0.4)
    assert seen and all(torch.equal(d, ref) for d, ref in seen)
    seen.clear()
    _run(model_dir, tmp_path, "layer", "none", prior="flap", candidates="layer", sparsity=0.4)
    assert any(not torch.equal(d, ref) for d, ref in seen)  # the per-layer rule does restrict


def test_flap_parent_keeps_the_first_iterations_scale(tiny_models, tmp_path, monkeypatch):
    """--prior flap-parent: iteration 1 scores as flap does and records each group's (mean, std);
    every later iteration standardises with exactly those, not with its survivors' own."""
    from bonsai_lite.prune import scores as S

    calls = []
    real = S.flap_unit_scores

    def spy(*a, **k):
        out = real(*a, **k)
        calls.append((k.get("norms"), out[1]))
        return out

    monkeypatch.setattr(S, "flap_unit_scores", spy)
    _run(tiny_models["llama-gqa-tied"], tmp_path, "fp", "none", prior="flap-parent", candidates="global", sparsity=0.4)
    assert len(calls) == 2 and calls[0][0] is None  # two iterations; the first uses its own scale
    first = calls[0][1]
    assert set(calls[1][0]) == set(first)
    assert all(calls[1][0][k] == pytest.approx(first[k]) for k in calls[1][0])
    assert any(calls[1][1][k] != pytest.approx(first[k]) for k in calls[1][1])  # the survivors' own differ


def test_flap_anchored_divides_each_group_by_its_drift(tiny_models, tmp_path, monkeypatch):
    """--prior flap-anchored: iteration 1 is flap-parent's; later iterations score each group as
    flap-parent would after dividing its column scores by their median drift from iteration 1's,
    checked against that identity on the raw z-scores (the pooling over a head's columns is linear)."""
    from bonsai_lite.prune import scores as S
    from bonsai_lite.search.priors import group_drift

    calls = []
    real = S.flap_unit_scores

    def spy(model, stats, layout, **k):
        out = real(model, stats, layout, **k)
        calls.append((k, out, real(model, stats, layout, norms=k.get("norms")), layout))
        return out

    monkeypatch.setattr(S, "flap_unit_scores", spy)
    _run(tiny_models["llama-gqa-tied"], tmp_path, "fa", "none", prior="flap-anchored", candidates="global",
         sparsity=0.4)
    assert len(calls) == 2 and calls[0][0].get("anchor") is None
    first_cols = calls[0][1][2]
    kw, (anchored, _, cols), (plain, _, _), layout = calls[1]
    assert set(kw["anchor"]) == set(first_cols)
    drifts = []
    for (l, kind), sl in zip(((l, k) for l in range(len(layout.heads)) for k in ("heads", "mlp")),
                             (s for pair in zip(layout.heads, layout.mlp) for s in pair)):
        if sl.stop == sl.start:
            continue
        mu, sd = kw["norms"][(l, kind)]
        r = group_drift(cols[(l, kind)][1], cols[(l, kind)][0], *first_cols[(l, kind)])
        drifts.append(r)
        torch.testing.assert_close(anchored[sl], ((plain[sl] * sd + mu) / r - mu) / sd)
    assert any(abs(r - 1) > 1e-3 for r in drifts)  # the removals did move some group's level


def test_regression_best_removes_what_the_lowest_loss_submodel_removed(tiny_models, tmp_path, monkeypatch):
    """--regression best: when the prior's proposal (the last sub-model) has the lowest loss, the run
    is `--regression none`'s exactly; when a sampled mask has it, every iteration removes that
    mask's removals (or a part of them ordered by the prior, when they exceed the step)."""
    model_dir = tiny_models["llama-gqa-tied"]
    # the same prior in every iteration: --regression none's own, without the memory auto gives it
    reference = _run(model_dir, tmp_path, "none", "none", prior="flap-parent", candidates="global", prior_memory=0)
    real_evaluate = L.Pruner._evaluate_masks
    seen = []

    def rigged(pick):
        def evaluate(self, model, tokens, masks, **k):
            losses = real_evaluate(self, model, tokens, masks, **k)
            winner = pick(len(masks))
            seen.append((masks.clone(), winner))
            return torch.where(torch.arange(len(masks)) == winner, losses.min() - 1, losses)
        return evaluate

    monkeypatch.setattr(L.Pruner, "_evaluate_masks", rigged(lambda n: n - 1))
    assert _run(model_dir, tmp_path, "bp", "best", prior="flap-parent", candidates="global").layers == reference.layers
    assert len(seen) == 2 and all(len(m) == 8 + 1 for m, _ in seen)  # 8 sampled + the proposal

    seen.clear()
    monkeypatch.setattr(L.Pruner, "_evaluate_masks", rigged(lambda n: 3))
    out = _run(model_dir, tmp_path, "b3", "best", prior="flap-parent", candidates="global", sparsity=0.2)
    (masks, k), = seen  # one iteration: the final structure is the parent minus its removals
    assert out.history[0]["best_mask"] == 3 and not out.history[0]["best_is_prior"]
    parent = StreamedModel.open(str(model_dir)).layers
    removed = torch.cat([torch.tensor([u not in new.heads for u in old.heads] + [u not in new.mlp for u in old.mlp])
                         for old, new in zip(parent, out.layers)])
    layout = UnitLayout.of(parent)  # units ordered heads then MLP per layer, as in the masks
    order = torch.cat([torch.cat([torch.arange(h.start, h.stop), torch.arange(m.start, m.stop)])
                       for h, m in zip(layout.heads, layout.mlp)])
    dropped_by_mask = ~masks[k][order]
    assert removed.any() and dropped_by_mask.any()
    assert bool((removed <= dropped_by_mask).all()) or bool((dropped_by_mask <= removed).all())
    assert out.layers != _run(model_dir, tmp_path, "n1", "none", prior="flap-parent", candidates="global",
                              sparsity=0.2).layers  # the rigged winner is not what the prior removes


@pytest.mark.parametrize("confirmed", [True, False])
def test_best_confirmed_keeps_the_winner_only_if_it_wins_again_on_fresh_windows(tiny_models, tmp_path, monkeypatch,
                                                                                  confirmed):
    """--regression best-confirmed: the lowest-loss sampled sub-model and the prior's proposal are
    measured again on a draw of windows other than the step's; the run equals `best` when the winner
    wins again and `none` when it does not. A proposal that wins outright is not re-measured."""
    model_dir = tiny_models["llama-gqa-tied"]
    kw = dict(prior="flap-parent", candidates="global", sparsity=0.2)
    real_evaluate, real_confirm = L.Pruner._evaluate_masks, L.Pruner._confirm_losses
    step, calls, winner = [], [], [3]

    def rigged(self, model, tokens, masks, **k):
        losses = real_evaluate(self, model, tokens, masks, **k)
        step.append((tokens, masks.clone()))
        return torch.where(torch.arange(len(masks)) == winner[0] % len(masks), losses.min() - 1, losses)

    def confirm(self, model, tokens, masks, stage):
        assert stage == "confirm"
        losses = real_confirm(self, model, tokens, masks, stage)
        calls.append((tokens, masks.clone(), losses))
        return torch.tensor([0.0, 1.0] if confirmed else [1.0, 0.0], dtype=losses.dtype)

    monkeypatch.setattr(L.Pruner, "_evaluate_masks", rigged)
    monkeypatch.setattr(L.Pruner, "_confirm_losses", confirm)
    out = _run(model_dir, tmp_path, "bc", "best-confirmed", **kw)
    best = _run(model_dir, tmp_path, "b3", "best", **kw)
    (tokens, masks), _ = step
    (fresh, pair, losses), = calls  # only the confirmed run re-measured, once
    assert fresh.shape == tokens.shape and not torch.equal(fresh, tokens)
    assert torch.equal(pair, masks[[3, len(masks) - 1]]) and torch.isfinite(losses).all()
    assert out.history[0]["confirmed"] is confirmed
    assert out.history[0]["forward_tokens"] == best.history[0]["forward_tokens"] + 2 * fresh.numel()
    monkeypatch.undo()
    reference = best if confirmed else _run(model_dir, tmp_path, "n", "none", **kw)
    assert out.layers == reference.layers
    assert best.layers != _run(model_dir, tmp_path, "n2", "none", **kw).layers  # the two outcomes differ

    calls.clear()  # a proposal that wins on the step's windows is removed without a second measurement
    winner[0] = -1
    monkeypatch.setattr(L.Pruner, "_evaluate_masks", rigged)
    monkeypatch.setattr(L.Pruner, "_confirm_losses", confirm)
    _run(model_dir, tmp_path, "bp", "best-confirmed", **kw)
    assert not calls


def test_a_first_step_removes_its_share_in_one_iteration(tiny_models, tmp_path):
    # --first-step 0.2 then p_iter 0.1 to 0.4: two iterations removing 0.2 and 0.1 + 0.1 of the parent's
    # non-embedding parameters; a first step equal to p_iter is the paper's schedule, the same model
    from dataclasses import replace

    model_dir = tiny_models["llama-gqa-tied"]
    ids = torch.randint(0, 211, (400,), generator=torch.Generator().manual_seed(0))

    def run(name, first, p_iter=0.1):
        cfg = RunConfig(model=str(model_dir), out=str(tmp_path / name), calib=CalibConfig(text=None, samples=2, seq_len=16),
                        search=SearchConfig(method="bonsai", sparsity=0.4, p_iter=p_iter, first_step=first,
                                            masks_per_iter=8, seed=1), device="cpu")
        return R.run_pruning(cfg, ids=ids, run_dir=tmp_path / f"{name}.run")

    dense = StreamedModel.open(model_dir).spec.non_embedding_params()
    stepped = run("stepped", 0.2)
    assert len(stepped.history) == 3
    left = [dense] + [h["params_non_embedding"] for h in stepped.history]
    removed = [(a - b) / dense for a, b in zip(left, left[1:])]
    unit = 3 * StreamedModel.open(model_dir).spec.hidden / dense  # one MLP unit, the smallest step
    assert removed[0] == pytest.approx(0.2, abs=2 * unit) and removed[1] == pytest.approx(0.1, abs=4 * unit)
    assert (dense - left[-1]) / dense == pytest.approx(0.4, abs=2 * unit)
    same = run("same", 0.1)
    paper = run("paper", 0.0)
    assert [h["removed_units"] for h in same.history] == [h["removed_units"] for h in paper.history]
    assert same.layers == paper.layers


def test_one_step_prior_only_is_flap_on_the_steps_windows(tiny_models, tmp_path):
    # A first step of the whole target with --regression none is one pass of FLAP's global ranking
    # (flap-parent z-scores on the first pass are FLAP's): it draws 4x --prior-samples windows for a
    # step of 4 x p_iter (config.dense_scale), so it is FLAP given those windows, model for model.
    model_dir = tiny_models["llama-gqa-tied"]
    ids = torch.randint(0, 211, (4000,), generator=torch.Generator().manual_seed(0))

    def run(name, method, prior_samples, **search):
        cfg = RunConfig(model=str(model_dir), out=str(tmp_path / name),
                        calib=CalibConfig(text=None, samples=2, seq_len=16, prior_samples=prior_samples, prior_seq_len=32),
                        search=SearchConfig(method=method, sparsity=0.4, p_iter=0.1, seed=2, **search), device="cpu")
        return R.run_pruning(cfg, ids=ids, run_dir=tmp_path / f"{name}.run")

    one = run("one", "bonsai", 3, first_step=0.4, regression="none", fluctuation="variance", allocation="prior")
    assert len(one.history) == 1 and one.history[0]["forward_tokens"] == 4 * 3 * 32
    flap = run("flap", "flap", 12, fluctuation="variance")
    assert one.layers == flap.layers
    assert one.extra_biases.keys() == flap.extra_biases.keys()
    for k, v in one.extra_biases.items():
        torch.testing.assert_close(v, flap.extra_biases[k])
    assert run("small", "flap", 3, fluctuation="variance").layers != one.layers  # the windows matter here
