"""config.json against the tensors, when a model is opened: one clear line per disagreement, before any work.

A config whose widths disagree with the weights (an `intermediate_size` smaller than the tensors), a
tensor whose header dtype differs from its siblings', or integer (quantised) weights would otherwise
be read and pruned as if they were what the config says, giving a perplexity and an export that
mean nothing. Only headers are looked at: no weight bytes are read.
"""
from __future__ import annotations

import re
from collections import Counter

from bonsai_lite.errors import CheckpointError
from bonsai_lite.io.checkpoint import Checkpoint
from bonsai_lite.structure import LayerStructure, ModelSpec

# Tensor-name endings that quantisation libraries add next to integer weights (bitsandbytes' LLM.int8
# `.SCB`, 4-bit `.absmax`/`.quant_map`, GPTQ/AWQ `.qweight`/`.scales`/`.qzeros`, FP8 `.weight_scale`).
QUANT_SUFFIXES = (".SCB", ".weight_format", ".absmax", ".quant_map", ".quant_state", ".qweight", ".qzeros", ".scales",
                  ".g_idx", ".weight_scale", ".input_scale")
DEQUANTISE = ("bonsai-lite prunes float weights only: dequantise it first (load it with transformers and "
              "save_pretrained in float16/bfloat16)")


def expected_shapes(spec: ModelSpec, layers: tuple[LayerStructure, ...]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Full tensor name -> (shape the config implies, why), for every weight, norm and possible bias."""
    a, h, d = spec.adapter, spec.hidden, spec.head_dim
    out = {a.embed: ((spec.vocab, h), "vocab_size x hidden_size"), a.final_norm: ((h,), "hidden_size")}
    if not spec.tie_embeddings or a.lm_head != a.embed:
        out[a.lm_head] = ((spec.vocab, h), "vocab_size x hidden_size")
    for l, s in enumerate(layers):
        nh, nkv, m = len(s.heads), len(s.kv), len(s.mlp)
        q, kv = (nh * d, f"{nh} heads x head_dim {d}"), (nkv * d, f"{nkv} KV heads x head_dim {d}")
        mlp = (m, f"intermediate_size {m}")
        names = a.block_tensor_names(l)
        for role, (rows, cols) in {"q": (q, None), "k": (kv, None), "v": (kv, None), "o": (None, q),
                                   "gate": (mlp, None), "up": (mlp, None), "down": (None, mlp)}.items():
            if rows is not None:
                out[names[f"{role}_w"]] = ((rows[0], h), f"{rows[1]}, by hidden_size {h}")
                out[names[f"{role}_b"]] = ((rows[0],), rows[1])
            else:
                out[names[f"{role}_w"]] = ((h, cols[0]), f"hidden_size {h}, by {cols[1]}")
                out[names[f"{role}_b"]] = ((h,), f"hidden_size {h}")
        out[names["attn_norm"]] = ((h,), "hidden_size")
        out[names["mlp_norm"]] = ((h,), "hidden_size")
    return out


def check_model(spec: ModelSpec, ckpt: Checkpoint, layers: tuple[LayerStructure, ...]) -> None:
    """Every tensor the model uses has the shape config.json implies and a floating dtype shared by its kind."""
    root = ckpt.root
    quant = [n for n in ckpt.infos if n.endswith(QUANT_SUFFIXES)]
    if quant:
        raise CheckpointError(f"{root}: a quantised checkpoint (tensor {quant[0]!r}); {DEQUANTISE}")
    block = re.compile(re.escape(spec.adapter.layer).replace(r"\{\}", r"(\d+)"))
    extra = [n for n in ckpt.infos if (m := block.match(n)) and int(m.group(1)) >= len(layers)]
    if extra:
        raise CheckpointError(f"{root}: the checkpoint has tensors of more layers than config.json's "
                              f"num_hidden_layers {len(layers)} ({extra[0]!r}); config.json and the weights disagree")
    want = expected_shapes(spec, layers)
    optional_head = spec.tie_embeddings  # a tied model may or may not store lm_head
    matrices: dict[str, object] = {}
    for name, (shape, why) in want.items():
        info = ckpt.infos.get(name)
        if info is None:
            if name.endswith(".bias") or (optional_head and name == spec.adapter.lm_head):
                continue
            raise CheckpointError(f"{root}: tensor {name!r} is missing from the checkpoint; re-download it")
        if not info.dtype.is_floating_point:
            raise CheckpointError(f"{root}: tensor {name!r} is {str(info.dtype).replace('torch.', '')}, not a float "
                                  f"(a quantised checkpoint?); {DEQUANTISE}")
        if tuple(info.shape) != shape:
            raise CheckpointError(f"{root}: tensor {name!r} has shape {list(info.shape)} but config.json implies "
                                  f"{list(shape)} ({why}); config.json and the weights disagree: fix or re-download one")
        if len(shape) == 2:
            matrices[name] = info.dtype
    # One dtype for the weight matrices: a header whose dtype was rewritten (or a shard from another
    # download) would be read as other numbers of the same byte count. Norms and biases may differ.
    counts = Counter(matrices.values())
    if len(counts) > 1:
        common = counts.most_common(1)[0][0]
        odd = next(n for n, dt in matrices.items() if dt != common)
        raise CheckpointError(f"{root}: tensor {odd!r} is {str(matrices[odd]).replace('torch.', '')} while the other "
                              f"weight matrices are {str(common).replace('torch.', '')}; the checkpoint is inconsistent: "
                              "re-download it or convert it to one dtype")
