"""The cold-read probe: O_DIRECT reads return the file's bytes, and files too small to time give no rate."""
from __future__ import annotations

import mmap
import os
import time

import pytest

from bonsai_lite.io import disk

pytestmark = pytest.mark.unit


def _written(f, nbytes: int):
    """`f` with `nbytes` of random data, on disk (fsync'd), so the page cache may drop it."""
    with open(f, "wb") as fh:
        fh.write(os.urandom(nbytes))
        fh.flush()
        os.fsync(fh.fileno())
    return f


def test_direct_read_returns_the_files_bytes(tmp_path):
    data = os.urandom(3 * disk.CHUNK_BYTES + 12345)
    f = tmp_path / "model-00001-of-00002.safetensors"
    f.write_bytes(data)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"x" * 100)
    assert disk.largest_file(tmp_path) == f and disk.largest_file(f) == f
    res = disk.read_direct(f, 2 * disk.CHUNK_BYTES + 5)  # whole chunks only: two of them
    if res is None:
        pytest.skip(f"{tmp_path} refuses O_DIRECT; the probe returns no rate there")
    got, seconds = res
    assert got == data[:2 * disk.CHUNK_BYTES] and seconds > 0
    assert disk.read_direct(f, 10 * disk.CHUNK_BYTES)[0] == data  # stops at the end of the file
    rate = disk.cold_read_bps(str(tmp_path))
    assert rate is not None and rate > 0


def test_no_rate_without_enough_to_read(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * (disk.MIN_PROBE_BYTES - 1))
    assert disk.cold_read_bps(str(tmp_path)) is None
    assert disk.cold_read_bps(str(tmp_path / "empty")) is None  # no checkpoint there: no rate, no error


def test_cached_fraction_follows_the_page_cache(tmp_path):
    f = _written(tmp_path / "model.safetensors", 8 * 2**20)  # clean pages: the kernel may drop them when asked
    f.read_bytes()
    warm = disk.cached_fraction(tmp_path)
    if warm is None:
        pytest.skip("no mincore here")
    fd = os.open(f, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert warm > 0.9 and disk.cached_fraction(f) < 0.5


def test_a_plan_sees_the_page_cache_as_it_is_now(tmp_path):
    # The share detected at the start goes stale once a pass has streamed the checkpoint: the prune
    # loop re-reads it before each plan (search.machine.page_cache_now).
    from dataclasses import replace

    from bonsai_lite.search.machine import nominal_machine, page_cache_now

    f = _written(tmp_path / "model.safetensors", 8 * 2**20)
    stale = replace(nominal_machine(device="cpu", budget=2**30), cached=0.0)
    f.read_bytes()
    now = page_cache_now(stale, tmp_path)
    if disk.cached_fraction(tmp_path) is None:
        pytest.skip("no mincore here")
    assert now.cached > 0.9 and now.budget == stale.budget
    fd = os.open(f, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert page_cache_now(now, tmp_path).cached < 0.5


def test_a_first_pass_finds_none_of_a_checkpoint_larger_than_the_page_cache(tmp_path):
    # What the cache holds before the run's first pass was read once by someone else: a sequential
    # pass over a checkpoint larger than the cache evicts it ahead of itself. A checkpoint that fits
    # keeps its share; after the run's own first pass, the share is what mincore says.
    from dataclasses import replace

    from bonsai_lite.search.machine import nominal_machine, page_cache_now

    f = _written(tmp_path / "model.safetensors", 8 * 2**20)
    f.read_bytes()
    if (share := disk.cached_fraction(tmp_path)) is None or share < 0.9:
        pytest.skip("no mincore here, or the file did not stay cached")
    small = replace(nominal_machine(device="cpu", budget=2**30), page_cache=4 * 2**20)  # half the file
    large = replace(small, page_cache=64 * 2**20)
    assert page_cache_now(small, tmp_path, streamed=False).cached == 0.0
    assert page_cache_now(small, tmp_path).cached > 0.9  # the run's own earlier pass left it there
    assert page_cache_now(large, tmp_path, streamed=False).cached > 0.9


def test_the_mapped_probe_times_a_cold_part_and_leaves_the_cache_as_it_found_it(tmp_path, monkeypatch):
    # The loader maps and populates (Checkpoint.map), whose readahead keeps several requests in
    # flight: the planner's disk rate is measured that way, on a part of the checkpoint that is not
    # cached, and that part (with what the kernel's readahead brought around it, some of which lands
    # milliseconds later) is dropped again.
    monkeypatch.setattr(disk, "MAPPED_PROBE_BYTES", 4 * 2**20)
    f = _written(tmp_path / "model.safetensors", 64 * 2**20)
    fd = os.open(f, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.pread(fd, 2 * 2**20, 0)  # the user's own reads left the first 2 MiB cached
    finally:
        os.close(fd)
    time.sleep(0.2)  # the readahead of those reads has landed
    before = disk._resident_pages(f)
    if before is None:
        pytest.skip("no mincore here")
    if before.count(0) == len(before) or any(before[len(before) // 2:]):
        pytest.skip("this filesystem does not drop clean pages when asked")
    dropped = []  # every page the probe asked the kernel to drop
    fadvise = os.posix_fadvise

    def spy(fd, offset, length, advice):
        if advice == os.POSIX_FADV_DONTNEED:
            dropped.extend(range(offset // mmap.PAGESIZE, (offset + length) // mmap.PAGESIZE))
        return fadvise(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    rate = disk.mapped_read_bps(tmp_path)
    if rate is None:
        pytest.skip("no MADV_POPULATE_READ here")
    time.sleep(0.2)  # a readahead the probe started and did not drop would have landed by now
    after = disk._resident_pages(f)
    assert rate > 0 and dropped
    # Nothing the probe read stays cached. The user's pages are never dropped by the probe; the
    # kernel may still reclaim a few of them under memory pressure (a CI run lost 12 of 512), so
    # what the probe did is read from its own requests, not from the cache after.
    assert not any(a and not b for a, b in zip(after, before))
    assert not [page for page in dropped if before[page]]
    f.read_bytes()  # all of it cached: nothing cold to time, no rate
    assert disk.mapped_read_bps(tmp_path) is None
