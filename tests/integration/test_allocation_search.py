"""`--allocation search`: each iteration removes the units of the head / edge-layer offset whose
sub-model measured lowest (when fresh windows confirm it), checked against the prior-only runs with
each offset added to the prior by hand (the reference path), and against a direct evaluation of
those runs' sub-models."""
from __future__ import annotations

import pytest
import torch

from bonsai_lite.config import CalibConfig, RunConfig, SearchConfig
from bonsai_lite.errors import BonsaiError
from bonsai_lite.io.model import StreamedModel
from bonsai_lite.progress import NullProgress, read_metrics
from bonsai_lite.prune import loop as L
from bonsai_lite.prune import run as R
from bonsai_lite.search.engine import evaluate
from bonsai_lite.search.machine import detect_machine
from bonsai_lite.search.offsets import allocation_grid, allocation_offsets, distinct, edge_layers
from bonsai_lite.search.planner import Work, make_plan
from bonsai_lite.structure import UnitLayout

pytestmark = pytest.mark.integration


def _run(model_dir, tmp_path, name, *, allocation="prior", seed=0, sparsity=0.3, progress=None):
    cfg = RunConfig(model=str(model_dir), out=str(tmp_path / name), calib=CalibConfig(text=None, samples=2, seq_len=16),
                    search=SearchConfig(method="bonsai", sparsity=sparsity, p_iter=0.15, masks_per_iter=8, seed=seed,
                                        regression="none", prior="flap-parent", candidates="global",
                                        allocation=allocation),
                    device="cpu")
    ids = torch.randint(0, 211, (400,), generator=torch.Generator().manual_seed(1))
    return R.run_pruning(cfg, ids=ids, run_dir=tmp_path / f"{name}.run", progress=progress)


def _shifted(monkeypatch, model_dir, head, edge):
    """The reference: the prior-only frame (one iteration) selecting on its scores plus one allocation's
    offsets, added by hand on the parent's layout."""
    real = L.greedy_drop
    offsets = allocation_offsets(UnitLayout.of(StreamedModel.open(str(model_dir)).layers), head, edge)
    monkeypatch.setattr(L, "greedy_drop", lambda scores, *a, **k: real(scores + offsets, *a, **k))


def test_offsets_shift_heads_and_edge_layers_only():
    layout = UnitLayout.of(tuple(type("S", (), {"heads": tuple(range(3)), "mlp": tuple(range(4))})() for _ in range(12)))
    off = allocation_offsets(layout, 0.5, 2.0)
    assert edge_layers(12) == {0, 11} and edge_layers(30) == {0, 1, 2, 27, 28, 29} and edge_layers(1) == {0}
    for layer, (h, m) in enumerate(zip(layout.heads, layout.mlp)):
        edge = 2.0 if layer in (0, 11) else 0.0
        assert torch.equal(off[h], torch.full((3,), 0.5 + edge, dtype=torch.float64))
        assert torch.equal(off[m], torch.full((4,), edge, dtype=torch.float64))
    assert allocation_grid()[0] == (0.0, 0.0) and len(set(allocation_grid())) == len(allocation_grid())
    a, b = torch.tensor([True, False]), torch.tensor([False, True])
    assert distinct([a, b, a.clone(), b, a]) == [0, 1]


def test_search_removes_what_the_winning_offset_removes(tiny_models, tmp_path, monkeypatch):
    """Per seed, the searched run's structure is the prior-only run's with the offset it chose (that
    offset measured lowest among the grid, or the prior's own when the fresh windows did not confirm
    it), and at least one seed chooses an offset that changes the structure."""
    model_dir = tiny_models["llama-gqa-tied"]
    changed = False
    for seed in range(3):
        metrics = tmp_path / f"s{seed}.metrics.jsonl"
        searched = _run(model_dir, tmp_path, f"s{seed}", allocation="search", seed=seed, sparsity=0.15,
                        progress=NullProgress(metrics))
        (h,) = searched.history
        # the sub-models it evaluated are timed in the run's metrics: the grid's distinct ones, and the
        # confirming pair when an offset other than the prior's won
        timed = [m for m in read_metrics(metrics) if m.get("stage") == "allocation"]
        assert sum(m["masks"] for m in timed) == len(h["allocation_losses"]) + 2 * ("allocation_confirm" in h)
        assert all(m["iteration"] == 0 and m["seconds"] > 0 and m["predicted_seconds"] > 0 for m in timed)
        losses = h["allocation_losses"]
        head, edge = h["allocation"]
        best = min(losses, key=losses.get)
        if h.get("allocation_confirmed", True) and best != "0,0":
            assert f"{head:g},{edge:g}" == best
        else:
            assert (head, edge) == (0.0, 0.0)
        assert h["forward_tokens"] > h["allocation_tokens"] >= len(losses) * 2 * 16
        with monkeypatch.context() as m:
            _shifted(m, model_dir, head, edge)
            reference = _run(model_dir, tmp_path, f"r{seed}", seed=seed, sparsity=0.15)
        assert searched.layers == reference.layers
        changed |= searched.layers != _run(model_dir, tmp_path, f"p{seed}", seed=seed, sparsity=0.15).layers
    assert changed


def test_recorded_losses_are_the_sub_models_losses(tiny_models, tmp_path, monkeypatch):
    """The losses the search records are those of the sub-models it selected: the same masks evaluated
    again through the engine, one at a time, on the same windows."""
    model_dir = tiny_models["llama-gqa-tied"]
    seen = []
    real = L.Pruner._confirm_losses

    def spy(self, model, tokens, masks, stage):
        out = real(self, model, tokens, masks, stage)
        seen.append((model, tokens, masks, out))
        return out

    monkeypatch.setattr(L.Pruner, "_confirm_losses", spy)
    searched = _run(model_dir, tmp_path, "spy", allocation="search", sparsity=0.15)
    model, tokens, masks, losses = seen[0]
    assert len(masks) == len(searched.history[0]["allocation_losses"]) >= 2
    assert len(set(map(tuple, masks.int().tolist()))) == len(masks)  # each distinct removal once
    machine = detect_machine(device="cpu", budget=None)
    for k, m in enumerate(masks):  # the batched evaluation against one sub-model at a time
        plan = make_plan(model.spec, model.layers, Work(1, len(tokens), tokens.shape[1]), machine)
        one = evaluate(model, tokens, m[None], plan).nll[0]
        assert float(one) == pytest.approx(float(losses[k]), rel=1e-4, abs=1e-5)


def test_allocation_search_needs_flap_scores():
    with pytest.raises(BonsaiError, match="--allocation search"):
        SearchConfig(method="bonsai", sparsity=0.3, prior="wanda", regression="none", allocation="search")
    with pytest.raises(BonsaiError, match="--allocation search"):
        SearchConfig(method="flap", sparsity=0.3, allocation="search")
    with pytest.raises(BonsaiError, match="--allocation"):
        SearchConfig(method="bonsai", sparsity=0.3, allocation="sideways")


def test_the_log_line_names_the_allocation():
    from bonsai_lite.prune.run import iteration_line

    base = dict(removed_units=3, params_non_embedding=1e6, dense_nll=3.0, seconds=2)
    won = iteration_line(dict(base, allocation=[0.5, 1.0], allocation_losses={"0,0": 3.9, "0.5,1": 3.7},
                              allocation_confirmed=True, allocation_confirm=[3.7, 3.8]))
    assert "allocation heads +0.5, edge layers +1 of 2 tried (loss 3.700; the prior's 3.900)" in won
    lost = iteration_line(dict(base, allocation=[0.0, 0.0], allocation_losses={"0,0": 3.9, "0.5,1": 3.7},
                               allocation_confirmed=False, allocation_confirm=[3.95, 3.8]))
    assert "not confirmed on fresh windows (its 3.950 against the prior's 3.800)" in lost


def test_auto_searches_on_steps_of_a_tenth_and_more(tiny_models):
    """--allocation auto: search where it measured better (bonsai on a flap prior alone, steps of at
    least 0.1), the prior elsewhere; with --first-step auto, prune.api resolves it with the first step."""
    from bonsai_lite.prune.api import _resolve_refit
    from bonsai_lite.structure import load_spec

    kw = dict(method="bonsai", regression="none", prior="flap-parent")
    assert SearchConfig(sparsity=0.35, p_iter=0.1, **kw).allocation == "search"
    assert SearchConfig(sparsity=0.2, p_iter=0.05, first_step=0.2, **kw).allocation == "search"
    assert SearchConfig(sparsity=0.35, p_iter=0.05, **kw).allocation == "prior"
    assert SearchConfig(sparsity=0.3, p_iter=0.05, first_step=0.2, **kw).allocation == "prior"  # then 5% steps
    assert SearchConfig(sparsity=0.05, p_iter=0.05, **kw).allocation == "prior"  # one small step
    assert SearchConfig(sparsity=0.35, p_iter=0.1, **dict(kw, regression="unit")).allocation == "prior"
    assert SearchConfig(sparsity=0.35, p_iter=0.1, **dict(kw, prior="wanda")).allocation == "prior"
    assert SearchConfig(method="flap", sparsity=0.35, p_iter=0.1).allocation == "prior"
    model = tiny_models["llama-gqa-tied"]
    for sparsity, want in ((0.2, "search"), (0.35, "prior")):
        search = SearchConfig(sparsity=sparsity, p_iter=0.05, first_step="auto", fluctuation="residual", **kw)
        assert search.allocation == "auto"
        cfg = RunConfig(model=str(model), out="unused", calib=CalibConfig(text=None), search=search, device="cpu")
        resolved = _resolve_refit(cfg, load_spec(model), 2**30).search
        assert (resolved.first_step, resolved.allocation) == ((0.2, "search") if want == "search" else (0.0, "prior"))
