"""`prune --allow-8bit` end to end on a CPU, bitsandbytes' reference kernels standing in for CUDA's
(the planner offers 8-bit weights on CUDA only, so the test turns the loop's allowed plans to 8-bit):
every priors and sub-model pass runs on int8 blocks, the parent's loss on the first windows tracks
the 16/32-bit run's within LLM.int8()'s error, and the export loads. tests/gpu runs it on CUDA."""
from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("bitsandbytes")

import bonsai_lite.prune.loop as loop_mod  # noqa: E402
from bonsai_lite.io.model import StreamedModel  # noqa: E402
from bonsai_lite.search import int8  # noqa: E402
from conftest import prunable_model, prune_small  # noqa: E402

pytestmark = pytest.mark.integration


def check_8bit_prune(parent, tmp_path, monkeypatch, *, device: str, dtype: str, tolerance: float) -> None:
    model, calib = prunable_model(parent, tmp_path)
    ref, ref_key = prune_small(model, calib, tmp_path, "full", device=device, dtype=dtype)
    real, plans, quantised = loop_mod.make_plan, [], []
    real_quantize = int8.Int8Weight.quantize

    def plan(*a, allow_8bit=False, **k):
        p = real(*a, allow_8bit=allow_8bit, **k)
        p = dataclasses.replace(p, weights_8bit=True) if allow_8bit else p
        plans.append(p)
        return p

    def quantize(w, *a, **k):
        quantised.append(w.shape)
        return real_quantize(w, *a, **k)

    monkeypatch.setattr(loop_mod, "make_plan", plan)
    monkeypatch.setattr(int8.Int8Weight, "quantize", staticmethod(quantize))
    q, key = prune_small(model, calib, tmp_path, "int8", device=device, dtype=dtype, allow_8bit=True)

    assert key["allow_8bit"] is True and "allow_8bit" not in ref_key
    assert q["iterations"] == ref["iterations"] == 2
    assert sum(p.weights_8bit for p in plans) >= 2 * q["iterations"]  # priors and sub-models, each iteration
    assert quantised  # int8 blocks were built and used
    a, b = ref["history"][0]["dense_nll"], q["history"][0]["dense_nll"]
    assert a != b and abs(a - b) < tolerance * abs(a), (a, b)  # the same windows on the parent, in int8
    out = StreamedModel.open(tmp_path / "int8")  # the export keeps the checkpoint's weights
    assert out.params() == q["params_after"] < q["params_before"]


def test_prune_with_8bit_weights_tracks_float32(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(int8, "require_cuda", lambda device: None)  # the reference kernels run on a CPU
    check_8bit_prune(tiny_models["llama-gqa-tied"], tmp_path, monkeypatch, device="cpu", dtype="float32",
                     tolerance=0.05)
