"""How fast this machine reads a checkpoint from its disk, past the page cache, and how much of it
the page cache holds now.

The planner's time model needs the cold read rate for passes whose weights the page cache cannot
hold (a 15 GiB bf16 checkpoint beside an 8 GB budget on a 16 GB laptop). A nominal rate is wrong by
3x on some machines (a VM measured 0.70 GB/s against the 2 GB/s assumed), so the rate is measured:
the engine's own way of reading (a mapping populated by madvise) on a part of the checkpoint that is
not in the page cache, dropped from it again afterwards; else, where every part is cached or the
kernel cannot populate a mapping, one O_DIRECT read of up to PROBE_BYTES of the checkpoint's largest
file, which the kernel serves from the device and not from its cache. Reading changes nothing on
disk. Where neither works (tmpfs, some overlay filesystems, macOS) or the file is too small to time,
there is no measurement and the caller keeps its nominal rate.
"""
from __future__ import annotations

import functools
import mmap
import os
import re
import sys
import time
from pathlib import Path

PROBE_BYTES = 128 * 2**20
MIN_PROBE_BYTES = 16 * 2**20  # below this one read is dominated by its latency, not the device's rate
CHUNK_BYTES = 8 * 2**20  # a multiple of every device's logical block size
MAPPED_PROBE_BYTES = 256 * 2**20
# madvise(MADV_POPULATE_READ) (Linux >= 5.14; Python's mmap module names it from 3.13): map every
# page of a new mapping now, reading from disk what the page cache lacks. None off Linux.
POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform == "linux" else None)
# The kernel reads around a faulting page (half its readahead window before it) and ahead of it,
# so a populated mapping brings in pages on both sides: up to this many, dropped too.
READAHEAD_PAGES = 32 * 2**20 // mmap.PAGESIZE  # past any readahead window (read_ahead_kb)
DROP_SECONDS = 2.0  # at most this long dropping them, for reads that land late or are still in flight
QUIET_SECONDS = 0.1


@functools.lru_cache(maxsize=1)
def _libc():
    """The C library through ctypes (errno kept), with the calls used here typed once; None off
    Linux. A CDLL call lets go of the GIL."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None or not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    libc.madvise.argtypes, libc.madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


def _libc_madvise():
    """libc's madvise; None where there is no libc to call."""
    libc = _libc()
    return None if libc is None else libc.madvise


def advise(mapped: mmap.mmap, advice: int) -> None:
    """madvise(`advice`) over all of `mapped`; OSError as mmap.madvise raises it. Python's
    `mmap.madvise` holds the GIL for the whole call, and MADV_POPULATE_READ of pages on disk lasts
    as long as their read: the engine's prefetch thread then stopped the main thread between its ops
    (a 2 GB populate left another thread 0.2% of its loop rate; through ctypes, 44%), so its reads
    ran beside the compute only when cached."""
    import ctypes

    fn = _libc_madvise()
    try:
        view = ctypes.c_char.from_buffer(mapped) if fn is not None else None
    except TypeError:  # a read-only mapping: ctypes cannot take its address
        view = None
    if view is None:
        mapped.madvise(advice)
        return
    address = ctypes.addressof(view)
    del view  # the mapping must not stay exported (it could not be closed)
    if fn(address, len(mapped), advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


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
    """Bytes per second of a cold read of the checkpoint at `path` (measured once per process): the
    engine's own way where it can (`mapped_read_bps`), else one O_DIRECT read."""
    f = largest_file(path)
    if f is None:
        return None
    mapped = mapped_read_bps(path)
    if mapped is not None:
        return mapped
    size = f.stat().st_size
    if size < MIN_PROBE_BYTES:
        return None
    res = read_direct(f, min(PROBE_BYTES, size))
    if res is None or len(res[0]) < MIN_PROBE_BYTES or res[1] <= 0:
        return None
    return len(res[0]) / res[1]


def mapped_read_bps(path: str | Path) -> float | None:
    """Bytes per second at which the engine's loader brings in a part of the checkpoint that is not in
    the page cache: a read-only mapping of MAPPED_PROBE_BYTES populated by madvise, as
    `Checkpoint.map` does, whose readahead keeps several requests in flight where an O_DIRECT read
    has one (a VM's disk served 1.8-2.3 GB/s that way against 0.9-1.0 GB/s to O_DIRECT, and 2.0 GB/s
    sustained over an 8B checkpoint's 14 GB of blocks: tools/bench_cold.py, docs/PERFORMANCE.md,
    thirtieth session). The part is
    dropped from the cache afterwards, which leaves the cache as it was found; pages cached before
    are mapped, not read, and not counted. None where no part of that size is at least 15/16 cold,
    or where mincore or MADV_POPULATE_READ are not available."""
    if POPULATE_READ is None or not hasattr(os, "posix_fadvise"):
        return None
    step = MAPPED_PROBE_BYTES // mmap.PAGESIZE
    for f in sorted(shard_files(path), key=lambda f: f.stat().st_size, reverse=True):
        vec = _resident_pages(f)
        if vec is None:
            return None
        windows = [(step - vec[i:i + step].count(0), i) for i in range(0, len(vec) - step + 1, step)]
        if not windows or min(windows)[0] > step // 16:
            continue  # no part of this file is cold enough to time
        warm, first = min(windows)
        lo = max(0, first - READAHEAD_PAGES)
        around = vec[lo:first + step + READAHEAD_PAGES]
        offset = first * mmap.PAGESIZE  # page-aligned, as mmap needs
        with open(f, "rb") as fh:
            try:
                m = mmap.mmap(fh.fileno(), MAPPED_PROBE_BYTES, access=mmap.ACCESS_READ, offset=offset)
            except (OSError, ValueError):
                return None
            try:
                t0 = time.perf_counter()
                m.madvise(POPULATE_READ)
                seconds = time.perf_counter() - t0
            except OSError:  # a kernel before 5.14 knows no MADV_POPULATE_READ
                return None
            finally:
                m.close()
                _drop(fh.fileno(), f, lo, around)
        return (step - warm) * mmap.PAGESIZE / seconds if seconds > 0 else None
    return None


def _drop(fd: int, f: Path, lo: int, before: bytes) -> None:
    """Drop from the page cache the pages of `f` from page `lo` on that `before` marks cold, and only
    those. The kernel's readahead lands some pages milliseconds after the reads that asked for it
    (Linux 6.18: 7 ms on an idle disk) and pages still being read survive a drop, so the drop is
    repeated until no such page has been seen for QUIET_SECONDS, or DROP_SECONDS have passed."""
    runs = _zero_runs(before)
    deadline = time.monotonic() + DROP_SECONDS
    while True:
        for start, stop in runs:
            os.posix_fadvise(fd, (lo + start) * mmap.PAGESIZE, (stop - start) * mmap.PAGESIZE, os.POSIX_FADV_DONTNEED)
        quiet = time.monotonic() + QUIET_SECONDS
        while time.monotonic() < min(quiet, deadline):
            time.sleep(0.005)
            now = _resident_pages(f)
            if now is None:
                return
            if any(any(now[lo + start:lo + stop]) for start, stop in runs):
                break
        else:
            return  # quiet, or out of time


def _zero_runs(vec: bytes) -> list[tuple[int, int]]:
    """[start, stop) of each run of zero bytes in `vec`."""
    return [m.span() for m in re.finditer(b"\0+", vec)]


def _resident_pages(f: Path) -> bytes | None:
    """One byte per page of file `f`, non-zero where the page is in the page cache (mincore(2) on a
    read-only mapping that is never touched, so nothing is read and nothing counts towards the RSS);
    None where mincore is not available."""
    import ctypes

    libc = _libc()
    size = f.stat().st_size
    if libc is None or not hasattr(os, "posix_fadvise"):  # Linux only
        return None
    if size == 0:
        return b""
    fd = os.open(str(f), os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            vec = (ctypes.c_ubyte * ((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
            if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                return None
            return bytes(vec)  # non-zero where resident (bit 0; the others are reserved)
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)


def cached_fraction(path: str | Path) -> float | None:
    """Share of a checkpoint's safetensors bytes in the page cache now (`_resident_pages`); None where
    mincore is not available."""
    files = shard_files(path)
    if not files:
        return None
    total = cached = 0
    for f in files:
        vec = _resident_pages(f)
        if vec is None:
            return None
        size = f.stat().st_size
        total += size
        cached += min(size, (len(vec) - vec.count(0)) * mmap.PAGESIZE)
    return cached / total if total else None
