"""Export a pruned structure: per parent shard read -> slice -> write; index rebuilt; atomic rename.

Each parent shard becomes one output shard, written by a job (`write_shard`) that returns its
bytes and weight map; the caller rebuilds `model.safetensors.index.json`. A shard is streamed
tensor by tensor, so at most one parent tensor and its slice are in memory. Everything that can be
checked is checked before the first byte is written: the structure against the parent, every
output shape and dtype, extra biases, the config transformers will read, free disk space. The
export goes to a hidden temporary directory beside the output and is renamed into place when
complete, so a crash or a full disk never leaves something that looks like a finished model.

Two formats (docs/export.md):
- per-layer (default): config.json keeps the parent's architecture and global widths and adds
  `bonsai_per_layer` (heads, KV heads, kv_map, MLP width and biases of every layer) and an
  `auto_map` to `modeling_bonsai.py`, shipped in the checkpoint; transformers loads it with
  `trust_remote_code=True`, bonsai-lite's own loader reads the entries directly.
- uniform: every layer keeps the same widths and equal consecutive GQA groups, so the output is a
  stock config with no custom code (transformers, vLLM, llama.cpp).
"""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import struct
import tempfile
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from bonsai_lite import __version__
from bonsai_lite.errors import BonsaiError
from bonsai_lite.io.checkpoint import DTYPES, INDEX_NAME, SINGLE_NAME, Checkpoint
from bonsai_lite.prune.faults import checkpoint
from bonsai_lite.prune.slicing import slice_param
from bonsai_lite.prune.state import fsync_dir
from bonsai_lite.structure import PER_LAYER_KEY, LayerStructure, ModelSpec, load_spec, read_config

log = logging.getLogger(__name__)

MODELING_FILE = "modeling_bonsai.py"
EXPORT_INFO = "bonsai_export.json"
# Tokenizer, generation and licence files travel with the weights. Parent remote code (*.py) never does.
COPIED_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.tiktoken",
                "generation_config.json", "chat_template*", "LICENSE*", "NOTICE*", "USE_POLICY*")
# Free space wanted beyond the planned bytes: filesystems slow down and fail late when nearly full,
# and headers, config and tokenizer files add a little: 2% plus 64 MiB.
DISK_HEADROOM_FACTOR, DISK_HEADROOM_BYTES = 1.02, 64 * 2**20
# Projection biases a stock transformers config can express, per adapter: roles whose modules always
# carry a bias, and config flags that switch a bias on for several roles at once (the ones the flag
# covers but the model lacks are written as zeros). Architecture knowledge: it belongs with the
# adapters, and stays here until `Adapter` has a field for it.
STOCK_BIASES: dict[str, tuple[tuple[str, ...], dict[str, tuple[str, ...]]]] = {
    "llama": ((), {"attention_bias": ("q", "k", "v", "o"), "mlp_bias": ("gate", "up", "down")}),
    "mistral": ((), {}),
    "qwen2": (("q", "k", "v"), {}),
}
_ST_DTYPE = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class ExportResult:
    out: Path
    params: int  # parameters written (a tied head counted once)
    shards: tuple[str, ...]  # shard file names, in order
    bytes: int  # tensor bytes written (the index's total_size)


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


@dataclass(frozen=True)
class ShardResult:
    file: str
    nbytes: int
    params: int
    weight_map: dict[str, str]


def export_pruned(parent_dir, layers: tuple[LayerStructure, ...], out_dir, *, uniform: bool = False,
                  extra_biases: dict[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None,
                  overwrite: bool = False, metadata: dict | None = None,
                  show_progress: bool | None = None) -> ExportResult:
    """Write the parent checkpoint cut to `layers` (kept checkpoint slots per layer) to `out_dir`.

    `extra_biases` maps full bias names (e.g. "model.layers.3.self_attn.o_proj.bias") to tensors to
    write (FLAP bias compensation); they replace the parent's bias of that name if it has one.
    `dtype` casts floating tensors (default: keep the parent's). Raises ValueError for a structure or
    bias that cannot be exported as asked, BonsaiError for file-system problems; on any failure the
    output is absent (or, with overwrite, the previous one untouched) and no temporary files remain.
    """
    parent, out = Path(parent_dir), Path(out_dir)
    _check_destination(parent, out, overwrite=overwrite)
    if dtype is not None and (not dtype.is_floating_point or dtype not in _ST_DTYPE):
        raise ValueError(f"dtype {dtype}: export writes float16, bfloat16, float32 or float64")
    spec, ckpt = load_spec(parent), Checkpoint(parent)
    layers = tuple(layers)
    _check_structure(spec, layers)
    if uniform:
        _check_uniform(layers)
    extra = {name: torch.as_tensor(t).detach().cpu() for name, t in (extra_biases or {}).items()}
    bias_roles, flags = _bias_roles(spec, ckpt, extra, uniform=uniform)
    config = _config(spec, read_config(parent), layers, bias_roles, flags, uniform=uniform, dtype=dtype)
    _check_config(config, uniform=uniform)
    jobs = plan_shards(spec, ckpt, layers, bias_roles, extra, dtype=dtype)
    params = sum(j.params for j in jobs)
    info = _export_info(parent, layers, uniform=uniform, dtype=dtype, params=params, extra=extra, metadata=metadata)
    assets = sorted({p for pattern in COPIED_FILES for p in parent.glob(pattern) if p.is_file()})
    need = sum(j.nbytes for j in jobs) + sum(p.stat().st_size for p in assets)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _check_disk(out.parent, need)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise BonsaiError(f"cannot write to {out.parent}: {e.strerror or e}") from e
    try:
        results = [write_shard(job, ckpt, layers, spec.head_dim, tmp) for job in _progress(jobs, show_progress)]
        if len(results) > 1:
            weight_map = {name: r.file for r in results for name in r.weight_map}
            index = {"metadata": {"total_size": sum(r.nbytes for r in results), "total_parameters": params},
                     "weight_map": dict(sorted(weight_map.items()))}
            _write_text(tmp / INDEX_NAME, json.dumps(index, indent=2) + "\n")
        for path in assets:
            shutil.copyfile(path, tmp / path.name)
        if not uniform:
            asset = resources.files("bonsai_lite.export_assets").joinpath(MODELING_FILE)
            _write_text(tmp / MODELING_FILE, asset.read_text(encoding="utf-8"))
        _write_text(tmp / EXPORT_INFO, info)
        _write_text(tmp / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
        _publish(tmp, out, overwrite=overwrite)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise BonsaiError(
                f"disk full while exporting to {out} (about {_gb(need)} needed, {_gb(_free(out.parent))} free now); "
                "the partial export was removed: free some space or choose another output directory") from e
        raise BonsaiError(f"export to {out} failed: {e}; the partial export was removed") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum(r.nbytes for r in results)
    log.info("exported %d parameters (%s) in %d shard(s) to %s", params, _gb(total), len(results), out)
    return ExportResult(out=out, params=params, shards=tuple(r.file for r in results), bytes=total)


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


def write_shard(job: ShardJob, source: Checkpoint, layers: tuple[LayerStructure, ...], head_dim: int,
                folder: Path) -> ShardResult:
    """Stream one safetensors shard: header from the plan, then each tensor read, sliced, cast, written."""
    # Widest dtype first so every tensor starts aligned to its element size (as safetensors does).
    order = sorted(job.tensors, key=lambda t: (-t.dtype.itemsize, t.name))
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in order:
        n = math.prod(t.shape) * t.dtype.itemsize
        header[t.name] = {"dtype": _ST_DTYPE[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(folder / job.file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in order:
            x = _materialise(t, source, layers, head_dim)
            f.write(memoryview(x.reshape(-1).view(torch.uint8).numpy()))
            del x
        f.flush()
        os.fsync(f.fileno())  # the rename publishes the export; its bytes must be on disk first
    checkpoint("export")  # test hook (prune/faults.py): a kill here leaves a half-written export
    return ShardResult(job.file, offset, job.params, {t.name: job.file for t in order})


def _materialise(t: OutTensor, source: Checkpoint, layers, head_dim: int) -> torch.Tensor:
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


def _check_structure(spec: ModelSpec, layers: tuple[LayerStructure, ...]) -> None:
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


def _check_uniform(layers: tuple[LayerStructure, ...]) -> None:
    widths = [(len(s.heads), len(s.kv), len(s.mlp)) for s in layers]
    if len(set(widths)) != 1:
        raise ValueError(f"uniform export needs the same (heads, KV heads, MLP units) in every layer; got {widths}. "
                         "Prune with the uniform option, or export per-layer")
    heads, kv, mlp = widths[0]
    if heads == 0 or mlp == 0:
        raise ValueError(f"uniform export cannot remove every head or every MLP unit (got {heads} heads, {mlp} units)")
    group = heads // kv
    for l, s in enumerate(layers):
        if heads % kv or s.kv_map.tolist() != [h // group for h in range(heads)]:
            raise ValueError(f"uniform export: layer {l} maps its heads to key/value heads {s.kv_map.tolist()}; "
                             f"a stock GQA config needs each of the {kv} KV heads to serve the same number of "
                             "consecutive heads. Export per-layer instead")


def _bias_roles(spec: ModelSpec, ckpt: Checkpoint, extra: dict, *, uniform: bool):
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
    always, flags = STOCK_BIASES.get(a.name, ((), {}))
    wanted = set().union(*per_layer)
    on = {flag: bool(wanted & set(roles)) for flag, roles in flags.items()}
    covered = set(always).union(*(flags[f] for f, v in on.items() if v))
    if wanted - covered:
        raise ValueError(f"uniform export writes a stock {a.name} config, which has no switch for biases on "
                         f"{sorted(wanted - covered)}; export per-layer (loads with trust_remote_code=True) instead")
    return [frozenset(covered)] * spec.n_layers, on


def _config(spec: ModelSpec, raw: dict, layers, bias_roles, flags: dict, *, uniform: bool, dtype) -> dict:
    cfg = {k: v for k, v in raw.items() if k not in (PER_LAYER_KEY, "auto_map")}
    cfg["head_dim"] = spec.head_dim  # explicit: hidden_size // heads no longer holds after pruning
    if dtype is not None:
        cfg["dtype"] = str(dtype).removeprefix("torch.")
        cfg.pop("torch_dtype", None)
    if uniform:
        s = layers[0]
        cfg.update(num_attention_heads=len(s.heads), num_key_value_heads=len(s.kv), intermediate_size=len(s.mlp),
                   **flags)
        return cfg
    from bonsai_lite.export_assets.modeling_bonsai import FAMILIES  # needs transformers' model modules

    arch = next(x for x in raw.get("architectures") or () if x in spec.adapter.architectures)
    if arch not in FAMILIES:
        raise ValueError(f"{arch}: {MODELING_FILE} has no per-layer class for it; export with uniform=True")
    config_cls, model_cls = FAMILIES[arch]
    module = {r: m.rsplit(".", 1)[-1] for r, m in spec.adapter.projections().items()}
    cfg[PER_LAYER_KEY] = [
        {"num_attention_heads": len(s.heads), "num_key_value_heads": len(s.kv), "kv_map": s.kv_map.tolist(),
         "intermediate_size": len(s.mlp), "biases": sorted(module[r] for r in roles)}
        for s, roles in zip(layers, bias_roles)
    ]
    stem = MODELING_FILE.removesuffix(".py")
    cfg["auto_map"] = {"AutoConfig": f"{stem}.{config_cls}", "AutoModelForCausalLM": f"{stem}.{model_cls}"}
    return cfg


def _check_config(cfg: dict, *, uniform: bool) -> None:
    """Build the config the way transformers (and load_spec) will, so a rejected one is never written."""
    from transformers import AutoConfig

    try:
        AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    except Exception as e:  # noqa: BLE001 - validators raise several types (hub's strict dataclass errors)
        hint = "; keep widths transformers accepts, or export per-layer" if uniform else ""
        raise ValueError(f"transformers rejects the exported {cfg['model_type']} config: {e}{hint}") from e


def _export_info(parent: Path, layers, *, uniform: bool, dtype, params: int, extra: dict, metadata) -> str:
    info = {
        "bonsai_lite": __version__, "parent": str(parent), "format": "uniform" if uniform else "per-layer",
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."), "params": params,
        "extra_biases": sorted(extra),
        # Kept parent slots per layer: what was pruned, relative to the parent checkpoint.
        "layers": [{"heads": list(s.heads), "kv_of_head": list(s.kv_of_head), "mlp": list(s.mlp)} for s in layers],
        "metadata": metadata or {},
    }
    try:
        return json.dumps(info, indent=1) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(f"export metadata must be JSON-serialisable: {e}") from e


def _check_destination(parent: Path, out: Path, *, overwrite: bool) -> None:
    p, o = parent.resolve(), out.resolve()
    if o == p or o in p.parents:
        raise BonsaiError(f"{out}: exporting there would replace the parent model {parent}; choose another directory")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise BonsaiError(f"{out} exists and is not a directory; remove it or choose another output")
        if not overwrite:
            raise BonsaiError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it, "
                              "or choose another output directory")


def _publish(tmp: Path, out: Path, *, overwrite: bool) -> None:
    """Rename the finished export into place; an existing output is swapped out only at this point."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise BonsaiError(f"{out} appeared while exporting; not replacing it (pass overwrite=True)")
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(old, out)
            raise
        if old.is_symlink():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
    fsync_dir(out.parent)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _check_disk(folder: Path, need: int) -> None:
    want = int(need * DISK_HEADROOM_FACTOR) + DISK_HEADROOM_BYTES
    free = _free(folder)
    if free < want:
        raise BonsaiError(f"not enough disk space to export: about {_gb(want)} needed, {_gb(free)} free on {folder}; "
                          "free some space or choose another output directory")


def _free(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _progress(jobs: list[ShardJob], show: bool | None):
    from tqdm import tqdm

    # None: drawn when stderr is a terminal; False: never (--quiet / --json)
    return tqdm(jobs, desc="  export", unit="shard", disable=None if show is not False else True, leave=False)
