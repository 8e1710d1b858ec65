"""Hidden states of many (sub-model, sample) rows between blocks: on the device, in host RAM, or on disk.

Each tile is read, pushed through one block and written back to the same slot, so a single buffer
serves as both input and output (a tile's slot is only ever touched by that tile). The disk form
uses positional reads/writes rather than a memory map so that its pages never count as the
process's resident memory (the budget is about RSS on a CPU run).
"""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import torch

from bonsai_lite.errors import BonsaiError


class ActivationCache:
    def __init__(self, *, rows: int, tokens: int, hidden: int, dtype, location: str, device, spill_dir=None):
        self.rows, self.shape, self.dtype, self.location = rows, (tokens, hidden), dtype, location
        self.device = torch.device(device)
        self.row_bytes = tokens * hidden * torch.empty(0, dtype=dtype).element_size()
        self.bytes_written = 0
        self._file = None
        if location == "device":
            self._buf = torch.empty((rows, tokens, hidden), dtype=dtype, device=self.device)
        elif location == "host":
            self._buf = torch.empty((rows, tokens, hidden), dtype=dtype, pin_memory=self.device.type == "cuda")
        elif location == "disk":
            spill = self.spill_dir = Path(spill_dir or tempfile.gettempdir())
            try:
                spill.mkdir(parents=True, exist_ok=True)
                fd, name = tempfile.mkstemp(prefix="bonsai-acts-", suffix=".bin", dir=spill)
            except OSError as e:
                raise BonsaiError(f"cannot spill activations to {spill} ({e.strerror or e}); pass another --spill-dir "
                                  "or a larger --memory-budget") from e
            os.unlink(name)  # anonymous: the space is reclaimed even if we are killed
            self._file = os.fdopen(fd, "r+b", buffering=0)
        else:
            raise ValueError(f"unknown cache location {location!r}")

    def put(self, rows: slice, x: torch.Tensor) -> None:
        if self._file is None:
            self._buf[rows].copy_(x, non_blocking=True)
            return
        data = x.detach().to("cpu", self.dtype).contiguous().view(torch.uint8).reshape(-1)
        view = memoryview(data.numpy())
        self._file.seek(rows.start * self.row_bytes)
        try:
            # A raw write may be short when the disk fills up; an unwritten range would read back as
            # zeros (a hole), i.e. silently wrong hidden states, so write until done or failed.
            done = 0
            while done < len(view):
                n = self._file.write(view[done:])
                if not n:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += n
        except OSError as e:
            raise BonsaiError(
                f"could not spill activations to disk in {self.spill_dir} ({e.strerror or e}); free space there, "
                "pass another --spill-dir or a larger --memory-budget, and re-run the same command to resume"
            ) from e
        self.bytes_written += data.numel()

    def get(self, rows: slice) -> torch.Tensor:
        if self._file is None:
            return self._buf[rows].to(self.device, non_blocking=True)
        n = rows.stop - rows.start
        buf = torch.empty(n * self.row_bytes, dtype=torch.uint8)
        self._file.seek(rows.start * self.row_bytes)
        got = self._file.readinto(memoryview(buf.numpy()))
        if got != buf.numel():
            raise BonsaiError("activation spill file was truncated; is the disk full?")
        return buf.view(self.dtype).reshape(n, *self.shape).to(self.device)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._buf = None
