"""FLAP's prior from column norms read once per run (scores.ColumnNorms) against the reference that
slices the projections of the pruned model and scores them (priors.flap_scores)."""
from __future__ import annotations

import pytest
import torch

from bonsai_lite.io.model import StreamedModel
from bonsai_lite.prune import scores as S
from bonsai_lite.search import priors as P
from bonsai_lite.structure import UnitLayout

pytestmark = pytest.mark.integration


def _pruned(layers, g):
    out = []
    for s in layers:
        keep_h = torch.rand(len(s.heads), generator=g) < 0.7
        keep_h[0] = True
        keep_m = torch.rand(len(s.mlp), generator=g) < 0.6
        out.append(s.keep(heads=keep_h, mlp=keep_m))
    return tuple(out)


def _stats(model, layout, g):
    stats = {}
    for l, (h, m) in enumerate(zip(layout.heads, layout.mlp)):
        for k, width in (("heads", (h.stop - h.start) * model.spec.head_dim), ("mlp", m.stop - m.start)):
            stats[(l, k)] = P.ActivationStats.empty(width)
            stats[(l, k)].update(torch.randn(64, width, generator=g) * torch.rand(width, generator=g))
    return stats


def test_cached_column_norms_score_as_the_sliced_projections(tiny_models, monkeypatch):
    parent = StreamedModel.open(str(tiny_models["llama-gqa-tied"]))
    g = torch.Generator().manual_seed(0)
    cache = S.ColumnNorms()
    S.flap_unit_scores(parent, _stats(parent, UnitLayout.of(parent.layers), g), UnitLayout.of(parent.layers),
                       columns_of=cache)  # the first iteration: reads the projections
    model = parent.with_layers(_pruned(parent.layers, g))
    layout = UnitLayout.of(model.layers)
    stats = _stats(model, layout, g)

    reads = []
    real_read = type(model.ckpt).read
    monkeypatch.setattr(type(model.ckpt), "read", lambda self, name, *a, **k: reads.append(name) or
                        real_read(self, name, *a, **k))
    got, own, columns = S.flap_unit_scores(model, stats, layout, columns_of=cache)
    assert not reads  # a later iteration reads no weights
    monkeypatch.undo()

    for l, (h, m) in enumerate(zip(layout.heads, layout.mlp)):  # reference: slice, then score
        o, d = S.output_projections(model, l)
        for k, w in (("heads", o), ("mlp", d)):
            ref = P.flap_scores(w, stats[(l, k)], group_size=1).double()
            torch.testing.assert_close(columns[(l, k)][1], ref, rtol=1e-6, atol=0)
    ref_scores = S.flap_unit_scores(model, stats, layout, columns_of=S.ColumnNorms())[0]
    torch.testing.assert_close(got, ref_scores, rtol=0, atol=0)  # a cold cache gives the same scores
    assert got.std() > 0


@pytest.mark.parametrize("rows_per_group", [10**6, 2])  # 2: a layer's windows arrive in two row groups
def test_residual_prior_streamed_equals_transformers_hooks(tiny_models, tiny_tokens, rows_per_group):
    """`--fluctuation residual`: the engine's tap reduces each layer's second moments once all windows
    are in; the residual covariances and FLAP scores equal those of o_proj/down_proj inputs captured
    with hooks on the transformers model; on a pruned model the cached weight blocks equal the sliced
    projections'."""
    from transformers import AutoModelForCausalLM

    from bonsai_lite.search.engine import evaluate
    from bonsai_lite.search.observe import StatsTap
    from test_engine import plan

    path = tiny_models["llama-gqa-tied"]
    parent = StreamedModel.open(str(path))
    hd = parent.spec.head_dim
    tap = StatsTap(len(parent.layers), n_samples=len(tiny_tokens), residual={"heads": hd, "mlp": 1})
    evaluate(parent, tiny_tokens, None, plan(group_rows=rows_per_group, tile_rows=1), tap=tap)
    assert all(s.gram is None and s.residual is not None for s in tap.stats.values())

    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    captured, hooks = {}, []
    for l, layer in enumerate(ref.model.layers):
        for k, proj in (("heads", layer.self_attn.o_proj), ("mlp", layer.mlp.down_proj)):
            hooks.append(proj.register_forward_pre_hook(
                lambda _m, inp, key=(l, k): captured.setdefault(key, []).append(inp[0].reshape(-1, inp[0].shape[-1]))))
    with torch.no_grad():
        ref(tiny_tokens)
    for h in hooks:
        h.remove()
    ref_stats = {}
    for key, rows in captured.items():
        ref_stats[key] = P.ActivationStats.empty(rows[0].shape[1], gram=True)
        ref_stats[key].update(torch.cat(rows))
        want = P.residual_covariances(ref_stats[key], group_size=hd if key[1] == "heads" else 1)
        torch.testing.assert_close(tap.stats[key].residual, want, rtol=2e-3, atol=1e-6)
    layout = UnitLayout.of(parent.layers)
    cache = S.ColumnNorms()
    got = S.flap_unit_scores(parent, tap.stats, layout, columns_of=cache, fluctuation="residual")[0]
    want = S.flap_unit_scores(parent, ref_stats, layout, fluctuation="residual")[0]
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(got, S.flap_unit_scores(parent, tap.stats, layout)[0], atol=1e-2)  # not FLAP's

    model = parent.with_layers(_pruned(parent.layers, torch.Generator().manual_seed(1)))
    for l in range(len(model.layers)):  # cached blocks of a pruned model = blocks of its sliced projections
        o, d = S.output_projections(model, l)
        torch.testing.assert_close(cache.blocks(model, l, "heads"), P.column_gram_blocks(o, group_size=hd), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(cache.blocks(model, l, "mlp"), P.column_gram_blocks(d, group_size=1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("stored, compute", [(torch.bfloat16, "bfloat16"), (torch.bfloat16, "float32"),
                                             (torch.float32, "float32")])
def test_norms_taken_from_the_dense_pass_equal_the_read_ones_without_reading(tmp_path, tiny_tokens, monkeypatch,
                                                                               stored, compute):
    # The first dense pass loads every whole o/down anyway: ColumnNorms.observe takes the norms from
    # those weights (cast exactly) instead of reading the projections again (4.8 GB at 8B).
    from conftest import make_tiny_model
    from test_engine import plan

    from bonsai_lite.search.engine import evaluate

    model = StreamedModel.open(str(make_tiny_model(tmp_path / "m", "llama-gqa-tied", dtype=stored)))
    assert S.whole_projections(model, getattr(torch, compute))
    reads, real_read = [], type(model.ckpt).read
    monkeypatch.setattr(type(model.ckpt), "read", lambda self, name, *a, **k: reads.append(name) or
                        real_read(self, name, *a, **k))
    fed, seen = S.ColumnNorms(), []
    evaluate(model, tiny_tokens, None, plan(dtype=compute, group_rows=2, tile_rows=1),  # two row groups
             on_weights=lambda l, w: seen.append(l) or fed.observe(l, w))
    assert seen == list(range(len(model.layers)))  # each block once, not once per row group
    names = {n for l in range(len(model.layers)) for k, n in model.spec.adapter.block_tensor_names(l).items()
             if k in ("o_w", "down_w")}
    got = {(l, k): fed(model, l, k) for l in range(len(model.layers)) for k in ("heads", "mlp")}
    assert not names & set(reads)
    read = S.ColumnNorms()
    for (l, k), v in got.items():
        assert torch.equal(v, read(model, l, k))
    assert names <= set(reads)  # the reference did read them


def test_norms_are_not_taken_from_a_pass_that_cuts_or_rounds_the_projections(tmp_path, tiny_models):
    from conftest import make_tiny_model

    fp32 = StreamedModel.open(str(tiny_models["llama-gqa-tied"]))
    bf16 = StreamedModel.open(str(make_tiny_model(tmp_path / "m", "llama-gqa-tied", dtype=torch.bfloat16)))
    assert S.whole_projections(fp32, torch.float32) and S.whole_projections(bf16, torch.float32)
    assert not S.whole_projections(fp32, torch.bfloat16)  # rounded
    assert not S.whole_projections(bf16, torch.float16)  # bf16's range and digits are not float16's
    pruned = fp32.with_layers(_pruned(fp32.layers, torch.Generator().manual_seed(0)))
    assert not S.whole_projections(pruned, torch.float32)  # cut: the norms of the kept columns only


def test_a_bonsai_iteration_takes_the_norms_in_its_dense_pass_and_prunes_as_with_the_read(tmp_path, monkeypatch):
    # The loop's first prior (flap-parent) takes the norms in the dense pass (bf16 checkpoint, float32
    # pass): the iteration reads no o/down, and removes what the iteration reading them removes.
    from conftest import make_tiny_model

    from bonsai_lite.config import CalibConfig, RunConfig, SearchConfig
    from bonsai_lite.io.checkpoint import Checkpoint
    from bonsai_lite.prune.loop import Pruner
    from bonsai_lite.prune.state import RunState

    model_dir = make_tiny_model(tmp_path / "m", "llama-gqa-tied", dtype=torch.bfloat16)
    ids = torch.randint(0, 211, (400,), generator=torch.Generator().manual_seed(0))
    cfg = RunConfig(model=str(model_dir), out=str(tmp_path / "out"), calib=CalibConfig(text=None, samples=2, seq_len=16),
                    search=SearchConfig(method="bonsai", sparsity=0.2, p_iter=0.2, masks_per_iter=8, seed=1,
                                        compensate="off"),  # compensation reads them to fold biases
                    device="cpu", dtype="float32")
    reads, real_read = [], Checkpoint.read

    def layers(name):
        pruner = Pruner(cfg, ids=ids, state=RunState(tmp_path / name))
        reads.clear()
        out = pruner.iteration(0, pruner.parent.layers, {})[0]
        names = {n for l in range(len(out)) for k, n in pruner.parent.spec.adapter.block_tensor_names(l).items()
                 if k in ("o_w", "down_w")}
        return out, names & set(reads)

    monkeypatch.setattr(Checkpoint, "read", lambda self, name, *a, **k: reads.append(name) or real_read(self, name, *a, **k))
    taken, taken_reads = layers("taken")
    monkeypatch.setattr(S, "whole_projections", lambda *a: False)
    read, read_reads = layers("read")
    assert not taken_reads and read_reads
    assert taken == read and taken != Pruner(cfg, ids=ids, state=RunState(tmp_path / "x")).parent.layers
