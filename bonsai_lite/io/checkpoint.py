"""Lazy, read-only view of a safetensors checkpoint (single file or sharded with an index).

`read` copies a tensor (or a range of its rows) into a fresh buffer with a positional read.
`map` gives the same values without the copy: a private, copy-on-write mapping of just that range of
the file, unmapped when the tensor is freed. The streamed engine maps its block weights and LM-head
chunks (io/blocks.py): a weight used as stored then comes straight from the page cache, and a sliced
or cast one is copied once instead of twice; its mapped pages count towards the resident memory
only while the tensor lives, as a read buffer's would. Every other reader (export, refit, scores)
reads. Only safetensors are ever read; pickles are refused.
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from bonsai_lite.errors import CheckpointError
from bonsai_lite.io.disk import POPULATE_READ, advise

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# A header larger than this is not a real safetensors header (the format caps it at 100 MB).
_MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# `map` populates each mapping (io.disk.POPULATE_READ) so that the thread that maps (the engine's
# prefetch thread) waits for the disk, not the GEMMs that first touch the pages. Elsewhere
# MADV_WILLNEED starts the reads without waiting for them.


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


def _read_header(path: Path) -> dict[str, TensorInfo]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"{path}: corrupt safetensors header (claims {n} bytes); re-download this file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object); re-download this file")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e.__class__.__name__}); re-download this file") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from e
    infos: dict[str, TensorInfo] = {}
    start = 8 + n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name = meta["dtype"]
            begin, end = (int(x) for x in meta["data_offsets"])
            shape = tuple(int(s) for s in meta["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}") from e
        if dtype_name not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype_name}, which bonsai-lite does not read "
                                  f"({', '.join(DTYPES)}); convert the checkpoint to float16/bfloat16/float32")
        dtype = DTYPES[dtype_name]
        numel = 1
        for s in shape:
            numel *= s
        if begin < 0 or end - begin != numel * dtype.itemsize or start + end > size:
            raise CheckpointError(
                f"{path}: truncated or corrupt shard ({name!r} needs bytes {start + begin}..{start + end}, "
                f"file has {size}); re-download this file"
            )
        infos[name] = TensorInfo(path, dtype, shape, start + begin, end - begin)
    # The format lays tensors out back to back, covering the data exactly (safetensors' own loader
    # checks it too): an overlap would read another tensor's bytes as this one's, a hole hides an edit.
    spans = sorted((i.offset, i.offset + i.nbytes, n) for n, i in infos.items())
    pos = start
    for begin, end, name in spans:
        if begin != pos:
            raise CheckpointError(f"{path}: corrupt safetensors header ({name!r} starts at byte {begin}, the previous "
                                  f"tensor ends at {pos}); re-download this file")
        pos = end
    if pos != size:
        raise CheckpointError(f"{path}: corrupt safetensors header (its tensors end at byte {pos}, the file has {size}); "
                              "re-download this file")
    return infos


def _shard_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: corrupt index (no weight_map); re-download it") from e
        files = []
        for fname in names:
            # Judged by the name, not by where symlinks lead: a Hugging Face cache snapshot links
            # its files into ../../blobs, and that is the user's own layout.
            parts = Path(str(fname)).parts
            if not isinstance(fname, str) or not parts or Path(fname).is_absolute() or ".." in parts:
                raise CheckpointError(f"{index}: names {fname!r}, which is outside the model directory; refusing")
            path = model_dir / fname
            if not path.is_file():
                raise CheckpointError(f"{index}: names {fname!r}, which is missing; re-download the checkpoint")
            files.append(path)
        return files
    if (model_dir / SINGLE_NAME).is_file():
        return [model_dir / SINGLE_NAME]
    singles = sorted(model_dir.glob("*.safetensors"))
    if singles:
        return singles
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        # Unpickling runs arbitrary code from the file; we never do it. Converting is the user's step,
        # with torch.load(weights_only=True) and safetensors (docs/RELIABILITY.md has the recipe).
        raise CheckpointError(
            f"{model_dir}: only pickle weights ({', '.join(pickles[:3])}); bonsai-lite reads safetensors only and "
            "never unpickles (a pickle can run code). Convert them first: torch.load(f, weights_only=True) and "
            "safetensors.torch.save_file, or transformers' save_pretrained(safe_serialization=True)"
        )
    raise CheckpointError(f"{model_dir}: no weights (no model.safetensors, {INDEX_NAME} or *.safetensors)")


class Checkpoint(Mapping[str, torch.Tensor]):
    """Mapping from tensor name to CPU tensor, read on access. Counts the bytes it reads."""

    def __init__(self, model_dir: str | os.PathLike, *, overlay: str | os.PathLike | None = None):
        """`overlay`: a folder of safetensors files whose tensors replace the checkpoint's of the
        same name and shape (the refitted projections of a run, prune/refit.py)."""
        self.root = Path(model_dir)
        if not self.root.is_dir():
            raise CheckpointError(f"{self.root}: model directory not found")
        self.infos: dict[str, TensorInfo] = {}
        for path in _shard_files(self.root):
            self.infos.update(_read_header(path))
        if overlay is not None:
            for name, info in Checkpoint(overlay).infos.items():
                if name not in self.infos or self.infos[name].shape != info.shape:
                    raise CheckpointError(f"{overlay}: {name!r} does not replace a tensor of {self.root} of the same "
                                          "shape; the run directory belongs to another model")
                self.infos[name] = info
        self.bytes_read = 0

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise CheckpointError(f"{self.root}: tensor {name!r} is missing from the checkpoint") from None

    def _span(self, name: str, rows: slice | None) -> tuple[TensorInfo, int, int, list[int]]:
        """(info, file offset, bytes, shape) of the tensor or a contiguous range of its rows."""
        info = self.info(name)
        shape = list(info.shape)
        offset, nbytes = info.offset, info.nbytes
        if rows is not None:
            start, stop, step = rows.indices(shape[0])
            assert step == 1, "row ranges must be contiguous"
            row_bytes = info.nbytes // max(shape[0], 1)
            offset += start * row_bytes
            nbytes = (stop - start) * row_bytes
            shape[0] = stop - start
        return info, offset, nbytes, shape

    def map(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """`read`'s tensor as a private mapping of the file (no copy; writes stay in this process).

        The mapping starts at the page boundary below the data and lives as long as the tensor. A
        file cut short since the checkpoint was opened is a CheckpointError here, as in `read` (its
        size is checked, and populating a mapping past the end fails); cut short while a block is
        in use, a mapped page would fault instead, so only the engine's weights, mapped again every
        pass from a checkpoint nobody is writing, are mapped."""
        info, offset, nbytes, shape = self._span(name, rows)
        if nbytes == 0:
            return torch.empty(shape, dtype=info.dtype)
        base = offset - offset % mmap.ALLOCATIONGRANULARITY
        truncated = CheckpointError(f"{info.file}: truncated while reading {name!r}; re-download this file")
        try:
            with open(info.file, "rb") as f:
                if os.fstat(f.fileno()).st_size < offset + nbytes:
                    raise truncated
                mapped = mmap.mmap(f.fileno(), offset - base + nbytes, access=mmap.ACCESS_COPY, offset=base)
        except (OSError, ValueError):  # a filesystem that cannot map: read it instead
            return self.read(name, rows)
        advice = POPULATE_READ if POPULATE_READ is not None else getattr(mmap, "MADV_WILLNEED", None)
        if advice is not None and hasattr(mapped, "madvise"):
            try:
                advise(mapped, advice)
            except OSError as e:  # EFAULT: past the end of the file; else an older kernel (pages fault in on first touch)
                if e.errno == errno.EFAULT:
                    raise truncated from None
        self.bytes_read += nbytes
        return torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=offset - base).view(info.dtype).reshape(shape)

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """The tensor, or a contiguous range of its leading dimension."""
        info, offset, nbytes, shape = self._span(name, rows)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        with open(info.file, "rb", buffering=0) as f:
            f.seek(offset)
            got = f.readinto(memoryview(buf.numpy()))
        if got != nbytes:
            raise CheckpointError(f"{info.file}: truncated while reading {name!r}; re-download this file")
        self.bytes_read += nbytes
        return buf.view(info.dtype).reshape(shape)

    def read_rows(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """Selected rows (e.g. the embedding rows of the calibration tokens), one read per run of rows."""
        info = self.info(name)
        index = index.to(torch.long).cpu()
        out = torch.empty((len(index), *info.shape[1:]), dtype=info.dtype)
        if len(index) == 0:
            return out
        order = torch.argsort(index)
        sorted_idx = index[order].tolist()
        pos = 0
        while pos < len(sorted_idx):
            end = pos
            while end + 1 < len(sorted_idx) and sorted_idx[end + 1] == sorted_idx[end] + 1:
                end += 1
            block = self.read(name, slice(sorted_idx[pos], sorted_idx[end] + 1))
            out[order[pos : end + 1]] = block
            pos = end + 1
        return out

    def nbytes(self, names: list[str] | None = None) -> int:
        return sum(self.infos[n].nbytes for n in (names if names is not None else self.infos))
