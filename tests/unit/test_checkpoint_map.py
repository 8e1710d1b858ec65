"""Checkpoint.map (the engine's weights, mapped) against Checkpoint.read (a copy): the same tensors,
the file never written, the mapping gone with the tensor."""
from __future__ import annotations

import gc
import mmap
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bonsai_lite.io.checkpoint import Checkpoint

pytestmark = pytest.mark.unit


@pytest.fixture()
def ckpt(tmp_path) -> Checkpoint:
    g = torch.Generator().manual_seed(0)
    # odd sizes first, so that later tensors start off the page boundary
    save_file({"a.norm": torch.randn(7, generator=g).to(torch.bfloat16),
               "b.weight": torch.randn(1000, 37, generator=g),
               "c.weight": torch.randn(300, 4096, generator=g).to(torch.bfloat16),
               "d.empty": torch.zeros(0, 5)}, str(tmp_path / "model.safetensors"))
    return Checkpoint(tmp_path)


def test_map_equals_read_for_whole_tensors_and_row_ranges(ckpt):
    assert any(i.offset % 4096 for i in ckpt.infos.values())  # mappings that start mid-page
    for name, info in ckpt.infos.items():
        got, want = ckpt.map(name), ckpt.read(name)
        assert got.dtype == want.dtype == info.dtype and torch.equal(got, want)
        n = info.shape[0]
        for rows in (slice(0, n // 2), slice(n // 3, n), slice(n, n)):
            assert torch.equal(ckpt.map(name, rows), ckpt.read(name, rows))


def test_writes_to_a_mapped_tensor_never_reach_the_file(ckpt):
    path = Path(ckpt.infos["c.weight"].file)
    before = path.read_bytes()
    t = ckpt.map("c.weight")
    t.add_(1.0)  # copy-on-write: this process's pages only
    assert not torch.equal(t, ckpt.read("c.weight"))
    del t
    gc.collect()
    assert path.read_bytes() == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_the_mapping_lives_as_long_as_the_tensor(ckpt):
    path = str(Path(ckpt.infos["c.weight"].file).resolve())

    def mapped() -> int:
        return sum(path in line for line in Path("/proc/self/maps").read_text().splitlines())

    gc.collect()
    start = mapped()
    t = ckpt.map("c.weight")[10:20].float()  # a cast copy: the mapping is dropped with the source
    assert mapped() == start
    w = ckpt.map("c.weight")
    assert mapped() == start + 1
    del w
    gc.collect()
    assert mapped() == start and t.shape == (10, 4096)


def test_a_file_cut_short_after_opening_is_a_clear_error(ckpt):
    from bonsai_lite.errors import CheckpointError

    info = ckpt.infos["c.weight"]
    path = Path(info.file)
    with open(path, "r+b") as f:  # this test's own file
        f.truncate(info.offset + info.nbytes // 2)
    with pytest.raises(CheckpointError, match="truncated while reading 'c.weight'; re-download"):
        ckpt.map("c.weight")
    with pytest.raises(CheckpointError, match="truncated while reading 'c.weight'; re-download"):
        ckpt.read("c.weight")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_POPULATE_READ is Linux's")
def test_populating_a_mapping_lets_the_other_threads_run(ckpt, monkeypatch):
    # The engine's prefetch thread maps the next block while the main thread computes. Python's
    # mmap.madvise holds the GIL for the whole call, and populating pages that are on disk lasts as
    # long as their read, so the main thread stood still between its ops for every read from disk
    # (the eval pass of an 8B prune read 13.9 GB that way and took the reads' time on top of its
    # compute). The populate goes through a ctypes call into libc instead: CDLL, not PyDLL, so the
    # GIL is released for it.
    import ctypes

    from bonsai_lite.io import disk

    real = disk._libc_madvise()
    assert real is not None and not real._flags_ & ctypes._FUNCFLAG_PYTHONAPI
    calls = []

    def recording(address, length, advice):
        calls.append((address, length, advice))
        return real(address, length, advice)

    monkeypatch.setattr(disk, "_libc_madvise", lambda: recording)
    got = ckpt.map("c.weight")
    assert torch.equal(got, ckpt.read("c.weight"))
    [(address, length, advice)] = calls
    assert advice == disk.POPULATE_READ and address % mmap.PAGESIZE == 0
    assert address <= got.data_ptr() and got.data_ptr() + got.numel() * got.element_size() <= address + length
