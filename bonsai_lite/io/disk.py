"""How fast this machine reads a checkpoint from its disk, past the page cache, and how much of it
the page cache holds now.

The planner's time model needs the cold read rate for passes whose weights the page cache cannot
hold (a 15 GiB bf16 checkpoint beside an 8 GB budget on a 16 GB laptop). A nominal rate is wrong by
3x on some machines (a VM measured 0.70 GB/s against the 2 GB/s assumed), so the rate is measured:
one O_DIRECT read of up to PROBE_BYTES of the checkpoint's largest file, which the kernel serves from
the device and not from its cache. Reading changes nothing on disk. Where O_DIRECT is refused (tmpfs,
some overlay filesystems, macOS) or the file is too small to time, there is no measurement and the
caller keeps its nominal rate.
"""
from __future__ import annotations

import functools
import mmap
import os
import time
from pathlib import Path

PROBE_BYTES = 128 * 2**20
MIN_PROBE_BYTES = 16 * 2**20  # below this one read is dominated by its latency, not the device's rate
CHUNK_BYTES = 8 * 2**20  # a multiple of every device's logical block size


def shard_files(path: str | Path) -> list[Path]:
    """A checkpoint's safetensors files: the file itself, or those of its directory."""
    p = Path(path)
    if p.is_file():
        return [p]
    return sorted(f for f in p.glob("*.safetensors") if f.is_file()) if p.is_dir() else []


def largest_file(path: str | Path) -> Path | None:
    """The largest safetensors file of a checkpoint directory (or the file itself)."""
    files = shard_files(path)
    return max(files, key=lambda f: f.stat().st_size) if files else None


def read_direct(path: str | Path, nbytes: int) -> tuple[bytes, float] | None:
    """The first `nbytes` of `path` (whole chunks, or to the end of a shorter file) read with
    O_DIRECT, and the seconds that took; None where the filesystem refuses O_DIRECT."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        fd = os.open(str(path), os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return None
    buf = mmap.mmap(-1, CHUNK_BYTES)  # anonymous mappings are page-aligned, as O_DIRECT requires
    parts = []
    try:
        t0 = time.perf_counter()
        for offset in range(0, nbytes - CHUNK_BYTES + 1, CHUNK_BYTES):
            n = os.preadv(fd, [buf], offset)
            if n <= 0:
                break
            parts.append(buf[:n])
            if n < CHUNK_BYTES:
                break
        seconds = time.perf_counter() - t0
    except OSError:  # EINVAL: the filesystem opened the file but cannot read it directly
        return None
    finally:
        os.close(fd)
        buf.close()
    return b"".join(parts), seconds


@functools.lru_cache(maxsize=8)
def cold_read_bps(path: str) -> float | None:
    """Bytes per second of a cold read of the checkpoint at `path` (measured once per process)."""
    f = largest_file(path)
    if f is None:
        return None
    size = f.stat().st_size
    if size < MIN_PROBE_BYTES:
        return None
    res = read_direct(f, min(PROBE_BYTES, size))
    if res is None or len(res[0]) < MIN_PROBE_BYTES or res[1] <= 0:
        return None
    return len(res[0]) / res[1]


def cached_fraction(path: str | Path) -> float | None:
    """Share of a checkpoint's safetensors bytes in the page cache now (mincore(2) on a read-only
    mapping that is never touched, so nothing is read and nothing counts towards the RSS); None
    where mincore is not available."""
    import ctypes
    import ctypes.util

    files = shard_files(path)
    name = ctypes.util.find_library("c")
    if not files or name is None or not hasattr(os, "posix_fadvise"):  # Linux only
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    total = cached = 0
    for f in files:
        size = f.stat().st_size
        if size == 0:
            continue
        fd = os.open(str(f), os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                vec = (ctypes.c_ubyte * ((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
                if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                    return None
                resident = len(vec) - bytes(vec).count(0)  # bit 0: resident; the others are reserved
            finally:
                libc.munmap(ctypes.c_void_p(addr), size)
        finally:
            os.close(fd)
        total += size
        cached += min(size, resident * mmap.PAGESIZE)
    return cached / total if total else None
