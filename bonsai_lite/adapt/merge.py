"""Fold the fine-tuned weights into the pruned checkpoint, shard by shard, atomically.

The output has exactly the pruned model's tensor names, shapes, dtypes, shard layout, config and
modeling files, so the adapted model is exactly as fast as the pruned one. The merge is streamed
from the pruned checkpoint: W' = W + scaling * B @ A for each LoRA'd linear map (peft's
`merge_and_unload` arithmetic, done in float32 or wider and cast back to the checkpoint's dtype), a trained
tensor for a full fine-tune, and the untouched bytes otherwise. One shard is in memory at a time;
every shard is validated before the first is written.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save

from bonsai_lite.errors import BonsaiError, CheckpointError
from bonsai_lite.io.checkpoint import Checkpoint
from bonsai_lite.io.outdir import check_destination, check_free_space, publish, staging_dir

ADAPT_META = "bonsai_adapt.json"


@dataclass(frozen=True)
class LoraDelta:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scaling: float

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.b.to(dtype) @ self.a.to(dtype)) * self.scaling


def lora_deltas(peft_model) -> dict[str, LoraDelta]:
    """Checkpoint tensor name -> LoRA factors, for every adapted linear map of a peft model."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    out = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            if getattr(module, "use_dora", {}).get("default", False):
                raise BonsaiError("DoRA adapters are not merged by bonsai-lite")
            out[f"{name}.weight"] = LoraDelta(module.lora_A["default"].weight.detach().cpu(),
                                              module.lora_B["default"].weight.detach().cpu(),
                                              float(module.scaling["default"]))
    return out


def _validate(ckpt: Checkpoint, lora: dict[str, LoraDelta], replaced: dict[str, torch.Tensor]) -> None:
    for name, d in lora.items():
        info = ckpt.infos.get(name)
        want = (d.b.shape[0], d.a.shape[1])
        if info is None or tuple(info.shape) != want:
            raise CheckpointError(f"{ckpt.root}: LoRA on {name!r} ({want[0]}x{want[1]}) has no matching tensor "
                                  f"in the pruned checkpoint ({'missing' if info is None else info.shape})")
    for name, t in replaced.items():
        info = ckpt.infos.get(name)
        if info is None or tuple(info.shape) != tuple(t.shape):
            raise CheckpointError(f"{ckpt.root}: trained tensor {name!r} {tuple(t.shape)} has no matching tensor in "
                                  f"the pruned checkpoint ({'missing' if info is None else info.shape})")


def export_adapted(pruned_dir: str | Path, out: str | Path, *, lora: dict[str, LoraDelta] | None = None,
                   replaced: dict[str, torch.Tensor] | None = None, overwrite: bool = False,
                   metadata: dict | None = None, parent_dir: str | Path | None = None) -> Path:
    """Write `out`: the pruned checkpoint with LoRA deltas merged and/or tensors replaced.

    Staged in a uniquely named hidden directory beside `out` and renamed into place; on any failure
    the staging directory is removed and nothing else is touched (a user's `OUT.tmp/` or `OUT.old/`
    included).
    """
    lora, replaced = lora or {}, replaced or {}
    src, out = Path(pruned_dir), Path(out)
    check_destination(out, {"pruned model": src, "parent model": parent_dir}, overwrite=overwrite)
    ckpt = Checkpoint(src)
    _validate(ckpt, lora, replaced)
    shards: dict[Path, list[str]] = {}
    for name, info in ckpt.infos.items():
        shards.setdefault(info.file, []).append(name)
    need = sum(f.stat().st_size for f in src.iterdir() if f.is_file())
    try:
        check_free_space(out.parent, need, what=f"the adapted model {out}")
        tmp = staging_dir(out)
    except OSError as e:
        raise BonsaiError(f"cannot write to {out.parent} ({e.strerror or e})") from e
    try:
        for f in src.iterdir():  # config, tokenizer, index, modeling files: everything but the weights
            if f.is_file() and f.suffix != ".safetensors":
                shutil.copy2(f, tmp / f.name)
        for file, names in shards.items():
            tensors = {}
            for name in names:
                t = ckpt.read(name)
                if name in replaced:
                    t = replaced[name].detach().to("cpu", t.dtype)
                elif name in lora:  # in float32 at least, whatever the checkpoint's dtype
                    work = torch.promote_types(t.dtype, torch.float32)
                    t = (t.to(work) + lora[name].delta(work)).to(t.dtype)
                tensors[name] = t.contiguous()
            (tmp / file.name).write_bytes(save(tensors, metadata={"format": "pt"}))
            del tensors
        meta = {"adapted_from": str(src.resolve()), "lora_modules": len(lora), "replaced_tensors": len(replaced),
                **(metadata or {})}
        (tmp / ADAPT_META).write_text(json.dumps(meta, indent=1, default=str))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        publish(tmp, out, overwrite=overwrite)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BonsaiError(f"could not write {out} ({e.strerror or e}); the partial output was removed and the "
                          "training state is kept: free disk space and re-run the same command to export again") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
