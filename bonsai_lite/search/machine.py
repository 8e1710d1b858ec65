"""The machine a plan is made for: what it has (RAM, disk, device), how fast it computes and reads.

`detect_machine` probes this machine (psutil, torch, a one-core GEMM probe, the checkpoint disk's
cold read rate, the share of the checkpoint already in the page cache); `nominal_machine` describes
one we do not have. The planner (`planner.py`) turns a Machine and the work into a plan.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
import re
from dataclasses import dataclass, replace

import torch

from bonsai_lite.errors import BonsaiError, BudgetError
from bonsai_lite.io.disk import cached_fraction, cold_read_bps, shard_files
from bonsai_lite.structure import ModelSpec

# Fraction of free host RAM / disk we allow ourselves: the OS and page cache need the rest.
HOST_RAM_FRACTION = 0.7
DISK_FRACTION = 0.8
# Throughputs for the time model. CPU: a probed CPU's `flops` is its own one-core fp32 GEMM rate
# (`cpu_gemm_probe`) times its threads; the planner splits an engine pass into GEMMs at that rate and
# elementwise work (planner.ELEMENT_FLOPS). A described one (`nominal_machine`) is taken at
# CPU_FLOPS_PER_CORE, about what this project's EPYC and Xeon VMs probed (65-160 GFLOP/s).
# GPU: fraction of the dense bf16 peak a block reaches.
CPU_FLOPS_PER_CORE = 90e9
GPU_EFFICIENCY = 0.55
GPU_PEAK_FLOPS = {"H100": 990e12, "H200": 990e12, "A100": 312e12, "4090": 165e12, "3090": 71e12, "A6000": 155e12}
DEFAULT_GPU_FLOPS = 80e12
# CPU bf16/fp16 GEMMs without AMX run at about half the fp32 rate. A probed CPU measures its own
# bf16 factor (`cpu_bf16_factor`): with AMX (Sapphire Rapids) one thread ran a 512x2048x2048 bf16
# GEMM at 628 GFLOP/s against 106 in fp32, a factor of ~6.
LOW_PRECISION_CPU_FACTOR = 0.5
# A CPU search runs in bfloat16 when the caller gives no --dtype, the machine's bf16 GEMMs are at
# least this much faster than fp32, and the model is large enough for its GEMMs to dominate
# (`search_dtype`). Evaluation (reported perplexity) stays float32 on a CPU unless asked.
BF16_SEARCH_MIN_FACTOR = 2.0
BF16_SEARCH_MIN_PARAMS = 1e9
DISK_BPS = 2e9  # cold NVMe-class read
# Host tensors at least this large are mmapped by glibc and unmapped on free (`bound_host_allocator`):
# weight tensors and large activations; smaller ones reuse the heap without page faults. 64 KiB
# gave 21 MiB RSS growth on the budget test but 1.4x its page faults of 1 MiB (24 MiB growth).
MMAP_THRESHOLD = 2**20
# Under `bound_host_allocator` every large host tensor is a fresh mapping whose pages fault in (and
# are zeroed) on first touch: the read buffer of each checkpoint tensor, its sliced and cast copies,
# the large activations. A probed CPU measures its own rate (`fresh_page_probe`); a described one
# takes this (4 KiB pages at ~1.4 us each on the Xeon VM: 3 GB re-read cost 2.5 s of system time).
# The EPYC VM faults 4 KiB pages at 2.1-2.4 GB/s (at 3 GB/s the loader's 8B pass was predicted
# 0.65-0.85x of the measured one, tools/bench_loader.py) and huge pages (bonsai_lite/__init__.py)
# at 7-10 GB/s.
FRESH_PAGE_BPS = 3e9
FRESH_PROBE_BYTES = 64 * 2**20


def parse_bytes(text: str | int | float) -> int:
    """'8GB', '512MiB', '1.5G', 1e9 -> bytes (decimal and binary suffixes both mean powers of 1024)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not m:
        raise BudgetError(f"cannot read memory size {text!r}; write it like 8GB, 512MB or 1.5GiB")
    n = int(float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2) or "_"))
    if n < 1:  # 0 used to fall through to "auto" silently
        raise BudgetError(f"memory budget {text!r} is zero; give a size like 8GB, or leave --memory-budget out for "
                          "all free memory")
    return n


def check_device(device: str | None) -> None:
    """cpu, cuda or cuda:i that exists here; anything else used to run on the CPU without a word."""
    if device is None or device == "cpu":
        return
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if not m:
        raise BonsaiError(f"--device {device!r}: bonsai-lite runs on cpu or cuda[:i]")
    if not torch.cuda.is_available():
        raise BonsaiError(f"--device {device}: CUDA is not available here (torch {torch.__version__}, "
                          f"{'a CPU-only build' if torch.version.cuda is None else 'no GPU visible'}); use --device cpu")
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise BonsaiError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def bound_host_allocator(threshold: int = MMAP_THRESHOLD) -> bool:
    """Make freed tensors leave the process's RSS at once (glibc only; True when applied).

    glibc serves a large allocation with mmap and, when it is freed, raises its mmap threshold to
    that size (up to 32 MiB); from then on blocks of that size come from the heap and stay resident
    after `free`. Streaming a model allocates and frees one block's tensors per layer, so RSS grows
    by several blocks beyond what is alive: 45 MiB of RSS growth for ~24 MiB of live tensors on the
    budget test's model, over its 36 MiB budget. A fixed threshold (mallopt also switches the
    adjustment off) keeps RSS within a few MiB of the live tensors, which is what a CPU memory
    budget promises. Cost: every large tensor is a fresh mapping whose pages fault in (about 3x the
    minor faults; ~20% more CPU time on that test, whose passes are tiny; less on real work).
    Process-wide and idempotent; `detect_machine` applies it for CPU runs.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    # glibc's own rule when it adjusts the pair: trim the heap top above twice the mmap threshold.
    return bool(mallopt(m_mmap_threshold, int(threshold))) and bool(mallopt(m_trim_threshold, 2 * int(threshold)))

@dataclass(frozen=True)
class Machine:
    device: str  # "cpu" or "cuda[:i]"
    budget: int  # bytes of device memory (RAM on a CPU run) we may use
    host_ram: int  # bytes of host RAM we may use (== budget on a CPU run)
    disk: int  # bytes of free disk for spilling activations
    flops: float
    cores: int = 1
    gpu_name: str = ""
    page_cache: int = 0  # host RAM the OS can use to cache the checkpoint between passes
    bf16_factor: float = LOW_PRECISION_CPU_FACTOR  # CPU bf16 GEMM rate / fp32 GEMM rate
    disk_bps: float = DISK_BPS  # cold reads of the checkpoint (measured by io.disk where it can be)
    cached: float = 0.0  # share of the checkpoint in the page cache at the start (io.disk.cached_fraction)
    fresh_page_bps: float = FRESH_PAGE_BPS  # bytes/s of fresh host pages faulted in (`fresh_page_probe`)

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")


def _gpu_flops(name: str) -> float:
    return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), DEFAULT_GPU_FLOPS) * GPU_EFFICIENCY


def detect_machine(*, device: str | None, budget: int | None, spill_dir=None, checkpoint=None) -> Machine:
    """Probe the machine (psutil for RAM/disk, torch for the GPU). A CPU run's budget is RAM. With a
    `checkpoint` path, its disk's cold read rate is measured (io.disk; the nominal one where it cannot be).

    For a CPU run this also calls `bound_host_allocator`, without which glibc keeps freed weight
    buffers resident and the process's RSS outgrows the budget the plan was made for.
    """
    import os
    import tempfile

    import psutil

    check_device(device)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    free_ram = int(psutil.virtual_memory().available * HOST_RAM_FRACTION)
    disk = int(psutil.disk_usage(str(spill_dir or tempfile.gettempdir())).free * DISK_FRACTION)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    disk_bps = (cold_read_bps(str(checkpoint)) if checkpoint else None) or DISK_BPS
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        machine = Machine(device, budget or props.total_memory, free_ram, disk, _gpu_flops(props.name), cores,
                          props.name, page_cache=free_ram, disk_bps=disk_bps)
        return page_cache_now(machine, checkpoint, streamed=False) if checkpoint else machine
    bound_host_allocator()
    threads = torch.get_num_threads()
    budget = budget or free_ram
    flops = cpu_gemm_probe()[0] * threads
    machine = Machine("cpu", budget, budget, disk, flops, cores, page_cache=max(0, free_ram - budget),
                      bf16_factor=cpu_bf16_factor(), disk_bps=disk_bps, fresh_page_bps=fresh_page_probe())
    return page_cache_now(machine, checkpoint, streamed=False) if checkpoint else machine


def page_cache_now(machine: Machine, checkpoint, *, streamed: bool = True) -> Machine:
    """`machine` with the share of `checkpoint` in the page cache as it is now: the share detected at
    the start is stale once a pass has streamed a checkpoint larger than the cache, which then holds
    part of it (the planner prices the rest as disk reads). Before this run has streamed the
    checkpoint itself (`streamed` False), what the cache holds of a checkpoint larger than it was
    read once by someone else (a download, a copy, another run's pass): the kernel evicts such pages
    first, and a sequential pass evicts them ahead of itself, so the share a first pass finds is 0 (an
    8B checkpoint 80% in the cache at the start: its first pass read 15.0 of its 15 GB from disk,
    docs/PERFORMANCE.md, thirtieth session). A checkpoint that fits is priced as cached anyway."""
    cached = cached_fraction(checkpoint)
    if cached is None:
        return machine
    if not streamed and sum(f.stat().st_size for f in shard_files(checkpoint)) > machine.page_cache:
        cached = 0.0
    return replace(machine, cached=cached)


@functools.lru_cache(maxsize=1)
def fresh_page_probe() -> float:
    """Bytes/s at which one thread of this process touches fresh host memory: the best of 8 writes
    of a new 64 MiB tensor, each a fresh mapping once `bound_host_allocator` is in force (called
    first), so nearly all of the time is page faults; once per process."""
    import time

    bound_host_allocator()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the loader's reads and copies of one tensor run on one thread
    try:
        best = math.inf
        for _ in range(8):
            t0 = time.perf_counter()
            torch.empty(FRESH_PROBE_BYTES, dtype=torch.uint8).fill_(1)
            best = min(best, time.perf_counter() - t0)
        return FRESH_PROBE_BYTES / best
    finally:
        torch.set_num_threads(threads)


PROBE_SHAPE = (256, 1024, 1024)
# Six processes on this project's EPYC VM, back to back, read 75-97 GFLOP/s per core with 0.3 s and
# 95-98 with 1.5 s (bf16 factor 2.06-2.41 against 2.10-2.15): its slow spells last longer than 0.3 s,
# and the planner's time is inversely proportional to this one number. BONSAI_LITE_PROBE_SECONDS
# shortens it where a rough rate will do (the test suite starts hundreds of processes).
PROBE_SECONDS = float(os.environ.get("BONSAI_LITE_PROBE_SECONDS", 1.5))


@functools.lru_cache(maxsize=1)
def cpu_gemm_probe() -> tuple[float, float]:
    """(fp32 FLOP/s, bf16 / fp32 rate) of a 256x1024x1024 GEMM on one core of this CPU: the best
    call of each dtype after 3 warm-up calls (oneDNN builds its kernels on the first calls), over at
    least 8 rounds and PROBE_SECONDS, so that a stall of a shared machine is not read as its speed;
    once per process. The two dtypes alternate call by call: timed one after the other, a
    slow spell of the VM fell on one of them and moved the ratio from 4.8-6.0 to 3.35 (docs/
    PERFORMANCE.md, ninth session). A machine's speed moves between sessions (a VM here ran 1.7x
    faster on one day than on another), so the planner measures it rather than assuming a constant."""
    import time

    m, k, n = PROBE_SHAPE
    # into a preallocated output: a fresh 1 MiB result per call is a new mapping under
    # `bound_host_allocator`, whose page faults made the fp32 probe read 8% slow (the planner counts
    # the engine's fresh pages apart, `fresh_page_probe`)
    pairs = [(torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt), torch.empty(m, n, dtype=dt))
             for dt in (torch.float32, torch.bfloat16)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a property of the core: other jobs on the machine blur a multi-thread probe
    try:
        for a, b, c in pairs:
            for _ in range(3):
                torch.matmul(a, b, out=c)
        best, rounds, start = [math.inf, math.inf], 0, time.perf_counter()
        while rounds < 8 or (time.perf_counter() - start < PROBE_SECONDS and rounds < 512):
            for i, (a, b, c) in enumerate(pairs):
                t0 = time.perf_counter()
                torch.matmul(a, b, out=c)
                best[i] = min(best[i], time.perf_counter() - t0)
            rounds += 1
        return 2 * m * k * n / best[0], best[0] / best[1]
    finally:
        torch.set_num_threads(threads)


def cpu_bf16_factor() -> float:
    """bf16 / fp32 GEMM rate of one core of this CPU (`cpu_gemm_probe`)."""
    return cpu_gemm_probe()[1]


def search_dtype(machine: Machine, spec: ModelSpec) -> str | None:
    """The compute dtype a search uses when none is given: bfloat16 on a CPU whose bf16 GEMMs are
    much faster than fp32 (AMX), for models large enough to gain; None leaves it to the planner."""
    if machine.is_cuda or machine.bf16_factor < BF16_SEARCH_MIN_FACTOR:
        return None
    return "bfloat16" if spec.non_embedding_params() >= BF16_SEARCH_MIN_PARAMS else None


def nominal_machine(*, device: str, budget: int, gpu_name: str = "", host_ram: int = 64 * 2**30, disk: int = 500 * 2**30) -> Machine:
    """A machine described, not probed: `plan` answers 'will it fit?' for hardware you do not have."""
    if device.startswith("cuda"):
        return Machine(device, budget, host_ram, disk, _gpu_flops(gpu_name), 8, gpu_name, page_cache=host_ram)
    return Machine("cpu", budget, budget, disk, CPU_FLOPS_PER_CORE * 2, 2, page_cache=max(0, host_ram - budget))
