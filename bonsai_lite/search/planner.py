"""Memory planner: choose how masked evaluation runs inside a memory budget, from byte counts alone.

The planner needs only the model's shape (config.json), the work (masks x samples x tokens) and the
machine (budget, host RAM, disk, device kind). It enumerates execution orders, tile and group sizes,
LM-head chunks, prefetch and precision, predicts each candidate's peak memory and time with the cost
model below, keeps those under the budget and picks the fastest. docs/design.md ("Memory planner")
explains the model; tools/bench_engine.py measures how well it predicts (docs/PERFORMANCE.md). The
machine (what it has, how fast it computes and reads) comes from `machine.py`.

Peak memory is modelled in two phases that never overlap in the engine: the *block phase* (weights
of one block, two with prefetch, the copies made while the next one is read, sliced and cast, and a
tile's activations) and the *head phase* (an LM-head chunk, the normed tile and its logits). What
lives through both (hidden-state cache, embedding rows; all weights when resident) is added to the
larger of the two.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from bonsai_lite.errors import BudgetError
from bonsai_lite.search.machine import (DISK_BPS, LOW_PRECISION_CPU_FACTOR, Machine,
                                       fmt_bytes)
from bonsai_lite.structure import LayerStructure, ModelSpec

# --- named safety constants (why each exists) -------------------------------------------------
# Allocator fragmentation and short-lived temporaries we do not model one by one.
FRAGMENTATION = 1.15
# Fixed cost we never see in byte counts: CUDA context is outside `max_memory_reserved`, but the
# caching allocator's rounding and cuBLAS workspaces are inside it; on the CPU, Python objects and
# glibc's small-chunk heap (large blocks go straight back to the OS, see `bound_host_allocator`).
FIXED_OVERHEAD = {"cuda": 256 * 2**20, "cpu": 8 * 2**20}
# GPUs without fast bf16: evaluate in float16 there (appendix G's fp32 retry catches overflows).
FP16_ONLY_GPUS = ("V100", "T4", "P100", "P40", "1080", "2080")
# A tile of N tokens reaches N / (N + HALF_EFFICIENCY_TOKENS) of the device's GEMM rate: small
# GEMMs are bound by memory and launch latency. CPU: one thread ran a 64-token fp32 GEMM as fast as
# a 2048-token one; GPU: an H100 needs ~1k tokens per GEMM to pass half its bf16 peak.
HALF_EFFICIENCY_TOKENS = {"cpu": 32, "cuda": 1024}
# A CPU engine pass (`_cost`): its GEMMs at the probed rate (x the bf16 factor, x the tile's
# `_efficiency`), plus ELEMENT_FLOPS probe-rate flops per activation element per token for the
# elementwise work beside them (norms, rotary, SiLU, softmax, copies: `_Shape.elements_per_token`),
# which weighs most in small models. Re-planning every stored 8B-shape run (docs/PERFORMANCE.md,
# twenty-fourth session) puts all fourteen idle ones within 30% (0.73-1.28; one engine rate at 0.55
# of the probe had eight), and SmolLM2's dense passes at 0.94x of that rate's predictions, which
# fitted them: the 8B shape's extra rows ran at 0.90-0.98 of the probe on an EPYC in fp32 and bf16.
# With the loader's weight handling priced as it happens (`_cost`, twenty-fifth session) all
# eighteen EPYC runs re-plan within 30% (0.73-1.17; the 0.73 is fp32 on huge pages, whose 128-token
# GEMMs ran slower than this rate); five of the Xeon VM's thirteen, its fastest, at 0.58-0.74 (its
# engine took 49-76 s for the same work).
ELEMENT_FLOPS = 2400
# Fixed cost of one block call / one LM-head chunk call on one tile: Python and ~30 kernel launches.
CALL_SECONDS = {"cpu": 5e-4, "cuda": 4e-4}
# LLM.int8 matmuls (quantise the activations, int8 GEMM, dequantise, outlier columns in fp16) reach
# about 60% of a bf16 GEMM.
INT8_FACTOR = 0.6
# Device bytes beside an int8 block while the next projection is quantised: a 16 MiB slab of rows
# in the compute dtype, its fp16 copy and its int8 result (int8.QUANT_CHUNK_BYTES).
INT8_SLAB_TRANSIENT = 48 * 2**20
# The engine maps its weights (`Checkpoint.map`): a cached page costs its page-table entry, not a copy
# (madvise populate of 6.3 GB of cached shards took 0.41-0.50 s on one thread of the EPYC VM).
MAPPED_BPS = 12e9
H2D_BPS = {"pinned": 25e9, "pageable": 12e9}
HOST_COPY_BPS = 8e9  # memcpy-class host work: slicing, casting, pinning


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

    def summary(self) -> str:
        """One short line (the per-iteration log of a run); `describe()` has the memory breakdown."""
        return (f"{self.order}, {self.cache} cache, {self.group_rows} rows/pass, tile {self.tile_rows}, {self.dtype}; "
                f"peak {fmt_bytes(self.predicted_peak_bytes)} of {fmt_bytes(self.budget_bytes)}, "
                f"~{self.predicted_seconds:.0f} s")

    def describe(self) -> str:
        b = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.breakdown.items()
                      if isinstance(v, (int, float)) and v and not k.endswith("_s"))
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
    SDPA is a flash kernel on CPU and CUDA: its workspace is O(tokens), not O(tokens^2).
    """
    return _Shape.of(spec, layers).activation_bytes_per_row(tokens, b)


def flops_per_token(spec: ModelSpec, layers, tokens: int) -> float:
    """Forward FLOPs per token of the (unmasked) structure: what the engine computes for every row."""
    return _Shape.of(spec, layers).flops_per_token(tokens)


def elements_per_token(spec: ModelSpec, layers) -> int:
    """Activation elements the blocks of the structure produce per token (`ELEMENT_FLOPS` each)."""
    return _Shape.of(spec, layers).elements_per_token()


def _sliced_params(spec: ModelSpec, layer: LayerStructure, parent: LayerStructure) -> int:
    """Parameters of `layer` that the loader copies out of the checkpoint's tensors: a projection
    whose units are all kept is passed through uncut (`slicing.is_identity`)."""
    h, hd = spec.hidden, spec.head_dim
    return (2 * len(layer.heads) * hd * h * (layer.heads != parent.heads)  # q rows, o columns
            + 2 * len(layer.kv) * hd * h * (layer.kv != parent.kv)  # k, v rows
            + 3 * len(layer.mlp) * h * (layer.mlp != parent.mlp))  # gate, up rows, down columns


def _efficiency(machine: Machine, tile_tokens: int) -> float:
    half = HALF_EFFICIENCY_TOKENS["cuda" if machine.is_cuda else "cpu"]
    return tile_tokens / (tile_tokens + half)


@dataclass(frozen=True)
class _Shape:
    """The per-model numbers the cost model needs, summed over layers once per `make_plan`."""

    hidden: int
    vocab: int
    head_dim: int
    window: int | None
    n_layers: int
    block_params: tuple[int, ...]
    largest: int  # parameters of the largest projection
    max_heads: int
    max_width: int
    attn_heads: int  # query heads over all layers
    mlp_units: int  # MLP units over all layers
    read_params: int  # block parameters the loader reads: the checkpoint's, whatever was pruned since
    sliced_params: int  # block parameters it copies out of them (`slicing.slice_param` on pruned projections)

    @classmethod
    def of(cls, spec: ModelSpec, layers) -> "_Shape":
        parents = spec.layers if len(spec.layers) == len(layers) else layers
        return cls(spec.hidden, spec.vocab, spec.head_dim, spec.sliding_window, len(layers),
                   tuple(spec.block_params(s) for s in layers), max(_largest_tensor_params(spec, s) for s in layers),
                   max(len(s.heads) for s in layers), max(len(s.mlp) for s in layers), sum(len(s.heads) for s in layers),
                   sum(len(s.mlp) for s in layers), sum(spec.block_params(p) for p in parents),
                   sum(_sliced_params(spec, s, p) for s, p in zip(layers, parents)))

    def flops_per_token(self, tokens: int) -> float:
        """Dense forward FLOPs per token: 2 x block params, causal attention over half the context, the head."""
        ctx = min(tokens, self.window or tokens) / 2
        return 2 * sum(self.block_params) + 4 * ctx * self.attn_heads * self.head_dim + 2 * self.hidden * self.vocab

    def elements_per_token(self) -> int:
        """Activations the blocks produce per token: hidden + attention width + MLP width, each layer."""
        return self.n_layers * self.hidden + self.attn_heads * self.head_dim + self.mlp_units

    def activation_bytes_per_row(self, tokens: int, b: int) -> int:
        per_token = max(3 * self.hidden + 8 * self.max_heads * self.head_dim, 3 * self.hidden + 4 * self.max_width)
        return tokens * (per_token * b + 2 * self.hidden * 4)


def candidate_cost(spec: ModelSpec, layers, work: Work, machine: Machine, *, dtype: str, order: str, cache: str,
                   group_rows: int, tile_rows: int, head_chunk: int, prefetch: bool, weights_8bit: bool,
                   src_bytes: int) -> tuple[int, float, dict, int]:
    """(device peak bytes, seconds, breakdown, host bytes) of one candidate plan."""
    return _cost(_Shape.of(spec, layers), work, machine, dtype=dtype, order=order, cache=cache, group_rows=group_rows,
                 tile_rows=tile_rows, head_chunk=head_chunk, prefetch=prefetch, weights_8bit=weights_8bit,
                 src_bytes=src_bytes)


def _cost(m: _Shape, work: Work, machine: Machine, *, dtype: str, order: str, cache: str, group_rows: int,
          tile_rows: int, head_chunk: int, prefetch: bool, weights_8bit: bool, src_bytes: int):
    cuda = machine.is_cuda
    b = _dtype_bytes(dtype)
    wb = 1 if weights_8bit else b
    t, h, rows = work.tokens, m.hidden, work.rows
    tile = min(tile_rows, group_rows)
    params = sum(m.block_params)
    blocks_bytes = params * wb
    max_block = max(m.block_params) * wb
    largest = m.largest
    head_full = m.vocab * h * b
    row_state = t * h * b
    resident = order == "resident"
    # ---- memory: what lives through both phases ----
    live: dict[str, int] = {}
    if resident:
        live["weights"] = blocks_bytes + head_full
    if cache == "device":
        live["hidden_cache"] = group_rows * row_state
    if cuda:
        live["masks"] = work.masks * (m.attn_heads + m.mlp_units)  # bool [K, units], sent once per pass
    unique_tokens = min(m.vocab, work.samples * t)
    emb = unique_tokens * h * b
    host = 0
    if cuda:
        # Host side: embedding rows, a host cache, and the read -> slice -> cast -> pin chain of the
        # tensors in flight (the pinned copies stay in torch's caching host allocator).
        host = emb + (rows * row_state if cache == "host" else 0) + max(m.block_params) * b + largest * (2 * src_bytes + b)
    else:
        live["embedding_rows"] = emb
        if cache == "host":
            live["hidden_cache"] = rows * row_state
    # ---- block phase ----
    blk: dict[str, int] = {}
    if not resident:
        blk["weights"] = max_block * (2 if prefetch else 1)
    if cuda:
        # Int8Loader quantises a 16 MiB slab of rows at a time on the device (search/int8.py).
        blk["load_transient"] = INT8_SLAB_TRANSIENT if weights_8bit else 0
    else:
        # Read (src) -> index_select copy (src) -> cast (b): beyond the block's own copy, the peak is
        # max(raw + sliced, sliced + cast) - cast for the largest tensor.
        blk["load_transient"] = largest * (max(2 * src_bytes, src_bytes + b) - b)
    blk["activations"] = tile * m.activation_bytes_per_row(t, b)
    if m.window is not None and t > m.window:
        blk["window_mask"] = t * t * 9  # bool mask, and SDPA's float copy of it
    if cache != "device":
        blk["hidden_tile"] = 2 * tile * row_state  # the tile read back and the tile written out
    # ---- head phase ----
    hd: dict[str, int] = {}
    if not resident:
        hd["head_chunk"] = head_chunk * h * (b + (src_bytes if not cuda and src_bytes != b else 0))
    hd["head_normed"] = tile * t * h * (b + 8)  # fp32 RMSNorm temporaries
    hd["head_logits"] = tile * t * head_chunk * (b + 8)  # logits, fp32 copy, logsumexp's exp()
    hd["loss_state"] = group_rows * t * 8 + tile * t * 8  # running lse/target per token, targets
    if cache != "device":
        hd["hidden_tile"] = tile * row_state
    phase = max(sum(blk.values()), sum(hd.values()))
    peak = int((sum(live.values()) + phase) * FRAGMENTATION) + FIXED_OVERHEAD["cuda" if cuda else "cpu"]
    bd = {**{f"block:{k}": v for k, v in blk.items()}, **{f"head:{k}": v for k, v in hd.items()}, **live}
    bd = {k: v for k, v in bd.items() if v}

    # ---- time ----
    n_passes = math.ceil(rows / group_rows)
    tile_calls = n_passes * math.ceil(group_rows / tile)
    kind = "cuda" if cuda else "cpu"
    flops_per_token = m.flops_per_token(t)
    if cuda:
        rate = machine.flops * _efficiency(machine, tile * t) * (INT8_FACTOR if weights_8bit else 1.0)
        compute = rows * t * flops_per_token / rate
    else:  # GEMMs near the probe's rate, and the elementwise work beside them at a cost per activation
        rate = machine.flops * _efficiency(machine, tile * t)
        if dtype == "bfloat16":
            rate *= machine.bf16_factor
        elif dtype != "float32":
            rate *= LOW_PRECISION_CPU_FACTOR
        compute = rows * t * (flops_per_token / rate + m.elements_per_token() * ELEMENT_FLOPS / machine.flops)
    compute += tile_calls * (m.n_layers + math.ceil(m.vocab / head_chunk)) * CALL_SECONDS[kind]
    # Weights: mapped each pass (once when resident); the first pass reads from disk what the page
    # cache lacks at the start, later ones find it all there when the checkpoint fits. The loader
    # maps the checkpoint's whole tensors, copies the kept units out of pruned ones and casts what
    # is not in the compute dtype (on a GPU run it pins the result): an unpruned bf16 model computed
    # in bf16 is only mapped.
    src_total = (m.read_params + m.vocab * h) * src_bytes
    loads = 1 if resident else n_passes
    rereads_from_disk = src_total > machine.page_cache - host
    disk_bytes = src_total * (1 - machine.cached) + (loads - 1) * src_total * rereads_from_disk
    disk_io = disk_bytes / machine.disk_bps
    read = disk_io + (loads * src_total - disk_bytes) / MAPPED_BPS
    disk_share = disk_bytes / (loads * src_total) if src_total else 0.0  # of the blocks streamed
    sliced = m.sliced_params * src_bytes
    cast_bytes = (params + m.vocab * h) * b if b != src_bytes else 0
    if cuda:  # slice, cast and pin on the host
        prep = loads * (sliced + cast_bytes + (params + m.vocab * h) * b) / HOST_COPY_BPS
    else:  # slice and cast; the sliced copy and the cast copy fault their pages in
        prep = loads * (sliced + cast_bytes) * (1 / HOST_COPY_BPS + 1 / machine.fresh_page_bps)
        compute += rows * m.n_layers * m.activation_bytes_per_row(t, b) / machine.fresh_page_bps
    h2d = loads * (blocks_bytes + head_full) / H2D_BPS["pinned"] if cuda else 0.0
    cache_bw = {"device": math.inf, "host": H2D_BPS["pinned"] if cuda else HOST_COPY_BPS, "disk": DISK_BPS}[cache]
    spill = 2 * rows * row_state * m.n_layers / cache_bw
    if cache == "disk":  # the spill also occupies the disk the weights stream from, in every block
        spill_io = 2 * rows * row_state * m.n_layers / machine.disk_bps
        read, disk_io = read + spill_io, disk_io + disk_share * spill_io
    if cuda:  # the prefetch thread's host work (map, slice, cast, pin) overlaps the GPU's compute, but
        # not all of the stream: the copies are queued on the compute stream (`BlockLoader._to_device`),
        # so they run between the kernels, not beside them; and each pass's first block and its LM-head
        # chunks are mapped, pinned and sent from the main thread with nothing to hide behind
        # (`engine._Weights`, `loader.head_chunks`). Without this, a pass was free whenever compute
        # outweighed its stream, and an H200 ran the prune's 4-pass choices 1.15-1.2x slower than
        # the 1-2 pass plans the planner had priced the same (docs/PERFORMANCE.md).
        first = (max(m.block_params) + m.vocab * h) / (params + m.vocab * h)
        in_line = h2d + first * (prep + read - disk_io)
        host_work, serial = (1 - first) * prep, compute + spill + in_line
        hidden_read = read - first * (read - disk_io)
    else:  # the loader thread's copies compete with the GEMMs for the same cores; only I/O overlaps
        host_work, serial, hidden_read = 0.0, compute + prep + spill, read
    if prefetch:  # a block's I/O hides behind its neighbour's compute only: the blocks read from disk
        # and those found in the page cache form two groups (contiguous after a scan larger than the
        # cache), each bound by its own I/O or by its own share of the compute
        seconds = (max(disk_share * serial, disk_io + disk_share * host_work)
                   + max((1 - disk_share) * serial, hidden_read - disk_io + (1 - disk_share) * host_work))
    else:
        seconds = serial + hidden_read + host_work
    bd.update(compute_s=round(compute, 3), weights_io_s=round(read + prep + h2d, 3), spill_s=round(spill, 3))
    return peak, seconds, bd, host


def _plan_dtypes(machine: Machine, dtype: str | None) -> list[str]:
    if dtype:
        return [dtype]
    if not machine.is_cuda:
        return ["float32"]
    return ["float16" if any(g in machine.gpu_name for g in FP16_ONLY_GPUS) else "bfloat16"]


# Group sizes (in tiles) tried for device-resident hidden states: steps of sqrt(2), so the group
# chosen is at most 1.4x smaller than the largest that fits; budget-independent, which keeps the
# choice monotone in the budget (see the end of `make_plan`).
GROUP_TILES = sorted({round(2 ** (k / 2)) for k in range(40)})


def make_plan(spec: ModelSpec, layers, work: Work, machine: Machine, *, dtype: str | None = None,
              allow_8bit: bool = False, src_bytes: int | None = None) -> Plan:
    """The fastest plan under the budget; BudgetError naming the smallest budget that would work."""
    shape = _Shape.of(spec, layers)
    src_bytes = src_bytes or spec.dtype.itemsize
    rows = work.rows
    tiles = sorted({min(rows, 2**i) for i in range(0, 16)})
    chunks = sorted({min(spec.vocab, c) for c in ((1024, 4096, 16384) if machine.is_cuda else (1024, 4096))})
    fits: list[Plan] = []
    smallest: Plan | None = None
    for dt in _plan_dtypes(machine, dtype):
        state_bytes = rows * work.tokens * spec.hidden * _dtype_bytes(dt)
        for w8 in ([False, True] if allow_8bit and machine.is_cuda else [False]):
            for tile in tiles:
                groups = sorted({tile * k for k in GROUP_TILES if tile * k < rows} | {rows})
                combos = [("layer-major", c, rows, pf) for c in ("device", "host", "disk") for pf in (False, True)]
                combos += [("mask-group-major", "device", g, pf) for g in groups[:-1] for pf in (False, True)]
                combos += [("resident", "device", g, False) for g in groups]
                for chunk in chunks:
                    for order, cache, group, prefetch in combos:
                        if cache == "disk" and state_bytes > machine.disk:
                            continue
                        peak, secs, bd, host = _cost(
                            shape, work, machine, dtype=dt, order=order, cache=cache, group_rows=group,
                            tile_rows=tile, head_chunk=chunk, prefetch=prefetch, weights_8bit=w8, src_bytes=src_bytes)
                        if host > machine.host_ram:
                            continue  # a larger device budget would not help this one
                        plan = Plan(machine.device, dt, order, cache, group, tile, chunk, prefetch, w8, peak, secs,
                                    machine.budget, bd)
                        if smallest is None or peak < smallest.predicted_peak_bytes:
                            smallest = plan
                        if peak <= machine.budget:
                            fits.append(plan)
    if smallest is None:
        raise BudgetError(
            f"no plan fits this machine's host RAM ({fmt_bytes(machine.host_ram)} usable) and disk "
            f"({fmt_bytes(machine.disk)} free) for {work.masks} masks x {work.samples} samples x {work.tokens} tokens; "
            "free RAM or disk, or evaluate fewer masks or tokens at once")
    if not fits:
        need = smallest.predicted_peak_bytes
        hint = ", or allow 8-bit weights" if machine.is_cuda and not allow_8bit else ""
        raise BudgetError(
            f"memory budget {fmt_bytes(machine.budget)} is too small for {work.masks} masks x {work.samples} samples x "
            f"{work.tokens} tokens of this model; the smallest plan needs {fmt_bytes(need)} "
            f"(try --memory-budget {math.ceil(need / 2**20)}MiB, or fewer tokens per sample{hint})",
            minimum_bytes=need,
        )
    # Fastest first; among near-ties (2%) prefer the smaller peak, it leaves room for the unexpected.
    # The candidates do not depend on the budget, so a larger budget only adds plans whose peak
    # exceeds every old one: the choice stays the same or gets faster (monotone, tested).
    best = min(p.predicted_seconds for p in fits)
    return min((p for p in fits if p.predicted_seconds <= best * 1.02), key=lambda p: p.predicted_peak_bytes)
