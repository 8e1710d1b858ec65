"""The slicing plan shared by every export format: which tensors leave the parent, cut how, with what shape.

`plan_shards` fixes every output tensor (name, shape, dtype, where it comes from) before a byte is
written; `materialise` then reads one parent tensor and cuts it. The safetensors writer streams the
plan shard by shard; the GGUF writer streams the same tensors under llama.cpp's names.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bonsai_lite.io.checkpoint import SINGLE_NAME, Checkpoint
from bonsai_lite.ops import equal_kv_groups
from bonsai_lite.prune.slicing import slice_param
from bonsai_lite.structure import LayerStructure, ModelSpec

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class OutTensor:
    """One tensor of an output shard and where it comes from."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    source: str | None = None  # parent tensor read (and sliced when `role` is set)
    layer: int | None = None
    role: str | None = None  # slicing role (adapters.SLICE_RULES key, or a norm: unchanged)
    is_bias: bool = False
    value: torch.Tensor | None = field(default=None, compare=False, repr=False)  # given (extra bias); else zeros


@dataclass(frozen=True)
class ShardJob:
    file: str
    tensors: tuple[OutTensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(math.prod(t.shape) * t.dtype.itemsize for t in self.tensors)

    @property
    def params(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors)



def plan_shards(spec: ModelSpec, ckpt: Checkpoint, layers: tuple[LayerStructure, ...], bias_roles: list[frozenset[str]],
                extra: dict[str, torch.Tensor], *, dtype: torch.dtype | None) -> list[ShardJob]:
    """One job per parent shard that keeps a tensor, every output shape and dtype fixed in advance."""
    a, head_dim = spec.adapter, spec.head_dim
    block: dict[str, tuple[int, str]] = {}  # full name -> (layer, role key such as "q_w", "attn_norm")
    for l in range(spec.n_layers):
        for key, name in a.block_tensor_names(l).items():
            block[name] = (l, key)
            if not key.endswith("_b"):
                ckpt.info(name)  # a missing weight or norm fails here, before anything is written
    # Tied embeddings: the head is the embedding; a checkpoint that stores both keeps one.
    skip = {a.lm_head} if spec.tie_embeddings and a.lm_head != a.embed else set()
    out_dtype = lambda d: dtype if dtype is not None and d.is_floating_point else d  # noqa: E731
    per_file: dict[Path, list[OutTensor]] = {}
    unknown = []
    for name, info in ckpt.infos.items():
        tensors = per_file.setdefault(info.file, [])
        if name in skip:
            continue
        if name not in block:  # embedding, final norm, head (and anything unknown): unchanged
            if name not in (a.embed, a.final_norm, a.lm_head):
                unknown.append(name)
            tensors.append(OutTensor(name, info.shape, out_dtype(info.dtype), source=name))
            continue
        l, key = block[name]
        is_bias = key.endswith("_b")
        role = key[:-2] if key.endswith(("_w", "_b")) else key
        if is_bias and (role not in bias_roles[l] or name in extra):
            continue  # written below (an extra bias replaces the parent's)
        shape = _sliced_shape(info.shape, role, is_bias, layers[l], head_dim)
        tensors.append(OutTensor(name, shape, out_dtype(info.dtype), source=name, layer=l, role=role, is_bias=is_bias))
    if unknown:
        log.warning("copying %d tensor(s) the %s adapter does not know unchanged: %s", len(unknown), a.name,
                    ", ".join(unknown[:5]))
    for l, roles in enumerate(bias_roles):  # biases the parent lacks: given, or zeros a stock flag needs
        names = a.block_tensor_names(l)
        for role in sorted(roles):
            name, weight = names[f"{role}_b"], names[f"{role}_w"]
            if name in ckpt.infos and name not in extra:
                continue
            w = ckpt.info(weight)
            shape = (_sliced_shape(w.shape, role, False, layers[l], head_dim)[0],)
            value = extra.get(name)
            if value is not None:
                if tuple(value.shape) != shape:
                    raise ValueError(f"extra bias {name}: shape {tuple(value.shape)}, the exported layer needs {shape}")
                if not bool(torch.isfinite(value).all()):
                    raise ValueError(f"extra bias {name} has NaN or infinite values")
            per_file[w.file].append(OutTensor(name, shape, out_dtype(w.dtype), layer=l, value=value))
    kept = [ts for ts in per_file.values() if ts]
    files = [SINGLE_NAME] if len(kept) == 1 else [f"model-{i:05d}-of-{len(kept):05d}.safetensors"
                                                 for i in range(1, len(kept) + 1)]
    return [ShardJob(f, tuple(ts)) for f, ts in zip(files, kept)]



def materialise(t: OutTensor, source: Checkpoint, layers, head_dim: int) -> torch.Tensor:
    if t.source is not None:
        x = source.read(t.source)
        if t.role is not None:
            x = slice_param(x, t.role, is_bias=t.is_bias, layer=layers[t.layer], head_dim=head_dim)
    elif t.value is not None:
        x = t.value
    else:
        x = torch.zeros(t.shape, dtype=t.dtype)
    x = x.to(t.dtype).contiguous()
    if tuple(x.shape) != t.shape:  # the plan and the slicing disagree: a bug, never bad input
        raise RuntimeError(f"{t.name}: planned shape {t.shape}, sliced {tuple(x.shape)}")
    return x


def _sliced_shape(shape, role: str, is_bias: bool, layer: LayerStructure, head_dim: int) -> tuple[int, ...]:
    """The shape `slice_param` will produce, computed on the meta device (same code, no data)."""
    meta = torch.empty(tuple(shape), device="meta")
    return tuple(slice_param(meta, role, is_bias=is_bias, layer=layer, head_dim=head_dim).shape)


def check_structure(spec: ModelSpec, layers: tuple[LayerStructure, ...]) -> None:
    if len(layers) != spec.n_layers:
        raise ValueError(f"structure has {len(layers)} layers, the parent model has {spec.n_layers}")
    for l, (s, p) in enumerate(zip(layers, spec.layers)):
        kv_of_slot = dict(zip(p.heads, p.kv_of_head))
        if list(s.heads) != sorted(set(s.heads)) or not set(s.heads) <= set(p.heads):
            raise ValueError(f"layer {l}: heads {list(s.heads)} must be distinct ascending head slots of the parent "
                             f"(0..{len(p.heads) - 1})")
        if list(s.kv_of_head) != [kv_of_slot[h] for h in s.heads]:
            raise ValueError(f"layer {l}: kv_of_head {list(s.kv_of_head)} disagrees with the parent, whose heads "
                             f"{list(s.heads)} read key/value heads {[kv_of_slot[h] for h in s.heads]}")
        if list(s.mlp) != sorted(set(s.mlp)) or not set(s.mlp) <= set(p.mlp):
            raise ValueError(f"layer {l}: MLP units must be distinct ascending units of the parent "
                             f"(0..{len(p.mlp) - 1})")


def check_uniform(layers: tuple[LayerStructure, ...]) -> None:
    widths = [(len(s.heads), len(s.kv), len(s.mlp)) for s in layers]
    if len(set(widths)) != 1:
        raise ValueError(f"uniform export needs the same (heads, KV heads, MLP units) in every layer; got {widths}. "
                         "Prune with the uniform option, or export per-layer")
    heads, kv, mlp = widths[0]
    if heads == 0 or mlp == 0:
        raise ValueError(f"uniform export cannot remove every head or every MLP unit (got {heads} heads, {mlp} units)")
    for l, s in enumerate(layers):
        if not equal_kv_groups(s.kv_map.tolist(), kv):
            raise ValueError(f"uniform export: layer {l} maps its heads to key/value heads {s.kv_map.tolist()}; "
                             f"a stock GQA config needs each of the {kv} KV heads to serve the same number of "
                             "consecutive heads. Export per-layer instead")


def biases_per_layer(spec: ModelSpec, ckpt: Checkpoint, extra: dict, *, uniform: bool):
    """Roles with a bias in each layer, and (uniform) the stock config flags that enable them."""
    a = spec.adapter
    where: dict[str, tuple[int, str]] = {}
    per_layer: list[set[str]] = []
    for l in range(spec.n_layers):
        names = a.block_tensor_names(l)
        per_layer.append({r for r in a.projections() if names[f"{r}_b"] in ckpt.infos})
        where.update({names[f"{r}_b"]: (l, r) for r in a.projections()})
    unknown = sorted(set(extra) - set(where))
    if unknown:
        raise ValueError(f"extra_biases {unknown[:3]} are not projection biases of this model "
                         f"(expected names like {a.block_tensor_names(0)['o_b']!r})")
    for name in extra:
        l, role = where[name]
        per_layer[l].add(role)
    if not uniform:
        return [frozenset(s) for s in per_layer], {}
    always, flags = a.stock_biases, dict(a.stock_bias_flags)
    wanted = set().union(*per_layer)
    on = {flag: bool(wanted & set(roles)) for flag, roles in flags.items()}
    covered = set(always).union(*(flags[f] for f, v in on.items() if v))
    if wanted - covered:
        raise ValueError(f"uniform export writes a stock {a.name} config, which has no switch for biases on "
                         f"{sorted(wanted - covered)}; export per-layer (loads with trust_remote_code=True) instead")
    return [frozenset(covered)] * spec.n_layers, on
