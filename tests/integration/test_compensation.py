"""Compensation: mean replacement during the search == bias folding at removal (fast path vs
reference), carried across iterations through the block loader (defect 4), and exported."""
from __future__ import annotations

import pytest
import torch

from bonsai_lite.errors import BonsaiError

from bonsai_lite.config import CalibConfig, RunConfig, SearchConfig
from bonsai_lite.io.model import StreamedModel
from bonsai_lite.prune.compensation import column_means, fills
from bonsai_lite.prune.loop import Pruner
from bonsai_lite.prune.run import run_pruning
from bonsai_lite.prune.scores import output_projections
from bonsai_lite.prune.select import apply_drop
from bonsai_lite.prune.state import RunState
from bonsai_lite.search.engine import evaluate
from bonsai_lite.search.observe import StatsTap
from bonsai_lite.search.priors import bias_compensation
from bonsai_lite.structure import UnitLayout

from test_engine import plan  # noqa: E402

pytestmark = pytest.mark.integration


def _means_of(model, tokens):
    tap = StatsTap(len(model.layers), n_samples=len(tokens))
    evaluate(model, tokens, None, plan(), tap=tap)
    return column_means(tap)


def _fold(model, drop, means):
    """Reference: slice the dropped units away and fold their mean output into the output biases."""
    layout = UnitLayout.of(model.layers)
    hd = model.spec.head_dim
    biases = dict(model.biases)
    for l, (h, m) in enumerate(zip(layout.heads, layout.mlp)):
        o, d = output_projections(model, l)
        names = model.spec.adapter.block_tensor_names(l)
        for key, w, keep, kind in (("o_b", o, (~drop[h]).repeat_interleave(hd), "heads"), ("down_b", d, ~drop[m], "mlp")):
            if keep.all():
                continue
            base = biases.get(names[key])
            if base is None:
                base = model.ckpt.read(names[key]).float() if names[key] in model.ckpt.infos else torch.zeros(w.shape[0])
            biases[names[key]] = base + bias_compensation(w, means[(l, kind)], keep_columns=keep)
    return model.with_layers(apply_drop(model.layers, layout, drop)).with_biases(biases)


@pytest.mark.parametrize("case", ["llama-gqa-tied", "qwen2-gqa-bias"])
def test_mean_replacement_equals_bias_folding(tiny_models, tiny_tokens, case):
    model = StreamedModel.open(tiny_models[case])
    means = _means_of(model, tiny_tokens)
    layout = UnitLayout.of(model.layers)
    g = torch.Generator().manual_seed(3)
    drops = torch.rand(3, layout.total, generator=g) < 0.3
    fast = evaluate(model.with_fills(fills(means, model.layers, model.spec.head_dim)), tiny_tokens, ~drops, plan())
    for k, drop in enumerate(drops):
        ref = evaluate(_fold(model, drop, means), tiny_tokens, None, plan())
        torch.testing.assert_close(fast.row_nll[k].float(), ref.row_nll[0].float(), atol=1e-4, rtol=0)
    # and compensation is not a no-op: zeroing gives other losses
    zeroed = evaluate(model, tiny_tokens, ~drops, plan())
    assert (zeroed.nll - fast.nll).abs().max() > 1e-3


def _cfg(model_dir, out, method="wanda-sp"):
    return RunConfig(model=str(model_dir), out=str(out), calib=CalibConfig(text=None, samples=2, seq_len=16),
                     search=SearchConfig(method=method, sparsity=0.4, p_iter=0.2, masks_per_iter=8, seed=1,
                                         compensate="on"),
                     device="cpu")


@pytest.mark.parametrize("method", ["wanda-sp", "bonsai"])
def test_compensation_carried_across_iterations(tiny_models, tmp_path, method):
    # Defect 4: each iteration's biases replaced the previous ones in the run state and the block
    # loader never saw them, so iteration 2 searched (and compensated) a model without them.
    model_dir = tiny_models["llama-gqa-tied"]
    ids = torch.randint(0, 211, (400,), generator=torch.Generator().manual_seed(0))
    cfg = _cfg(model_dir, tmp_path / "out", method)
    outcome = run_pruning(cfg, ids=ids, run_dir=tmp_path / "run")
    assert len(outcome.history) == 2
    # reference: the two iterations chained by hand, iteration 2 on the compensated model
    pruner = Pruner(cfg, ids=ids, state=RunState(tmp_path / "ref"))
    l1, b1, _ = pruner.iteration(0, pruner.parent.layers, {})
    m1 = pruner.parent.with_layers(l1).with_biases(b1)
    means = _means_of(m1, pruner._prior_tokens(1, pruner._tokens(1)))
    l2, b2, _ = pruner.iteration(1, l1, b1)
    assert l2 == outcome.layers
    layout = UnitLayout.of(l1)
    kept = torch.zeros(layout.total, dtype=torch.bool)
    for (h, m), s1, s2 in zip(zip(layout.heads, layout.mlp), l1, l2):
        kept[h] = torch.tensor([u in s2.heads for u in s1.heads])
        kept[m] = torch.tensor([u in s2.mlp for u in s1.mlp])
    ref = _fold(m1, ~kept, means).biases
    assert set(outcome.extra_biases) == set(ref) and len(ref) > 0
    for name, bias in ref.items():
        torch.testing.assert_close(outcome.extra_biases[name], bias, atol=1e-5, rtol=1e-5)
    # a layer that lost units in both iterations carries both contributions
    both = [n for n in b1 if not torch.allclose(ref[n], b1[n])]
    assert both, "the fixture should prune some layer in both iterations"


def test_compensated_export_equals_streamed_model(tiny_models, tiny_tokens, tmp_path):
    from bonsai_lite.export import export_pruned

    model_dir = tiny_models["qwen2-gqa-bias"]
    ids = torch.randint(0, 211, (400,), generator=torch.Generator().manual_seed(0))
    cfg = _cfg(model_dir, tmp_path / "out")
    outcome = run_pruning(cfg, ids=ids, run_dir=tmp_path / "run")
    export_pruned(str(model_dir), outcome.layers, tmp_path / "out", extra_biases=outcome.extra_biases)
    streamed = StreamedModel.open(model_dir).with_layers(outcome.layers).with_biases(outcome.extra_biases)
    ref = evaluate(streamed, tiny_tokens, None, plan())
    got = evaluate(StreamedModel.open(tmp_path / "out"), tiny_tokens, None, plan())
    torch.testing.assert_close(got.row_nll, ref.row_nll, atol=1e-4, rtol=0)


def test_allocation_regression_runs_in_the_loop(tiny_models, tmp_path):
    model_dir = tiny_models["llama-gqa-tied"]
    ids = torch.randint(0, 211, (400,), generator=torch.Generator().manual_seed(0))
    base = _cfg(model_dir, tmp_path / "out", "bonsai")
    search = {**base.search.__dict__, "regression": "allocation", "prior": "auto", "candidates": "auto", "rank": "auto",
              "cv_scope": "auto"}
    cfg = RunConfig(**{**base.__dict__, "search": SearchConfig(**search)})
    assert (cfg.search.prior, cfg.search.candidates) == ("wanda", "layer")  # auto: the frame it was measured in
    with pytest.raises(BonsaiError, match="positive prior"):
        SearchConfig(**{**search, "prior": "flap"})
    outcome = run_pruning(cfg, ids=ids, run_dir=tmp_path / "run")
    assert len(outcome.history) == 2
    assert all("common_scale" in h["regression"] for h in outcome.history)
    removed = cfg.search.sparsity * StreamedModel.open(model_dir).spec.non_embedding_params()
    left = StreamedModel.open(model_dir).with_layers(outcome.layers).spec.non_embedding_params(outcome.layers)
    assert StreamedModel.open(model_dir).spec.non_embedding_params() - left >= removed


def test_uniform_export_and_compensation_checked_up_front(tiny_models, tmp_path):
    from dataclasses import replace

    from bonsai_lite.errors import BonsaiError
    from bonsai_lite.prune.api import _check_compensation

    for case, holds in (("llama-gqa-tied", True), ("mistral-gqa", False), ("qwen2-gqa-bias", False)):
        spec = StreamedModel.open(tiny_models[case]).spec
        base = _cfg(tiny_models[case], tmp_path / "o", "flap")  # compensates by default
        auto = replace(base, search=replace(base.search, uniform=True, compensate="auto"))
        assert _check_compensation(auto, spec).search.compensates is holds
        on = replace(base, search=replace(base.search, uniform=True, compensate="on"))
        if holds:
            assert _check_compensation(on, spec) is on
        else:
            with pytest.raises(BonsaiError, match="--compensate on with --uniform"):
                _check_compensation(on, spec)
