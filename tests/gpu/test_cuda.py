"""The CUDA paths against the CPU references: the streamed engine vs whole-model transformers (every
streaming order, prefetch, pinned host and disk caches), batched masks vs the naive loop, a planner's
budgeted plan within its budget, bf16 and LLM.int8() weights within their rounding of fp32, and a
CLI prune + eval on the GPU against the same eval on the CPU.

Marked `gpu`: CI (no GPU) deselects them. `pytest -m gpu tests/gpu` runs them where CUDA is;
`BONSAI_TEST_DEVICE=cpu pytest -m gpu tests/gpu` runs the same checks on the CPU (the int8 one needs
CUDA), which is how they are themselves checked on a machine without a GPU.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from bonsai_lite.errors import BudgetError
from bonsai_lite.io.model import StreamedModel
from bonsai_lite.search.engine import evaluate
from bonsai_lite.search.machine import detect_machine
from bonsai_lite.search.planner import Plan, Work, make_plan
from bonsai_lite.structure import UnitLayout
from tests.conftest import make_tiny_model, prunable_model
from tests.integration.test_engine import CASES, hf_nll, naive_masked_nll
from tests.integration.test_engine import plan as cpu_plan

DEVICE = os.environ.get("BONSAI_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                                  reason="needs CUDA (BONSAI_TEST_DEVICE=cpu runs it on the CPU)")]


def plan(**kw) -> Plan:
    return cpu_plan(**{"device": DEVICE, **kw})  # test_engine's hand-made plan, on this device


PLANS = {
    "layer-major-host-prefetch": plan(prefetch=True),  # pinned host cache, non-blocking copies both ways
    "layer-major-disk-prefetch": plan(cache="disk", prefetch=True, tile_rows=3),
    "group-major": plan(order="mask-group-major", cache="device", group_rows=4, tile_rows=2, prefetch=True),
    "resident": plan(order="resident", cache="device", group_rows=5, tile_rows=5, head_chunk=211),
}


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 on the GPU must be fp32: TF32 matmuls would hide nothing but loosen every tolerance."""
    if not torch.cuda.is_available():
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_streamed_on_the_device_equals_transformers_on_the_cpu(tiny_models, tiny_tokens, case, plan_name, tmp_path):
    ref = hf_nll(tiny_models[case], tiny_tokens)
    res = evaluate(StreamedModel.open(tiny_models[case]), tiny_tokens, None, PLANS[plan_name], spill_dir=tmp_path)
    assert torch.allclose(res.row_nll[0].float(), ref, atol=2e-4, rtol=0), (res.row_nll[0], ref)


@pytest.mark.parametrize("case", ["llama-gqa-tied", "qwen2-gqa-bias"])
def test_batched_masks_on_the_device_equal_the_naive_loop_on_the_cpu(tiny_models, tiny_tokens, case, tmp_path):
    model = StreamedModel.open(tiny_models[case])
    layout = UnitLayout.of(model.layers)
    masks = torch.rand(6, layout.total, generator=torch.Generator().manual_seed(1)) > 0.4
    masks[0] = True
    masks[1, layout.heads[1]] = False  # every head of a layer removed
    masks[2, layout.mlp[0]] = False  # every MLP unit of a layer removed
    refs = [naive_masked_nll(tiny_models[case], tiny_tokens, m, layout, model.spec.head_dim).item() for m in masks]
    for name in ("layer-major-disk-prefetch", "group-major"):
        res = evaluate(model, tiny_tokens, masks, PLANS[name], spill_dir=tmp_path)
        assert max(abs(a - b) for a, b in zip(res.nll.tolist(), refs)) < 2e-4, (name, res.nll.tolist(), refs)
    assert len({round(v, 4) for v in refs}) > 3  # the masks really change the loss


def _minimum(model, work) -> int:
    try:
        make_plan(model.spec, model.layers, work, detect_machine(device=DEVICE, budget=1))
    except BudgetError as e:
        return e.minimum_bytes
    raise AssertionError("a 1-byte budget was accepted")


def test_a_budgeted_plan_streams_within_its_budget_and_matches(tiny_models, tiny_tokens):
    """The planner's plan under twice its minimum budget: not resident, the same NLL as the whole
    model, and (on CUDA) the GPU memory it allocated within the plan's predicted peak."""
    model = StreamedModel.open(tiny_models["llama-mha-untied"])
    layout = UnitLayout.of(model.layers)
    masks = torch.rand(8, layout.total, generator=torch.Generator().manual_seed(2)) > 0.3
    masks[0] = True
    work = Work(len(masks), *tiny_tokens.shape)
    budget = 2 * _minimum(model, work)
    p = make_plan(model.spec, model.layers, work, detect_machine(device=DEVICE, budget=budget))
    assert p.order != "resident" and p.predicted_peak_bytes <= budget, p.describe()
    unbudgeted = make_plan(model.spec, model.layers, work, detect_machine(device=DEVICE, budget=None))
    cuda = DEVICE.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    res = evaluate(model, tiny_tokens, masks, p)
    if cuda:
        torch.cuda.synchronize()
        used = torch.cuda.max_memory_allocated() - base
        assert used <= p.predicted_peak_bytes, (used, p.describe())
    ref = evaluate(model, tiny_tokens, masks, unbudgeted)
    assert torch.allclose(res.nll, ref.nll, atol=2e-4, rtol=0), (res.nll, ref.nll, p.describe(), unbudgeted.describe())


def test_bf16_on_the_device_is_fp32_within_rounding(tiny_models, tiny_tokens):
    model = StreamedModel.open(tiny_models["mistral-gqa"])
    ref = hf_nll(tiny_models["mistral-gqa"], tiny_tokens)
    res = evaluate(model, tiny_tokens, None, plan(dtype="bfloat16", prefetch=True))
    gap = (res.row_nll[0].float() - ref).abs().max().item()
    assert 0 < gap < 0.05, (res.row_nll[0], ref)  # exactly 0 would mean fp32 ran


@pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="LLM.int8() runs on CUDA only")
def test_int8_weights_on_cuda_are_fp_within_quantisation(tiny_models, tiny_tokens):
    pytest.importorskip("bitsandbytes")
    model = StreamedModel.open(tiny_models["llama-gqa-tied"])
    layout = UnitLayout.of(model.layers)
    masks = torch.rand(4, layout.total, generator=torch.Generator().manual_seed(3)) > 0.4
    masks[0] = True
    full = evaluate(model, tiny_tokens, masks, plan(dtype="float16"))
    q = evaluate(model, tiny_tokens, masks, plan(dtype="float16", weights_8bit=True, prefetch=True))
    rel = ((q.nll - full.nll).abs() / full.nll).max().item()
    assert 0 < rel < 0.02, (q.nll, full.nll)  # exactly 0 would mean the weights were not quantised
    # the ranking of sub-models, what the search uses, survives quantisation
    assert torch.equal(q.nll.argsort(), full.nll.argsort()), (q.nll, full.nll)


@pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="LLM.int8() runs on CUDA only")
def test_prune_with_8bit_weights_on_cuda_tracks_fp16(tiny_models, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from tests.integration.test_int8_prune import check_8bit_prune

    check_8bit_prune(tiny_models["llama-gqa-tied"], tmp_path, monkeypatch, device=DEVICE, dtype="float16",
                     tolerance=0.02)


def test_cli_prune_on_the_device_then_eval_matches_the_cpu(tmp_path, capsys):
    from bonsai_lite.cli import main as cli

    model, text = prunable_model(make_tiny_model(tmp_path / "parent", "llama-mha-untied", seed=5), tmp_path)
    out = tmp_path / "pruned"
    assert cli.main(["prune", str(model), "--out", str(out), "--sparsity", "0.3", "--p-iter", "0.15",
                     "--method", "bonsai", "--masks-per-iter", "8", "--calib", str(text), "--calib-samples", "2",
                     "--seq-len", "32", "--device", DEVICE, "--memory-budget", "1GB", "--json"]) == 0
    run = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(run["history"]) == 2, run
    ppl = {}
    for device in (DEVICE, "cpu"):
        assert cli.main(["eval", str(out), "--data", str(text), "--seq-len", "32", "--max-tokens", "512",
                         "--device", device, "--dtype", "float32", "--json"]) == 0
        ppl[device] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]
    assert abs(ppl[DEVICE] - ppl["cpu"]) <= 1e-4 * ppl["cpu"], ppl
