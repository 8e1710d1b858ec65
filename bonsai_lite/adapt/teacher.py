"""Teacher cache: the parent's top-k logits and log-sum-exp per token, streamed once, kept on disk.

Distillation then needs no parent in memory (paper section 4: "caching the logits from the parent
model instead of hosting the model in memory during fine-tuning"). The parent is streamed with the
engine's pieces (`BlockLoader`, `ops.block_forward`, an `ActivationCache`, the LM head in vocabulary
chunks through `RunningTopK`), a pass of windows at a time, never loaded whole.

Layout of a cache directory (numpy .npy files, opened memory-mapped; no pickles):

    manifest.json   what was cached (parent fingerprint, tokens hash, k, seq_len, dtypes) and how
                    many windows are done; rewritten atomically after each pass
    tokens.npy      int32 [W, T]   the windows the cache was built for
    values.npy      float32|float16 [W, T, k]  top-k logits, largest first
    indices.npy     int32 [W, T, k]  their vocabulary indices
    lse.npy         float32 [W, T]   log-sum-exp over the whole vocabulary
    tail.npy        float32 [W, T]   log-sum-exp over the tokens outside the top-k (-inf when k = V)

An interrupted build resumes at the first window not yet done; a cache built for other tokens, k,
or another parent is refused rather than silently replaced.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from transformers.activations import ACT2FN

from bonsai_lite.adapt.distill import RunningTopK
from bonsai_lite.errors import BonsaiError, CheckpointError
from bonsai_lite.io.model import StreamedModel
from bonsai_lite.ops import block_forward, rms_norm, rotary_cos_sin
from bonsai_lite.prune.state import atomic_write_bytes
from bonsai_lite.search.cache import ActivationCache
from bonsai_lite.search.machine import detect_machine
from bonsai_lite.search.planner import Work, make_plan

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ARRAYS = ("values", "indices", "lse", "tail")
FORMAT = 1
# Tokens per pass: the unit of resumption. Each pass streams the parent's weights once more, so a
# pass must be long enough that weight reads stay small next to its compute (2^18 tokens of a 7B
# model is ~7 s of H100 compute vs ~7 s to re-read 14 GB), and short enough to lose little when killed.
PASS_TOKENS = 2**18
# Bytes per token and cached logit held while a pass runs: fp32 value + int64 index, and the
# concatenated candidates of one chunk update (the planner already counts the chunk's logits).
TOPK_STATE_BYTES = 2 * (4 + 8)


def tokens_sha256(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int32).contiguous().numpy().tobytes()).hexdigest()


def cache_bytes(windows: int, seq_len: int, k: int, values_dtype: str = "float32") -> int:
    """Disk bytes of a teacher cache (tokens, top-k values and indices, two log-sum-exps per token)."""
    return windows * seq_len * (k * (np.dtype(values_dtype).itemsize + 4) + 3 * 4)


def parent_fingerprint(model: StreamedModel) -> str:
    """config.json plus every tensor's name, dtype and shape: cheap, and changes with the weights' layout."""
    return model.fingerprint()


@dataclass
class TeacherCache:
    """Read side: memory-mapped arrays; `batch(rows)` returns torch tensors for those windows."""

    root: Path
    manifest: dict
    values: np.ndarray
    indices: np.ndarray
    lse: np.ndarray
    tail: np.ndarray

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def complete(self) -> bool:
        return self.manifest["windows_done"] >= self.manifest["windows"]

    @classmethod
    def open(cls, root: str | Path) -> "TeacherCache":
        root = Path(root)
        try:
            manifest = json.loads((root / MANIFEST).read_text())
            arrays = {n: np.load(root / f"{n}.npy", mmap_mode="r", allow_pickle=False)
                      for n in ARRAYS}
        except (OSError, ValueError, json.JSONDecodeError) as e:
            raise BonsaiError(f"{root}: teacher cache is unreadable ({e.__class__.__name__}); delete the directory "
                              "to rebuild it") from e
        return cls(root, manifest, **arrays)

    def batch(self, rows, device=None) -> tuple[torch.Tensor, ...]:
        """(values, indices, lse, tail) of windows `rows`, as float32 / int64 / float32 / float32."""
        rows = np.asarray(rows)
        if rows.size and rows.max() >= self.manifest["windows_done"]:
            raise BonsaiError(f"{self.root}: teacher cache holds {self.manifest['windows_done']} windows, "
                              f"window {int(rows.max())} was asked for")
        out = (torch.from_numpy(np.ascontiguousarray(self.values[rows])).float(),
               torch.from_numpy(np.ascontiguousarray(self.indices[rows])).long(),
               torch.from_numpy(np.ascontiguousarray(self.lse[rows])),
               torch.from_numpy(np.ascontiguousarray(self.tail[rows])))
        return tuple(t.to(device) for t in out) if device is not None else out


def _expected_manifest(parent: StreamedModel, tokens: torch.Tensor, k: int, values_dtype: str,
                       compute_dtype: str) -> dict:
    w, t = tokens.shape
    return {"format": FORMAT, "parent": str(parent.root.resolve()), "parent_fingerprint": parent_fingerprint(parent),
            "tokens_sha256": tokens_sha256(tokens), "windows": w, "seq_len": t, "k": k, "vocab": parent.spec.vocab,
            "values_dtype": values_dtype, "compute_dtype": compute_dtype}


def _resume_or_create(root: Path, want: dict, tokens: torch.Tensor) -> dict:
    """The manifest to continue from: an existing one with the same settings, or a fresh cache."""
    path = root / MANIFEST
    if path.is_file():
        try:
            have = json.loads(path.read_text())
        except json.JSONDecodeError:
            have = {}
        differ = sorted(key for key in want if key != "parent" and have.get(key) != want[key])
        if differ:
            raise BonsaiError(f"{root}: a teacher cache for other settings is there ({', '.join(differ)} differ); "
                              "delete it or pass another --teacher-cache directory")
        return have
    created = not root.exists()
    w, t, k = want["windows"], want["seq_len"], want["k"]
    files = [root / "tokens.npy", *(root / f"{name}.npy" for name in ARRAYS)]
    try:
        root.mkdir(parents=True, exist_ok=True)
        np.save(files[0], tokens.to(torch.int32).numpy(), allow_pickle=False)
        for name, dtype, shape in (("values", want["values_dtype"], (w, t, k)), ("indices", "int32", (w, t, k)),
                                   ("lse", "float32", (w, t)), ("tail", "float32", (w, t))):
            np.lib.format.open_memmap(root / f"{name}.npy", mode="w+", dtype=dtype, shape=shape).flush()
            _preallocate(root / f"{name}.npy")
        manifest = {**want, "windows_done": 0}
        atomic_write_bytes(path, json.dumps(manifest, indent=1).encode())
    except (OSError, BonsaiError) as e:
        for f in files:  # only what this call created
            f.unlink(missing_ok=True)
        if created:
            shutil.rmtree(root, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) else str(e)
        raise BonsaiError(f"cannot create the teacher cache in {root} ({reason}); free disk space or pass another "
                          "--teacher-cache directory") from e
    return manifest


def _preallocate(path: Path) -> None:
    """Reserve the blocks of a sparse memmapped file now: a write into a hole of a full filesystem
    is a SIGBUS that kills the process with no message, long after the check could have said so."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDWR)
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
        else:  # no fallocate: touch every page so the filesystem allocates it (or fails) now
            with open(fd, "r+b", closefd=False) as f:
                for pos in range(0, size, 4096):
                    f.seek(pos)
                    b = f.read(1)
                    f.seek(pos)
                    f.write(b or b"\0")
    finally:
        os.close(fd)


def teacher_pass(model: StreamedModel, tokens: torch.Tensor, *, k: int, tile_rows: int, head_chunk: int,
                 cache_location: str, device, dtype: torch.dtype, spill_dir=None):
    """Top-k logits [n, T, k], indices [n, T, k], log-sum-exp and tail log-sum-exp [n, T] on `tokens` [n, T].

    Layer-major: all n windows go through block l before block l + 1 is read, so the weights are
    read once per pass; hidden states wait in an ActivationCache (device, host or disk).
    """
    spec = model.spec
    n, t = tokens.shape
    loader = model.loader(device=device, dtype=dtype)
    inv_freq, scaling = model.rope(seq_len=t)
    cos, sin = rotary_cos_sin(inv_freq, scaling, torch.arange(t, device=device), dtype)
    act = ACT2FN[spec.act]
    uniq, local = torch.unique(tokens, return_inverse=True)
    emb = loader.embedding_rows(uniq)  # only the rows of tokens that occur
    cache = ActivationCache(rows=n, tokens=t, hidden=spec.hidden, dtype=dtype, location=cache_location,
                            device=device, spill_dir=spill_dir)
    tiles = [slice(a, min(n, a + tile_rows)) for a in range(0, n, tile_rows)]
    try:
        for s in tiles:
            cache.put(s, emb[local[s]])
        del emb
        with torch.no_grad():
            for layer in range(spec.n_layers):
                w = loader.block(layer)
                for s in tiles:
                    x = block_forward(w, cache.get(s), cos, sin, eps=spec.eps, act=act, window=spec.window(layer))
                    cache.put(s, x)
                    del x
                del w
            norm_w = loader.final_norm()
            for s in tiles:  # the cache now holds what the LM head reads
                cache.put(s, rms_norm(cache.get(s), norm_w, spec.eps))
            acc = {s.start: RunningTopK((s.stop - s.start) * t, k, device) for s in tiles}
            for v0, wc in loader.head_chunks(head_chunk):  # chunk-major: each chunk of the head read once
                for s in tiles:
                    acc[s.start].update(cache.get(s).reshape(-1, spec.hidden), wc, v0)
                del wc
    finally:
        cache.close()
    values = torch.cat([acc[s.start].values.cpu() for s in tiles]).reshape(n, t, -1)
    indices = torch.cat([acc[s.start].indices.cpu() for s in tiles]).reshape(n, t, -1)
    lse = torch.cat([acc[s.start].lse.cpu() for s in tiles]).reshape(n, t)
    tail = torch.cat([acc[s.start].tail.cpu() for s in tiles]).reshape(n, t)
    return values, indices, lse, tail


def build_teacher_cache(parent_dir: str | Path, tokens: torch.Tensor, cache_dir: str | Path, *, k: int,
                        values_dtype: str = "float32", budget: int | None = None, device: str | None = None,
                        dtype: str | None = None, spill_dir=None,
                        progress: Callable[[int, int], None] | None = None) -> TeacherCache:
    """Cache the parent's top-k logits and log-sum-exp for every window of `tokens` [W, T]; resumable."""
    parent = StreamedModel.open(parent_dir)
    spec = parent.spec
    if not 1 <= k <= spec.vocab:
        raise BonsaiError(f"--top-k must be in [1, {spec.vocab}] (the vocabulary), got {k}")
    if values_dtype not in ("float32", "float16"):
        raise BonsaiError(f"teacher values are stored as float32 or float16, not {values_dtype}")
    if int(tokens.max()) >= spec.vocab:
        raise CheckpointError(f"{parent_dir}: token id {int(tokens.max())} is outside the parent's vocabulary "
                              f"({spec.vocab}); parent and pruned model must share a tokenizer")
    w, t = tokens.shape
    machine = detect_machine(device=device, budget=budget, spill_dir=spill_dir, checkpoint=parent_dir)
    per_window_topk = t * k * TOPK_STATE_BYTES
    rows = max(1, min(w, PASS_TOKENS // t))
    # The plan covers blocks, head chunks and hidden states; the top-k state of a pass comes off its budget.
    plan_machine = replace(machine, budget=max(0, machine.budget - rows * per_window_topk))
    plan = make_plan(spec, parent.layers, Work(1, rows, t), plan_machine, dtype=dtype)
    rows = min(rows, plan.group_rows)
    compute_dtype = getattr(torch, plan.dtype)
    root = Path(cache_dir)
    manifest = _resume_or_create(root, _expected_manifest(parent, tokens, k, values_dtype, plan.dtype), tokens)
    done = int(manifest["windows_done"])
    if done:
        log.info("teacher cache %s: resuming at window %d of %d", root, done, w)
    log.info("teacher cache: %d windows x %d tokens, top-%d, %d windows per pass; %s", w, t, k, rows, plan.summary())
    log.debug(plan.describe())
    t0, start = time.perf_counter(), done
    while done < w:
        stop = min(w, done + rows)
        values, indices, lse, tail = teacher_pass(parent, tokens[done:stop], k=k, tile_rows=plan.tile_rows,
                                            head_chunk=plan.head_chunk, cache_location=plan.cache,
                                            device=plan.device, dtype=compute_dtype, spill_dir=spill_dir)
        arrays = {"values": values.numpy().astype(values_dtype), "indices": indices.numpy().astype(np.int32),
                  "lse": lse.numpy(), "tail": tail.numpy()}
        for name, data in arrays.items():
            mm = np.load(root / f"{name}.npy", mmap_mode="r+", allow_pickle=False)
            mm[done:stop] = data
            mm.flush()  # data on disk before the manifest says so
            del mm
        done = stop
        manifest["windows_done"] = done
        atomic_write_bytes(root / MANIFEST, json.dumps(manifest, indent=1).encode())
        elapsed = time.perf_counter() - t0
        eta = elapsed / (done - start) * (w - done)
        log.info("teacher cache: %d/%d windows, %.0f tokens/s, eta %s", done, w, (done - start) * t / elapsed,
                 _fmt_seconds(eta))
        if progress:
            progress(done, w)
    return TeacherCache.open(root)


def _fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    m, s = divmod(int(s), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
