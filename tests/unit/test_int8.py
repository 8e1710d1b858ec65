"""LLM.int8() weights (search/int8.py) on CPU with bitsandbytes' reference kernels.

The CUDA kernels themselves cannot run here; these tests pin down everything around them: the
F.linear dispatch that keeps ops.py unchanged, outlier columns, zero (masked) rows, the loader's
one-projection-at-a-time quantisation inside the real engine, and the clear refusal on CPU.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("bitsandbytes")

from bonsai_lite.errors import BonsaiError  # noqa: E402
from bonsai_lite.io.model import StreamedModel  # noqa: E402
from bonsai_lite.search import int8  # noqa: E402
from bonsai_lite.search.engine import evaluate  # noqa: E402
from bonsai_lite.search.planner import Plan  # noqa: E402
from bonsai_lite.structure import UnitLayout  # noqa: E402

pytestmark = pytest.mark.unit


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_dispatch_outliers_and_zero_rows(dtype):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 64, generator=g) * 0.1, torch.randn(96, generator=g)
    qw = int8.Int8Weight.quantize(w)
    assert qw.dtype == torch.int8 and qw.shape == (96, 64) and qw.numel() * qw.element_size() == 96 * 64
    x = torch.randn(2, 5, 64, generator=g)
    x[0, 1] = 0  # a row whose every head was masked: output must be the bias alone
    x[1, :, 3] = 40.0  # an outlier feature: computed in 16 bits, not quantised
    y = F.linear(x.to(dtype), qw, b.to(dtype))
    ref = F.linear(x, w, b)
    assert y.dtype == dtype and y.shape == ref.shape
    assert _rel(y, ref) < 0.02
    assert torch.allclose(y[0, 1].float(), b.to(dtype).float())
    assert torch.allclose(qw.dequantize(), w, atol=w.abs().max().item() / 127)


def test_quantising_in_slabs_equals_one_shot():
    w = torch.randn(37, 24, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    whole = int8.Int8Weight.quantize(w)
    slabs = int8.Int8Weight.quantize(w, chunk_bytes=5 * 24 * 2)  # 5 rows at a time, a ragged last slab
    assert torch.equal(whole.int8(), slabs.int8()) and torch.equal(whole.scb, slabs.scb)
    empty = int8.Int8Weight.quantize(torch.zeros(0, 24))  # a layer with every unit pruned
    assert not isinstance(empty, int8.Int8Weight) and empty.shape == (0, 24)


def test_refused_on_cpu_with_a_clear_error(tiny_models, tiny_tokens):
    model = StreamedModel.open(tiny_models["llama-gqa-tied"])
    with pytest.raises(BonsaiError, match="CUDA only"):
        int8.Int8Loader(model.loader(device="cpu", dtype=torch.float32))


def _plan(**kw) -> Plan:
    base = dict(device="cpu", dtype="float32", order="layer-major", cache="host", group_rows=10**6, tile_rows=3,
                head_chunk=64, prefetch=True, weights_8bit=False, predicted_peak_bytes=0, predicted_seconds=0,
                budget_bytes=0)
    return Plan(**{**base, **kw})


@pytest.mark.parametrize("case", ["llama-gqa-tied", "qwen2-gqa-bias"])
def test_engine_with_int8_blocks_tracks_full_precision(tiny_models, tiny_tokens, case, monkeypatch):
    # Run the CUDA-only loader on CPU (reference kernels) to test the engine wiring end to end.
    monkeypatch.setattr(int8, "require_cuda", lambda device: None)
    model = StreamedModel.open(tiny_models[case])
    layout = UnitLayout.of(model.layers)
    masks = torch.rand(4, layout.total, generator=torch.Generator().manual_seed(2)) > 0.3
    masks[0] = True
    masks[1, layout.heads[0]] = False  # all heads of a layer gone: zero rows into o_proj
    ref = evaluate(model, tiny_tokens, masks, _plan())
    q = evaluate(model, tiny_tokens, masks, _plan(weights_8bit=True))
    assert torch.isfinite(q.nll).all()
    assert (q.nll - ref.nll).abs().max().item() < 0.05 * ref.nll.abs().max().item(), (q.nll, ref.nll)
    assert (q.nll - ref.nll).abs().max().item() > 0  # it really ran in int8
    assert q.stats.bytes_to_device > 0
