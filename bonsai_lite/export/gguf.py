"""Export a pruned model directory to one GGUF file for llama.cpp (and Ollama, LM Studio, which embed it).

Per-layer exports become llama.cpp's `deci` architecture, which builds every layer with its own
query heads, key/value heads and FFN width; uniform exports keep the parent's own architecture
(`llama` for Llama and Mistral, `qwen2`), so any llama.cpp build reads them. Tensors come from the
same slicing plan as the safetensors writer (`export/plan.py`) and are written one at a time.

What llama.cpp's `deci` loader needs beyond the widths (checked against llama.cpp's source, as
vendored in llama-cpp-python 0.3.36, and by tests/integration/test_export_gguf.py):
- key/value groups are contiguous and equal within a layer. Pruning query heads leaves unequal
  groups; `gqa_layout` reorders the query heads (with the matching columns of o_proj: exact) and
  writes a K/V head once per group of `gcd(group sizes)` heads (exact; costs KV-cache only).
- a layer that keeps attention but has FFN width 0 is skipped whole: such a layer gets one FFN
  unit with zero weights. A layer with no heads must not be layer 0 (the loader takes the head size
  from it) and has no place for an o_proj bias: those get one zero head (zero q/k/v/o weights).
- `key_length`/`value_length` are written explicitly (hidden / heads no longer holds).
- `llama`/`deci` rotate interleaved pairs where transformers rotates halves: q/k rows (and biases)
  are permuted per head; `qwen2` rotates halves like transformers and needs no permutation.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from bonsai_lite.errors import BonsaiError, CheckpointError
from bonsai_lite.export.plan import biases_per_layer, materialise, plan_shards
from bonsai_lite.io import gguf as gio
from bonsai_lite.io.checkpoint import Checkpoint
from bonsai_lite.io.outdir import file_mode
from bonsai_lite.structure import PER_LAYER_KEY, load_spec, read_config

log = logging.getLogger(__name__)

# llama.cpp architectures whose rotary embedding rotates halves of each head, as transformers does.
NEOX_ROPE_ARCHS = frozenset({"qwen2"})
# llama.cpp architectures that size q and o as hidden x hidden, whatever the head count says.
FULL_WIDTH_ARCHS = frozenset({"qwen2"})
_TORCH = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class GgufResult:
    out: Path
    arch: str
    bytes: int
    tensors: int
    kv_heads: tuple[int, ...]  # key/value heads written per layer (more than kept where groups were unequal)


@dataclass(frozen=True)
class LayerLayout:
    """How one pruned layer is written: head order, K/V heads written, padding llama.cpp needs."""

    heads: int  # query heads written (1 for a stand-in zero head)
    kv_heads: int
    ffn: int  # FFN width written (1 for a stand-in zero unit)
    head_order: tuple[int, ...]  # kept query heads, in written order
    kv_order: tuple[int, ...]  # kept K/V head written in each K/V slot
    zero_head: bool
    zero_ffn: bool


def gqa_layout(kv_map: list[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Query-head order and the K/V head of each written K/V slot such that contiguous equal groups
    (llama.cpp: head h reads K/V slot h // (heads / kv_heads)) reproduce `kv_map` exactly."""
    if not kv_map:
        return (), ()
    group = math.gcd(*Counter(kv_map).values())
    order = tuple(sorted(range(len(kv_map)), key=lambda h: (kv_map[h], h)))
    return order, tuple(kv_map[h] for h in order[::group])


def layer_layout(kv_map: list[int], ffn: int, *, first: bool, o_bias: bool, down_bias: bool) -> LayerLayout:
    order, kv_order = gqa_layout(kv_map)
    zero_head = not order and (first or o_bias)
    heads = 1 if zero_head else len(order)
    zero_ffn = ffn == 0 and (heads > 0 or down_bias)
    return LayerLayout(heads=heads, kv_heads=1 if zero_head else len(kv_order), ffn=1 if zero_ffn else ffn,
                       head_order=order, kv_order=kv_order, zero_head=zero_head, zero_ffn=zero_ffn)


def rope_pairs(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of q/k (weight or bias) from transformers' half rotation to llama.cpp's pair rotation."""
    n = x.shape[0] // head_dim
    return x.reshape(n, 2, head_dim // 2, *x.shape[1:]).transpose(1, 2).reshape(x.shape)


def to_layout(x: torch.Tensor, role: str, *, is_bias: bool, lay: LayerLayout, head_dim: int, pairs: bool) -> torch.Tensor:
    """One block tensor in transformers' layout (as the plan materialises it) -> as written to GGUF."""
    rows = role in ("q", "k", "v") or (is_bias and role in ("gate", "up"))
    if role in ("q", "k", "v", "o"):
        if role == "o" and is_bias:
            return x
        if lay.zero_head:  # stand-in head: zero weights (shape of one head)
            shape = (head_dim, x.shape[-1]) if rows and not is_bias else (head_dim,) if is_bias else (x.shape[0], head_dim)
            return torch.zeros(shape, dtype=x.dtype)
        order = lay.head_order if role in ("q", "o") else lay.kv_order
        idx = (torch.tensor(order, dtype=torch.long)[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
        x = x.index_select(0 if role != "o" else 1, idx)
        if pairs and role in ("q", "k"):
            x = rope_pairs(x, head_dim)
        return x
    if role in ("gate", "up", "down") and lay.zero_ffn:
        if role == "down":
            return x if is_bias else torch.zeros((x.shape[0], 1), dtype=x.dtype)
        return torch.zeros((1,) if is_bias else (1, x.shape[-1]), dtype=x.dtype)
    return x


def export_gguf(model_dir, out_path, *, dtype: str = "f16", tokenizer: bool = True, overwrite: bool = False) -> GgufResult:
    """Write the model in `model_dir` (a bonsai-lite export or any supported model) to `out_path` as GGUF.

    `dtype`: f32, f16 or bf16 for matrices (norms and biases stay f32). `tokenizer`: carry the
    tokenizer (from the parent's GGUF when the model descends from one, else converted from a
    byte-level BPE tokenizer.json); False writes token ids only. Raises ValueError for a model
    llama.cpp cannot express, BonsaiError for file problems; a failed export leaves nothing behind.
    """
    model_dir, out = Path(model_dir), Path(out_path)
    if dtype not in gio.FILE_TYPES:
        raise ValueError(f"dtype {dtype!r}: GGUF export writes {', '.join(gio.FILE_TYPES)}")
    if out.suffix != ".gguf":
        raise BonsaiError(f"{out}: the output file name must end in .gguf")
    if out.is_dir() or ((out.exists() or out.is_symlink()) and not overwrite):
        raise BonsaiError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it, or choose another file")
    spec, ckpt, raw = load_spec(model_dir), Checkpoint(model_dir), read_config(model_dir)
    a, hd = spec.adapter, spec.head_dim
    per_layer = bool(raw.get(PER_LAYER_KEY))
    arch = "deci" if per_layer else a.gguf_arch
    if arch in FULL_WIDTH_ARCHS and len(spec.layers[0].heads) * hd != spec.hidden:
        log.info("llama.cpp's %s needs heads x head size = hidden size; writing the pruned model as llama", arch)
        arch = "llama"  # same blocks (q/k/v biases included), widths read from the metadata
    pairs = arch not in NEOX_ROPE_ARCHS
    base = _rope_base(spec)
    if spec.sliding_window is not None and spec.sliding_window < raw.get("max_position_embeddings", 0):
        log.warning("%s attends within a %d-token window; llama.cpp's %s attends over the whole context, so "
                    "outputs differ beyond %d tokens", model_dir, spec.sliding_window, arch, spec.sliding_window)
    layers = spec.layers
    roles, _ = biases_per_layer(spec, ckpt, {}, uniform=False)
    layouts = [layer_layout(s.kv_map.tolist(), len(s.mlp), first=l == 0, o_bias="o" in roles[l],
                            down_bias="down" in roles[l]) for l, s in enumerate(layers)]
    if not per_layer and any(x.zero_head or x.zero_ffn or x.kv_heads != len(s.kv) for x, s in zip(layouts, layers)):
        raise ValueError(f"{model_dir}: a stock config with widths llama.cpp's {arch} cannot build; re-export per-layer")
    tensors = _plan(spec, ckpt, layers, roles, layouts, pairs=pairs, out_dtype=_TORCH[dtype])
    tok = _tokenizer(model_dir, raw, spec.vocab) if tokenizer else None
    need = sum(n for _, _, _, n, _ in tensors)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=out.parent)
        os.close(fd)
        os.chmod(tmp_name, file_mode())  # like any file the user creates, not mkstemp's 0600
    except OSError as e:
        raise BonsaiError(f"cannot write to {out.parent}: {e.strerror or e}") from e
    tmp = Path(tmp_name)
    try:
        _write(tmp, arch, spec, raw, layouts, tensors, tok, dtype=dtype, rope_base=base, per_layer=per_layer,
               name=model_dir.resolve().name)
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise BonsaiError(f"GGUF export to {out} failed: {e}; the partial file was removed") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("wrote %s (%s, %d tensors, %.1f MiB)", out, arch, len(tensors), need / 2**20)
    return GgufResult(out=out, arch=arch, bytes=out.stat().st_size, tensors=len(tensors),
                      kv_heads=tuple(x.kv_heads if x.heads else 0 for x in layouts))


# (GGUF name, shape, torch dtype, bytes, producer)
_Tensor = tuple[str, tuple[int, ...], torch.dtype, int, Callable[[], torch.Tensor]]


def _plan(spec, ckpt, layers, roles, layouts: list[LayerLayout], *, pairs: bool, out_dtype) -> list[_Tensor]:
    a, hd = spec.adapter, spec.head_dim
    jobs = plan_shards(spec, ckpt, layers, roles, {}, dtype=None)
    names = {a.embed: "embed", a.final_norm: "final_norm", a.lm_head: "lm_head"}
    out: list[_Tensor] = []
    for t in (t for job in jobs for t in job.tensors):
        if t.layer is None:
            if t.name not in names:
                raise ValueError(f"{t.name}: llama.cpp has no place for this tensor")
            gname, fn = gio.tensor_name(names[t.name], None), (lambda t=t: materialise(t, ckpt, layers, hd))
        else:
            lay, bias = layouts[t.layer], t.is_bias
            attn = t.role in ("q", "k", "v", "o") or t.role == "attn_norm"
            mlp = t.role in ("gate", "up", "down") or t.role == "mlp_norm"
            if (attn and lay.heads == 0) or (mlp and lay.ffn == 0):
                continue  # the sub-block is absent in llama.cpp too (no tensor may be left unread)
            gname = gio.tensor_name(t.role, t.layer, bias=bias)
            fn = (lambda t=t, lay=lay: to_layout(materialise(t, ckpt, layers, hd), t.role, is_bias=t.is_bias,
                                                 lay=lay, head_dim=hd, pairs=pairs))
        shape = _shape_of(t, layouts, hd, spec.hidden)
        dt = out_dtype if len(shape) > 1 else torch.float32
        out.append((gname, shape, dt, math.prod(shape) * dt.itemsize, fn))
    return out


def _shape_of(t, layouts: list[LayerLayout], hd: int, hidden: int) -> tuple[int, ...]:
    """The written shape, from the plan's shape and the layout (no data read)."""
    if t.layer is None or t.role in ("attn_norm", "mlp_norm"):
        return t.shape
    lay = layouts[t.layer]
    if t.is_bias and t.role in ("o", "down"):
        return t.shape
    if t.role in ("q", "o"):
        n = lay.heads * hd
        return (n,) if t.is_bias else (n, hidden) if t.role == "q" else (hidden, n)
    if t.role in ("k", "v"):
        n = lay.kv_heads * hd
        return (n,) if t.is_bias else (n, hidden)
    n = lay.ffn
    return (n,) if t.is_bias else (n, hidden) if t.role in ("gate", "up") else (hidden, n)


def _rope_base(spec) -> float:
    hf = spec.hf_config
    params = getattr(hf, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"rotary scaling {params.get('rope_type')!r}: GGUF export handles default rotary embeddings only")
    return float(params.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))


def _tokenizer(model_dir: Path, raw: dict, vocab: int):
    """Tokenizer metadata: copied from the parent's GGUF when there is one, else converted, else none."""
    gguf_file = _parent_gguf(model_dir)
    if gguf_file is not None:
        fields = gio.gguf_tokenizer_fields(gguf_file)
        n = next((len(v) for k, v, _, _ in fields if k == "tokenizer.ggml.tokens"), None)
        if n != vocab:
            raise ValueError(f"{gguf_file}: its tokenizer has {n} tokens, the model {vocab} embeddings")
        log.info("tokenizer: copied from the parent's GGUF %s", gguf_file)
        return ("copy", fields)
    if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "vocab.json").is_file():
        log.warning("%s has no tokenizer; the GGUF carries token ids only (tokenizer model 'none')", model_dir)
        return None
    log.info("tokenizer: converted from %s/tokenizer.json (byte-level BPE)", model_dir)
    return ("hf", gio.hf_bpe_tokenizer(model_dir, vocab))


def check_tokenizer(model_dir) -> None:
    """Raise ValueError now if `export_gguf(model_dir, tokenizer=True)` would fail on the tokenizer."""
    model_dir = Path(model_dir)
    if _parent_gguf(model_dir) is None and ((model_dir / "tokenizer.json").is_file() or (model_dir / "vocab.json").is_file()):
        gio.hf_bpe_tokenizer(model_dir, load_spec(model_dir).vocab)


def _parent_gguf(model_dir: Path) -> Path | None:
    """The demo's GGUF when `model_dir` is the converted demo model or an export of it."""
    from bonsai_lite.demo import MANIFEST_NAME, file_sha256, find_demo_gguf

    here = model_dir
    info = model_dir / "bonsai_export.json"
    if not (here / MANIFEST_NAME).is_file() and info.is_file():
        try:
            here = Path(json.loads(info.read_text())["parent"])
        except (ValueError, KeyError, TypeError):
            return None
    try:
        manifest = json.loads((here / MANIFEST_NAME).read_text())
        path = find_demo_gguf()
    except (OSError, ValueError, CheckpointError):
        return None
    if file_sha256(path) != manifest.get("gguf_sha256"):
        log.warning("%s is not the GGUF %s was converted from; converting the tokenizer instead", path, here)
        return None
    return path


def _write(path: Path, arch: str, spec, raw: dict, layouts, tensors: list[_Tensor], tok, *, dtype: str,
           rope_base: float, per_layer: bool, name: str) -> None:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(path, arch)
    w.add_name(name)
    w.add_context_length(int(raw.get("max_position_embeddings", 2048)))
    w.add_embedding_length(spec.hidden)
    w.add_block_count(spec.n_layers)
    per = lambda f: [f(x) for x in layouts] if per_layer else f(layouts[0])  # noqa: E731
    w.add_feed_forward_length(per(lambda x: x.ffn))
    w.add_head_count(per(lambda x: x.heads))
    w.add_head_count_kv(per(lambda x: x.kv_heads))
    w.add_key_length(spec.head_dim)
    w.add_value_length(spec.head_dim)
    w.add_rope_dimension_count(spec.head_dim)
    w.add_rope_freq_base(rope_base)
    w.add_layer_norm_rms_eps(spec.eps)
    w.add_vocab_size(spec.vocab)
    w.add_file_type(getattr(gguf.LlamaFileType, gio.FILE_TYPES[dtype][1]))
    _add_tokenizer(w, tok)
    raw_types = {torch.float32: None, torch.float16: None, torch.bfloat16: gguf.GGMLQuantizationType.BF16}
    np_types = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}
    for gname, shape, dt, nbytes, _ in tensors:
        w.add_tensor_info(gname, shape, np.dtype(np_types[dt]), nbytes, raw_dtype=raw_types[dt])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for gname, shape, dt, _, fn in _progress(tensors):
        x = fn().to(dt).contiguous()
        if tuple(x.shape) != shape:  # plan and layout disagree: a bug, never bad input
            raise RuntimeError(f"{gname}: planned shape {shape}, produced {tuple(x.shape)}")
        w.write_tensor_data((x.view(torch.int16) if dt == torch.bfloat16 else x).numpy())
        del x
    for f in w.fout or ():
        f.flush()
        os.fsync(f.fileno())
    w.close()


def _add_tokenizer(w, tok) -> None:
    if tok is None:
        w.add_tokenizer_model("none")
        return
    kind, data = tok
    if kind == "copy":
        for key, value, vtype, sub in data:
            w.add_key_value(key, value, vtype, sub_type=sub)
        return
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(data["pre"])
    w.add_token_list(data["tokens"])
    w.add_token_types(data["types"])
    data["special"].add_to_gguf(w, quiet=True)


def _progress(items):
    from tqdm import tqdm

    return tqdm(items, desc="export-gguf", unit="tensor", disable=None, leave=False)
