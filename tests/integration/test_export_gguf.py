"""GGUF export: llama.cpp's logits on the GGUF equal transformers' on the safetensors export.

Per-layer structures include a layer with no heads (layer 0, which llama.cpp cannot leave without
heads), a layer with no MLP units, and unequal GQA groups; FLAP-style o/down biases land on those
layers. Needs llama-cpp-python (the `test` extra builds it from source); skipped without it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bonsai_lite.errors import BonsaiError
from bonsai_lite.export import export_pruned
from bonsai_lite.export.gguf import export_gguf
from bonsai_lite.structure import load_spec
from test_export import load_export, per_layer_structure, uniform_structure

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[test]')")

pytestmark = pytest.mark.integration
torch.set_num_threads(2)

CASES = ["llama-gqa-tied", "llama-mha-untied", "mistral-gqa", "qwen2-gqa-bias"]
WANT_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
GGML_TYPE_F32 = 0  # KV cache in f32: llama.cpp's default f16 cache would blur the comparison


def llama_cpp_logits(path, tokens: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=2,
                          type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def hf_logits(out, tokens: list[int], **kw) -> np.ndarray:
    model = load_export(out, **kw)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double().numpy()


def tokens_for(case: str, tiny_tokens) -> list[int]:
    # Mistral's tiny parent attends within 16 tokens; llama.cpp's llama architecture has no window.
    return tiny_tokens[0, : 16 if case.startswith("mistral") else 40].tolist()


def flap_biases(spec, seed: int) -> dict[str, torch.Tensor]:
    """o/down biases on the layer without heads (0), a normal one (1) and the one without MLP units (2)."""
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{l}.{p}.bias": torch.randn(spec.hidden, generator=g) * 0.1
            for l, p in [(0, "self_attn.o_proj"), (1, "mlp.down_proj"), (2, "mlp.down_proj"), (1, "self_attn.o_proj")]}


@pytest.mark.parametrize("biases", [False, True], ids=["plain", "flap-biases"])
@pytest.mark.parametrize("case", CASES)
def test_per_layer_gguf_logits_match_transformers(tiny_models, tiny_tokens, tmp_path, case, biases):
    parent = tiny_models[case]
    spec = load_spec(parent)
    layers = per_layer_structure(spec, seed=CASES.index(case))
    assert not layers[0].heads and not layers[2].mlp  # the traps this test is about
    out = tmp_path / "pruned"
    export_pruned(parent, layers, out, extra_biases=flap_biases(spec, 7) if biases else None)
    result = export_gguf(out, tmp_path / "m.gguf", dtype="f32")
    assert result.arch == "deci"
    counts = [np.bincount(s.kv_map.numpy()) if s.heads else [] for s in layers]
    if any(len(set(c)) > 1 for c in counts):  # unequal groups: K/V heads were duplicated to make them equal
        assert sum(result.kv_heads) > sum(len(s.kv) for s in layers)
    tokens = tokens_for(case, tiny_tokens)
    ref = hf_logits(out, tokens, trust_remote_code=True)
    got = llama_cpp_logits(result.out, tokens)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("all_heads", [False, True], ids=["pruned-heads", "all-heads"])
@pytest.mark.parametrize("case", CASES)
def test_uniform_gguf_is_the_parent_architecture(tiny_models, tiny_tokens, tmp_path, case, all_heads):
    parent = tiny_models[case]
    spec = load_spec(parent)
    group = spec.n_heads // spec.n_kv
    per_group = group if all_heads else max(1, group - 1)
    if not all_heads and spec.n_kv == spec.n_heads:
        per_group = spec.n_heads - 2  # MHA: heads_per_group counts heads
    layers = uniform_structure(spec, seed=1, heads_per_group=per_group, mlp=spec.intermediate // 2)
    out = tmp_path / "uniform"
    export_pruned(parent, layers, out, uniform=True)
    result = export_gguf(out, tmp_path / "u.gguf", dtype="f32")
    full = len(layers[0].heads) * spec.head_dim == spec.hidden
    assert result.arch == (WANT_ARCH[spec.adapter.name] if full else "llama")
    tokens = tokens_for(case, tiny_tokens)
    ref, got = hf_logits(out, tokens), llama_cpp_logits(result.out, tokens)
    assert np.abs(got - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_precision_gguf_stays_close(tiny_models, tiny_tokens, tmp_path, dtype):
    parent = tiny_models["qwen2-gqa-bias"]
    out = tmp_path / "pruned"
    export_pruned(parent, per_layer_structure(load_spec(parent), seed=3), out)
    f32 = export_gguf(out, tmp_path / "f32.gguf", dtype="f32")
    half = export_gguf(out, tmp_path / f"{dtype}.gguf", dtype=dtype)
    assert half.bytes < f32.bytes
    tokens = tokens_for("qwen2", tiny_tokens)
    ref, got = llama_cpp_logits(f32.out, tokens), llama_cpp_logits(half.out, tokens)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9


@pytest.mark.parametrize("mask", [0o022, 0o002], ids=["umask 022", "umask 002"])
def test_gguf_file_follows_the_umask(tiny_models, tmp_path, mask):
    """Issue 11 item 13 for the GGUF writer: mkstemp's 0600 was the file's mode whatever the umask."""
    import os
    import stat

    old = os.umask(mask)
    try:
        out = export_gguf(tiny_models["llama-gqa-tied"], tmp_path / "m.gguf", dtype="f32").out
        plain = tmp_path / "plain"
        plain.write_bytes(b"")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~mask


def test_refuses_to_clobber_and_leaves_nothing_on_failure(tiny_models, tmp_path, monkeypatch):
    parent = tiny_models["llama-gqa-tied"]
    target = tmp_path / "m.gguf"
    target.write_bytes(b"not ours")
    with pytest.raises(BonsaiError, match="already exists"):
        export_gguf(parent, target)
    assert target.read_bytes() == b"not ours"
    with pytest.raises(BonsaiError, match="must end in .gguf"):
        export_gguf(parent, tmp_path / "m.bin")
    with pytest.raises(ValueError, match="dtype"):
        export_gguf(parent, tmp_path / "x.gguf", dtype="q4")

    import bonsai_lite.export.gguf as gmod

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gmod, "_add_tokenizer", boom)
    with pytest.raises(BonsaiError, match="partial file was removed"):
        export_gguf(parent, tmp_path / "y.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_cli_prune_gguf_refuses_unconvertible_tokenizer_before_work(tiny_models, tmp_path, capsys):
    from conftest import prunable_model

    from bonsai_lite.cli.main import main

    model, calib = prunable_model(tiny_models["llama-gqa-tied"], tmp_path)  # a word-level tokenizer
    out = tmp_path / "out"
    rc = main(["prune", str(model), "--sparsity", "0.3", "--out", str(out), "--calib", str(calib), "--preset", "quick",
               "--method", "magnitude", "--device", "cpu", "--gguf", str(tmp_path / "m.gguf")])
    assert rc == 2
    assert "byte-level BPE" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "out.run").exists() and not (tmp_path / "m.gguf").exists()


def test_cli_export_gguf_token_ids_only(tiny_models, tiny_tokens, tmp_path, capsys):
    import json

    from conftest import prunable_model

    from bonsai_lite.cli.main import main

    model, calib = prunable_model(tiny_models["llama-gqa-tied"], tmp_path)
    out = tmp_path / "out"
    assert main(["prune", str(model), "--sparsity", "0.3", "--out", str(out), "--calib", str(calib), "--preset",
                 "quick", "--method", "magnitude", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["export-gguf", str(out), str(tmp_path / "m.gguf"), "--dtype", "f32", "--no-tokenizer", "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["arch"] == "deci"
    tokens = tokens_for("llama", tiny_tokens)
    ref, got = hf_logits(out, tokens, trust_remote_code=True), llama_cpp_logits(info["out"], tokens)
    assert np.abs(got - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())


def test_bench_infer_llama_cpp_runtime(tmp_path, capsys):
    """tools/bench_infer.py --runtime llama.cpp end to end on a tiny random model, f16 and llama.cpp's
    Q8_0 (loaded without the extra buffer types: their AMX Q8_0 kernel dies with SIGILL on this VM)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    import bench_infer

    bench_infer.main(["--shape", "tiny", "--runtime", "llama.cpp", "--quants", "f16,q8_0", "--no-extra-bufts",
                      "--sparsities", "0.5",
                      "--formats", "per-layer", "--prefill-len", "16", "--prompt-len", "4", "--new-tokens", "4",
                      "--repeats", "1", "--warmup", "0", "--threads", "1", "--work-dir", str(tmp_path)])
    import json

    res = json.loads(capsys.readouterr().out)
    assert res["settings"]["runtime"] == "llama.cpp"
    parent, pruned = res["models"]
    assert res["settings"]["extra_bufts"] is False
    for m in (parent, pruned):
        for q in ("f16", "q8_0"):
            g = m["gguf"][q]
            assert g["bytes"] > 0 and g["prompt"]["tokens_per_s"] > 0 and g["generation"]["tokens_per_cpu_s"] > 0
        assert m["gguf"]["q8_0"]["bytes"] < m["gguf"]["f16"]["bytes"]
    assert pruned["gguf"]["f16"]["bytes"] < parent["gguf"]["f16"]["bytes"]
    assert parent["gguf"]["f16"]["prompt_speedup"] == 1.0
