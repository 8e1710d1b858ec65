"""Random bf16 checkpoints of real model shapes, for the benchmarks (no hub download here).

`write_random_model` writes sharded safetensors plus index, one shard in host memory at a time
(drawn on the GPU when there is one), so an 8B checkpoint never needs 16 GB of RAM. Shapes come
from the models' config.json alone.
"""
from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bonsai_lite.io.checkpoint import INDEX_NAME  # noqa: E402
from bonsai_lite.structure import load_spec  # noqa: E402

MAX_SHARD = 2 * 2**30  # what hub checkpoints use; the host holds one shard while it is written

LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
             max_position_embeddings=8192, torch_dtype="bfloat16")
SHAPES = {
    "llama-tiny": dict(LLAMA, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True),
    "smollm2-135m": dict(LLAMA, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    "llama3-8b": dict(LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    # the other two 7-8B families of issue 12, from their config.json alone
    "mistral-7b": dict(architectures=["MistralForCausalLM"], model_type="mistral", hidden_act="silu", rms_norm_eps=1e-5,
                       max_position_embeddings=32768, torch_dtype="bfloat16", hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                       tie_word_embeddings=False, rope_theta=1000000.0, sliding_window=None),
    "qwen2.5-7b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6,
                       max_position_embeddings=32768, torch_dtype="bfloat16", hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       tie_word_embeddings=False, rope_theta=1000000.0, use_sliding_window=False),
}
SHAPES["tiny"] = SHAPES["llama-tiny"]


def tensor_shapes(spec) -> list[tuple[str, tuple[int, ...]]]:
    a, h, hd = spec.adapter, spec.hidden, spec.head_dim
    rows = {"q": spec.n_heads * hd, "k": spec.n_kv * hd, "v": spec.n_kv * hd, "o": h, "gate": spec.intermediate,
            "up": spec.intermediate, "down": h}
    cols = {"q": h, "k": h, "v": h, "o": spec.n_heads * hd, "gate": h, "up": h, "down": spec.intermediate}
    out: list[tuple[str, tuple[int, ...]]] = [(a.embed, (spec.vocab, h))]
    for layer in range(spec.n_layers):
        names = a.block_tensor_names(layer)
        out += [(names["attn_norm"], (h,)), (names["mlp_norm"], (h,))]
        out += [(names[f"{r}_w"], (rows[r], cols[r])) for r in rows]
    out.append((a.final_norm, (h,)))
    if not spec.tie_embeddings:
        out.append((a.lm_head, (spec.vocab, h)))
    return out


def write_random_model(shape: str, out: Path, *, device: str, seed: int = 0, layers: int | None = None) -> Path:
    """Random bf16 weights of `shape` (cut to `layers` decoder blocks if given) as sharded
    safetensors plus index; reused when complete.

    Only the shard being written is in host memory (2 GiB for an 8B model; a quarter of the model
    for small ones, so that they are sharded too). The index is written last, by rename: a directory
    without it is an interrupted generation and is written again.
    """
    from safetensors.torch import save_file

    if (out / INDEX_NAME).is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = dict(SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    tensors = tensor_shapes(load_spec(out))
    total = sum(math.prod(s) * 2 for _, s in tensors)
    shard_bytes = min(MAX_SHARD, max(2**20, total // 4))
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shp in tensors:
        if shards[-1] and size + math.prod(shp) * 2 > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shp))
        size += math.prod(shp) * 2
    g = torch.Generator(device=device).manual_seed(seed)
    weight_map = {}
    for i, names in enumerate(shards):
        part = {}
        for name, shp in names:
            if len(shp) == 1:
                part[name] = torch.ones(shp, dtype=torch.bfloat16)
            else:  # std 0.02 as Llama's init: activations stay finite, the loss near log(vocab)
                t = torch.randn(shp, generator=g, device=device, dtype=torch.float32).mul_(0.02)
                part[name] = t.to(torch.bfloat16).cpu()
                del t
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
        del part
    tmp = out / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    tmp.rename(out / INDEX_NAME)
    return out


def shape_spec(shape: str):
    """The ModelSpec of a shape, from its config alone."""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(SHAPES[shape]))
        return load_spec(Path(d))


def shape_bytes(shape: str) -> int:
    return sum(math.prod(s) * 2 for _, s in tensor_shapes(shape_spec(shape)))
