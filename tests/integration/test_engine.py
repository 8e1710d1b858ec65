"""Streamed engine vs whole-model transformers; batched masks vs a naive per-mask loop."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from bonsai_lite.io.model import StreamedModel
from bonsai_lite.ops import attention, rotary_cos_sin
from bonsai_lite.search.engine import evaluate
from bonsai_lite.search.planner import Plan
from bonsai_lite.structure import UnitLayout

pytestmark = pytest.mark.integration
CASES = ["llama-gqa-tied", "llama-mha-untied", "mistral-gqa", "qwen2-gqa-bias"]


def plan(**kw) -> Plan:
    base = dict(device="cpu", dtype="float32", order="layer-major", cache="host", group_rows=10**6, tile_rows=2,
                head_chunk=50, prefetch=False, weights_8bit=False, predicted_peak_bytes=0, predicted_seconds=0,
                budget_bytes=0)
    return Plan(**{**base, **kw})


PLANS = {
    "layer-major-host": plan(),
    "layer-major-disk-prefetch": plan(cache="disk", prefetch=True, tile_rows=3),
    "group-major": plan(order="mask-group-major", cache="device", group_rows=4, tile_rows=2),
    "resident": plan(order="resident", cache="device", group_rows=5, tile_rows=5, head_chunk=211),
}


def hf_nll(model_dir, tokens) -> torch.Tensor:
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = m(tokens).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                                             reduction="none").reshape(tokens.shape[0], -1).mean(1)


def test_fixture_is_sharded(tiny_models):
    for path in tiny_models.values():
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) >= 2


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_streamed_dense_equals_transformers(tiny_models, tiny_tokens, case, plan_name):
    ref = hf_nll(tiny_models[case], tiny_tokens)
    res = evaluate(StreamedModel.open(tiny_models[case]), tiny_tokens, None, PLANS[plan_name])
    assert torch.allclose(res.row_nll[0].float(), ref, atol=1e-4, rtol=0), (res.row_nll[0], ref)


def naive_masked_nll(model_dir, tokens, mask, layout, head_dim) -> torch.Tensor:
    """Reference: zero the o_proj / down_proj input columns of pruned units in a transformers model."""
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for l, layer in enumerate(m.model.layers):
            hm = mask[layout.heads[l]]
            col = hm.repeat_interleave(head_dim).float()
            layer.self_attn.o_proj.weight.mul_(col[None, :])
            layer.mlp.down_proj.weight.mul_(mask[layout.mlp[l]].float()[None, :])
        logits = m(tokens).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


@pytest.mark.parametrize("case", CASES)
def test_batched_masks_equal_naive_loop(tiny_models, tiny_tokens, case):
    model = StreamedModel.open(tiny_models[case])
    layout = UnitLayout.of(model.layers)
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(6, layout.total, generator=g) > 0.4
    masks[0] = True
    masks[1, layout.heads[1]] = False  # every head of a layer removed
    masks[2, layout.mlp[0]] = False  # every MLP unit of a layer removed
    masks[3, layout.heads[2]] = False
    masks[3, layout.mlp[2]] = False
    for p in (PLANS["layer-major-disk-prefetch"], PLANS["group-major"]):
        res = evaluate(model, tiny_tokens, masks, p)
        for k in range(len(masks)):
            ref = naive_masked_nll(tiny_models[case], tiny_tokens, masks[k], layout, model.spec.head_dim)
            assert abs(res.nll[k].item() - ref.item()) < 1e-4, (case, k, res.nll[k].item(), ref.item())
    assert len(set(round(v, 4) for v in res.nll.tolist())) > 3  # masks really change the loss


def test_loaded_blocks_know_their_gqa_layout_without_reading_kv_map(tiny_models, tiny_tokens):
    """The loader tells attention whether the GQA groups are stock (a host fact), so attention never
    reads kv_map back from the device; the pruned, unequal layout still gathers its K/V heads."""
    model = StreamedModel.open(tiny_models["llama-gqa-tied"])
    s = model.layers[0]
    assert len(s.heads) > len(s.kv) > 1
    keep = torch.ones(len(s.heads), dtype=torch.bool)
    keep[0] = False  # one head fewer in the first K/V group: groups of unequal size
    pruned = model.with_layers((s.keep(heads=keep, mlp=torch.ones(len(s.mlp), dtype=torch.bool)),)
                               + model.layers[1:])
    spec = model.spec
    cos, sin = rotary_cos_sin(*model.rope(seq_len=tiny_tokens.shape[1]), torch.arange(tiny_tokens.shape[1]),
                              torch.float32)
    x = torch.randn(2, tiny_tokens.shape[1], spec.hidden, generator=torch.Generator().manual_seed(0))
    for m, equal in ((model, True), (pruned, False)):
        w = m.loader(device="cpu", dtype=torch.float32).block(0)
        assert w.kv_equal is equal
        ref = attention(dataclasses.replace(w, kv_equal=None), x, cos, sin)  # derives it from kv_map
        assert torch.allclose(attention(w, x, cos, sin), ref, atol=1e-6)
        if equal:  # a kv_map that cannot be read back (no data) is never read
            out = attention(dataclasses.replace(w, kv_map=w.kv_map.to("meta")), x, cos, sin)
            assert torch.allclose(out, ref, atol=1e-6)
