"""Memory planner: choose how masked evaluation runs inside a memory budget, from byte counts alone.

The planner needs only the model's shape (config.json), the work (masks x samples x tokens) and the
machine (budget, host RAM, disk, device kind). It enumerates execution orders and tile sizes,
predicts each one's peak memory and time with the cost model below, keeps those under the budget
and picks the fastest. docs/design.md ("Memory planner") explains the model; tools/bench_engine.py
measures how well it predicts.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import torch

from bonsai_lite.errors import BudgetError
from bonsai_lite.structure import LayerStructure, ModelSpec

# --- named safety constants (why each exists) -------------------------------------------------
# Allocator fragmentation and short-lived temporaries we do not model one by one.
FRAGMENTATION = 1.15
# Fixed cost we never see in byte counts: CUDA context is outside `max_memory_reserved`, but the
# caching allocator's rounding and cuBLAS workspaces are inside it; on the CPU, glibc arenas.
FIXED_OVERHEAD = {"cuda": 256 * 2**20, "cpu": 8 * 2**20}
# Fraction of free host RAM / disk we allow ourselves: the OS and page cache need the rest.
HOST_RAM_FRACTION = 0.7
DISK_FRACTION = 0.8
# Throughputs for the time model. CPU: measured SmolLM2-135M fp32 forward ~300 tokens/s on 2 cores
# (~80 GFLOP/s); GPU: fraction of the dense bf16 peak a decoder block reaches in practice.
CPU_FLOPS_PER_CORE = 40e9
GPU_EFFICIENCY = 0.55
GPU_PEAK_FLOPS = {"H100": 990e12, "H200": 990e12, "A100": 312e12, "4090": 165e12, "3090": 71e12, "A6000": 155e12}
DEFAULT_GPU_FLOPS = 80e12
DISK_BPS = 2e9  # cold NVMe-class read; the page cache is faster, so this is conservative
H2D_BPS = {"pinned": 25e9, "pageable": 12e9}
HOST_COPY_BPS = 8e9


def parse_bytes(text: str | int | float) -> int:
    """'8GB', '512MiB', '1.5G', 1e9 -> bytes (decimal and binary suffixes both mean powers of 1024)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not m:
        raise BudgetError(f"cannot read memory size {text!r}; write it like 8GB, 512MB or 1.5GiB")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2) or "_"))


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass(frozen=True)
class Work:
    """What is to be evaluated: K sub-models (masks) x n samples x T tokens each."""

    masks: int
    samples: int
    tokens: int

    @property
    def rows(self) -> int:
        return self.masks * self.samples


@dataclass(frozen=True)
class Machine:
    device: str  # "cpu" or "cuda[:i]"
    budget: int  # bytes of device memory (RAM on a CPU run) we may use
    host_ram: int  # bytes of host RAM we may use (== budget on a CPU run)
    disk: int  # bytes of free disk for spilling activations
    flops: float
    cores: int = 1
    gpu_name: str = ""

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")


def detect_machine(*, device: str | None, budget: int | None, spill_dir=None) -> Machine:
    """Probe the machine (psutil for RAM/disk, torch for the GPU). A CPU run's budget is RAM."""
    import os
    import tempfile

    import psutil

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    free_ram = int(psutil.virtual_memory().available * HOST_RAM_FRACTION)
    disk = int(psutil.disk_usage(str(spill_dir or tempfile.gettempdir())).free * DISK_FRACTION)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        peak = next((v for k, v in GPU_PEAK_FLOPS.items() if k in props.name), DEFAULT_GPU_FLOPS)
        return Machine(device, budget or props.total_memory, free_ram, disk, peak * GPU_EFFICIENCY, cores, props.name)
    threads = torch.get_num_threads()
    return Machine("cpu", budget or free_ram, budget or free_ram, disk, CPU_FLOPS_PER_CORE * threads, cores)


def nominal_machine(*, device: str, budget: int, gpu_name: str = "", host_ram: int = 64 * 2**30, disk: int = 500 * 2**30) -> Machine:
    """A machine described, not probed: `plan` answers 'will it fit?' for hardware you do not have."""
    if device.startswith("cuda"):
        peak = next((v for k, v in GPU_PEAK_FLOPS.items() if k in gpu_name), DEFAULT_GPU_FLOPS)
        return Machine(device, budget, host_ram, disk, peak * GPU_EFFICIENCY, 8, gpu_name)
    return Machine("cpu", budget, budget, disk, CPU_FLOPS_PER_CORE * 2, 2)


@dataclass(frozen=True)
class Plan:
    device: str
    dtype: str  # compute dtype
    order: str  # "resident" | "mask-group-major" | "layer-major"
    cache: str  # where hidden states live between blocks: "device" | "host" | "disk"
    group_rows: int  # rows (sub-model x sample) whose hidden states are live at once
    tile_rows: int  # rows pushed through a block at once
    head_chunk: int  # vocabulary rows of the LM head per chunk
    prefetch: bool  # load block l+1 while block l computes
    weights_8bit: bool
    predicted_peak_bytes: int
    predicted_seconds: float
    budget_bytes: int
    breakdown: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        b = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.breakdown.items() if isinstance(v, (int, float)) and v)
        return (
            f"plan: {self.order} on {self.device} ({self.dtype}{', 8-bit weights' if self.weights_8bit else ''}), "
            f"hidden states on {self.cache}, {self.group_rows} rows per pass in tiles of {self.tile_rows}, "
            f"LM head in chunks of {self.head_chunk}, prefetch {'on' if self.prefetch else 'off'}; "
            f"predicted peak {fmt_bytes(self.predicted_peak_bytes)} of {fmt_bytes(self.budget_bytes)} budget "
            f"({b}), predicted time {self.predicted_seconds:.1f} s"
        )


def _dtype_bytes(name: str) -> int:
    return torch.empty(0, dtype=getattr(torch, name)).element_size()


def _largest_tensor_params(spec: ModelSpec, layer: LayerStructure) -> int:
    return max(len(layer.mlp) * spec.hidden, len(layer.heads) * spec.head_dim * spec.hidden)


def activation_bytes_per_row(spec: ModelSpec, layers, tokens: int, b: int) -> int:
    """Peak live activation bytes per row inside one block (the larger of the attention and MLP phases).

    Attention: residual, normed input, q, expanded k and v, rotary temporaries for q and k, the SDPA
    output and its transposed copy -> ~ 3 hidden + 8 head-widths. MLP: residual, normed input, gate,
    up, activated gate, their product -> 3 hidden + 4 intermediate. The RMSNorm works in fp32.
    """
    heads = max(len(s.heads) for s in layers) * spec.head_dim
    width = max(len(s.mlp) for s in layers)
    per_token = max(3 * spec.hidden + 8 * heads, 3 * spec.hidden + 4 * width) * b + 2 * spec.hidden * 4
    return tokens * per_token


def candidate_cost(spec: ModelSpec, layers, work: Work, machine: Machine, *, dtype: str, order: str, cache: str,
                   group_rows: int, tile_rows: int, head_chunk: int, prefetch: bool, weights_8bit: bool,
                   src_bytes: int) -> tuple[int, float, dict, int]:
    """(device peak bytes, seconds, breakdown, host bytes) of one candidate plan."""
    b = _dtype_bytes(dtype)
    wb = 1 if weights_8bit else b
    t = work.tokens
    rows = work.rows
    block_params = [spec.block_params(s) for s in layers]
    blocks_bytes = sum(block_params) * wb
    max_block = max(block_params) * wb
    head_rows = spec.vocab
    head_bytes_full = head_rows * spec.hidden * b
    bd: dict[str, int] = {}
    if order == "resident":
        bd["weights"] = blocks_bytes + head_bytes_full
    else:
        bd["weights"] = max_block * (2 if prefetch else 1) + head_chunk * spec.hidden * b
    # The raw tensor read from disk, its sliced copy and its cast: transient, one tensor at a time.
    bd["load_transient"] = max(_largest_tensor_params(spec, s) for s in layers) * (2 * src_bytes + b)
    bd["activations"] = tile_rows * activation_bytes_per_row(spec, layers, t, b)
    bd["head_logits"] = tile_rows * t * head_chunk * 4 * 2
    row_state = t * spec.hidden * b
    if cache == "device":
        bd["hidden_cache"] = group_rows * row_state
    else:
        bd["hidden_tile"] = 2 * tile_rows * row_state
    bd["loss_state"] = rows * t * 8
    unique_tokens = min(spec.vocab, work.samples * t)
    host = 0
    emb = unique_tokens * spec.hidden * b
    if machine.is_cuda:
        host += emb + (rows * row_state if cache == "host" else 0) + max_block * 2
    else:
        bd["embedding_rows"] = emb
        if cache == "host":
            bd["hidden_cache"] = rows * row_state
    peak = int(sum(bd.values()) * FRAGMENTATION) + FIXED_OVERHEAD["cuda" if machine.is_cuda else "cpu"]

    # ---- time ----
    n_passes = math.ceil(rows / group_rows)
    avg_ctx = t / 2  # causal attention sees half the sequence on average
    flops_per_token = 2 * sum(block_params) + sum(4 * avg_ctx * len(s.heads) * spec.head_dim for s in layers)
    flops_per_token += 2 * spec.hidden * spec.vocab
    eff = machine.flops * (0.5 if (weights_8bit or (not machine.is_cuda and dtype != "float32")) else 1.0)
    # Small tiles under-use the device: a tile of fewer than ~4k tokens loses efficiency on a GPU.
    tile_tokens = tile_rows * t
    if machine.is_cuda:
        eff *= min(1.0, tile_tokens / 4096)
    compute = rows * t * flops_per_token / eff
    src_block_bytes = sum(block_params) * src_bytes
    weight_loads = 1 if order == "resident" else n_passes
    h2d = H2D_BPS["pinned"] if machine.is_cuda else HOST_COPY_BPS
    io = weight_loads * (src_block_bytes / DISK_BPS + blocks_bytes / h2d)
    io += n_passes * head_bytes_full / h2d
    cache_bw = {"device": float("inf"), "host": h2d, "disk": DISK_BPS}[cache]
    io += 2 * rows * row_state * len(layers) / cache_bw if cache != "device" else 0
    seconds = max(compute, io) if prefetch else compute + io
    return peak, seconds, bd, host


def make_plan(spec: ModelSpec, layers, work: Work, machine: Machine, *, dtype: str | None = None,
              allow_8bit: bool = False, src_bytes: int | None = None) -> Plan:
    """The fastest plan under the budget; BudgetError naming the smallest budget that would work."""
    dtypes = [dtype] if dtype else (["bfloat16"] if machine.is_cuda else ["float32"])
    src_bytes = src_bytes or spec.dtype.itemsize
    rows = work.rows
    tiles = sorted({min(rows, 2**i) for i in range(0, 16)})
    head_chunk = min(spec.vocab, 8192 if machine.is_cuda else 4096)
    fits, everything = [], []
    for dt in dtypes:
        for w8 in ([False, True] if allow_8bit and machine.is_cuda else [False]):
            for tile in tiles:
                groups = sorted({tile * k for k in (1, 2, 4, 8, 16, 32, 64, 128) if tile * k <= rows} | {rows})
                combos = [("resident", "device", g) for g in groups]
                combos += [("mask-group-major", "device", g) for g in groups if g < rows]
                combos += [("layer-major", c, rows) for c in ("device", "host", "disk")]
                for order, cache, group in combos:
                    if group % tile and group != rows:
                        continue
                    for prefetch in ([False] if order == "resident" else [False, True]):
                        peak, secs, bd, host = candidate_cost(
                            spec, layers, work, machine, dtype=dt, order=order, cache=cache, group_rows=group,
                            tile_rows=tile, head_chunk=head_chunk, prefetch=prefetch, weights_8bit=w8,
                            src_bytes=src_bytes)
                        rows_state = rows * work.tokens * spec.hidden * _dtype_bytes(dt)
                        if cache == "disk" and rows_state > machine.disk:
                            continue
                        plan = Plan(machine.device, dt, order, cache, group, tile, head_chunk, prefetch, w8,
                                    peak, secs, machine.budget, bd)
                        everything.append(plan)
                        if peak <= machine.budget and host <= machine.host_ram:
                            fits.append(plan)
    if not fits:
        smallest = min(everything, key=lambda p: p.predicted_peak_bytes)
        raise BudgetError(
            f"memory budget {fmt_bytes(machine.budget)} is too small for {work.masks} masks x {work.samples} samples x "
            f"{work.tokens} tokens of this model; the smallest plan needs {fmt_bytes(smallest.predicted_peak_bytes)} "
            f"(try --memory-budget {math.ceil(smallest.predicted_peak_bytes / 2**20)}MiB or fewer tokens per sample)",
            minimum_bytes=smallest.predicted_peak_bytes,
        )
    # Fastest first; among near-ties (2%) prefer the smaller peak, it leaves room for the unexpected.
    best = min(p.predicted_seconds for p in fits)
    return min((p for p in fits if p.predicted_seconds <= best * 1.02), key=lambda p: p.predicted_peak_bytes)
