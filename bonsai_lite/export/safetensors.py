"""Export a pruned structure: per parent shard read -> slice -> write; index rebuilt; atomic rename.

Each parent shard becomes one output shard, written by a job (`write_shard`) that returns its
bytes and weight map; the caller rebuilds `model.safetensors.index.json`. A shard is streamed
tensor by tensor, so at most one parent tensor and its slice are in memory. Everything that can be
checked is checked before the first byte is written: the structure against the parent, every
output shape and dtype, extra biases, the config transformers will read, free disk space. The
export goes to a hidden temporary directory beside the output and is renamed into place when
complete, so a crash or a full disk never leaves something that looks like a finished model.

The tensors and their slicing come from `export/plan.py`, shared with the GGUF writer.

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
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from bonsai_lite import __version__
from bonsai_lite.errors import BonsaiError
from bonsai_lite.export.plan import ShardJob, biases_per_layer, check_structure, check_uniform, materialise, plan_shards
from bonsai_lite.io.checkpoint import DTYPES, INDEX_NAME, Checkpoint
from bonsai_lite.io.outdir import publish, staging_dir
from bonsai_lite.prune.faults import checkpoint
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
_ST_DTYPE = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class ExportResult:
    out: Path
    params: int  # parameters written (a tied head counted once)
    shards: tuple[str, ...]  # shard file names, in order
    bytes: int  # tensor bytes written (the index's total_size)


@dataclass(frozen=True)
class ShardResult:
    file: str
    nbytes: int
    params: int
    weight_map: dict[str, str]


def export_pruned(parent_dir, layers: tuple[LayerStructure, ...], out_dir, *, uniform: bool = False,
                  extra_biases: dict[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None,
                  overwrite: bool = False, metadata: dict | None = None,
                  show_progress: bool | None = None, overlay=None) -> ExportResult:
    """Write the parent checkpoint cut to `layers` (kept checkpoint slots per layer) to `out_dir`.

    `extra_biases` maps full bias names (e.g. "model.layers.3.self_attn.o_proj.bias") to tensors to
    write (FLAP bias compensation); they replace the parent's bias of that name if it has one.
    `overlay` is a folder of tensors that replace the parent's before slicing (the refitted
    projections, prune/refit.py). `dtype` casts floating tensors (default: keep the parent's).
    Raises ValueError for a structure or bias that cannot be exported as asked, BonsaiError for
    file-system problems; on any failure the output is absent (or, with overwrite, the previous one
    untouched) and no temporary files remain.
    """
    parent, out = Path(parent_dir), Path(out_dir)
    _check_destination(parent, out, overwrite=overwrite)
    if dtype is not None and (not dtype.is_floating_point or dtype not in _ST_DTYPE):
        raise ValueError(f"dtype {dtype}: export writes float16, bfloat16, float32 or float64")
    spec, ckpt = load_spec(parent), Checkpoint(parent, overlay=overlay)
    layers = tuple(layers)
    check_structure(spec, layers)
    if uniform:
        check_uniform(layers)
    extra = {name: torch.as_tensor(t).detach().cpu() for name, t in (extra_biases or {}).items()}
    bias_roles, flags = biases_per_layer(spec, ckpt, extra, uniform=uniform)
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
        tmp = staging_dir(out)  # unique hidden name, permissions from the umask (not mkdtemp's 0700)
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
        publish(tmp, out, overwrite=overwrite)
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
            x = materialise(t, source, layers, head_dim)
            f.write(memoryview(x.reshape(-1).view(torch.uint8).numpy()))
            del x
        f.flush()
        os.fsync(f.fileno())  # the rename publishes the export; its bytes must be on disk first
    checkpoint("export")  # test hook (prune/faults.py): a kill here leaves a half-written export
    return ShardResult(job.file, offset, job.params, {t.name: job.file for t in order})


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
