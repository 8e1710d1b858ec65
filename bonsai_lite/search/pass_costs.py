"""Predicted times of a prune's passes besides the masked evaluations `planner.make_plan` plans:
FLAP's column norms, the residual metric's second moments, and the least-squares refit, from the
same machine rates and constants as the planner (docs/design.md, "Memory planner")."""
from __future__ import annotations

import torch

from bonsai_lite.search.machine import Machine
from bonsai_lite.search.planner import ELEMENT_FLOPS, HOST_COPY_BPS, elements_per_token, flops_per_token
from bonsai_lite.structure import ModelSpec

PAGE_CACHE_BPS = 6e9  # re-reading a checkpoint that the OS keeps in its page cache (one reader thread)


def column_norm_seconds(spec: ModelSpec, machine: Machine, *, read: bool = True) -> float:
    """Predicted time of FLAP's column norms of every layer's o_proj and down_proj (`scores.ColumnNorms`,
    once per run): the float32 slabs, plus with `read` their one read of the projections just after
    the first dense pass, from the page cache when the whole checkpoint fits there, else the share
    cached at the start from there and the rest from disk (an 8B run with the checkpoint cached read
    them in 4.5-5.7 s where a disk read was predicted at 11.4), and the read buffers' fresh pages.
    Without `read` they are taken from the dense pass's own weights (`ColumnNorms.observe`); the slabs
    are then counted as if they did not overlap the pass's reads, which they do where it waits on disk."""
    params = sum(spec.hidden * (len(s.heads) * spec.head_dim + len(s.mlp)) for s in spec.layers)
    slabs = 2 * params * 4 / HOST_COPY_BPS
    if not read:
        return slabs
    src = params * spec.dtype.itemsize
    cached = _cached_share(spec, machine)
    return _first_read_seconds(src, cached, machine) + src / machine.fresh_page_bps + slabs


def exact_cast(stored: torch.dtype, compute: torch.dtype) -> bool:
    """Whether casting a weight stored in `stored` to `compute` keeps every value exactly."""
    return compute == stored or (compute == torch.float32 and stored in (torch.float16, torch.bfloat16))


# float64 factorisations (the second moments' inverses and solves) at this share of the fp32 rate:
# on a CPU, torch's cholesky + cholesky_inverse of 576- and 1536-wide float64 matrices ran at 66
# GFLOP/s (2 d^3) on 2 threads of the EPYC VM whose fp32 probe read 193 (twenty-fourth session); a
# GPU's at half its float32 rate. A GPU's fp32 (no tensor cores: the refit runs in float32) at 7% of
# its bf16 peak (H100: 67 of 989 TFLOP/s).
FP64_CPU_FACTOR = 0.35
FP64_GPU_FACTOR = 0.5
FP32_GPU_FACTOR = 0.07
# The residual metric's second moments on a CPU, beyond those FLOPs (SmolLM2's dense passes with and
# without them, 2,048 / 4,096 / 8,192 tokens: 10.3 / 11.1 / 17.0 s, where the FLOP count gave 4.1 /
# 5.9 / 9.4): the tile products summed as float32 GEMMs at SECOND_MOMENT_GEMM_EFFICIENCY of the probe
# (a profile put them at ~0.7), and per pass ~MATRIX_ELEMENT_SECONDS for each element of every d x d
# float64 matrix (covariance, symmetrising, damping, the triangular copies, their fresh pages): with
# both, 9.7 / 12.0 / 16.6 s.
SECOND_MOMENT_GEMM_EFFICIENCY = 0.75
MATRIX_ELEMENT_SECONDS = 5e-8
# The refit on a CPU (its block pass, tile products summed into float64 moments, solves and per-layer
# host work) ran below the rates above: tools/bench_refit.py (Llama-3-8B shape cut to 2 layers, half
# of every layer kept, 2 threads, idle) took 1.24x (32 x 128 windows) and 1.19x (32 x 512) the
# unscaled prediction, and the refit stage of a whole 8B prune (all heads and 38% of the MLP kept,
# 32 x 128, 4 GB budget) 1.52x; this share puts them at 0.94x, 0.89x and 1.14x (docs/PERFORMANCE.md).
REFIT_CPU_EFFICIENCY = 0.75
# ... and its elementwise work (norms, rotary, activations, index copies, float64 sums), which the
# GEMM count leaves out, at the engine's ELEMENT_FLOPS per activation element per token. Small,
# wide-vocabulary models pay it most: the SmolLM2 refit took 1.38x (128 x 128) and 1.50x (128 x 512)
# the prediction without it, the 8B shape 1.18x and 0.94x; with it 0.96x and 1.05x, 1.13x and 0.89x
# (tools/bench_refit.py, docs/PERFORMANCE.md, twenty-third session, where it was fitted on its own).


def _large_gemm_flops(machine: Machine) -> float:
    """float32 rate of the few large GEMMs of the second moments and the refit (thousands of rows
    each): on a CPU the probed rate; on a GPU its float32 rate."""
    return machine.flops * FP32_GPU_FACTOR if machine.is_cuda else machine.flops


def _projection_inputs(spec: ModelSpec, layers) -> list[int]:
    """Input widths of each layer's o_proj and down_proj, in that order."""
    return [d for s in layers for d in (len(s.heads) * spec.head_dim, len(s.mlp))]


def second_moment_seconds(spec: ModelSpec, layers, rows: int, machine: Machine, *,
                          solve_outputs: int | None = None, kept: list[int] | None = None) -> float:
    """Predicted time of the o_proj and down_proj inputs' second moments over `rows` tokens in every
    layer of `layers` (float32 tile products), and of one float64 factorisation of each: the inverse
    (Cholesky and its inverse, d^3 flops, counted twice: they ran at half a float64 GEMM's rate here)
    that the --fluctuation residual metric pays in each dense pass (`ActivationStats` with a gram,
    d x d), or with `solve_outputs` = h the refit's (`refit._kept_moments`: for `kept` inputs of each
    projection, in the order of the projections, default all d, the k x k second moments of the kept
    inputs and their products with the dense output, 2 (k^2 + k h) a token; the dense output is the
    block's own projection, counted in `refit_seconds`' forward) and its solve for h outputs:
    Cholesky, k^3 / 3, and two triangular solves, 2 k^2 h."""
    widths = _projection_inputs(spec, layers)
    if solve_outputs is None:
        products = sum(2 * rows * d * d for d in widths)
        factor = sum(2 * d**3 for d in widths)
    else:
        h = solve_outputs
        products = sum(2 * rows * (k * k + k * h) for k in kept or widths)
        factor = sum(k**3 / 3 + 2 * k * k * h for k in kept or widths)
    fp32 = _large_gemm_flops(machine)
    if machine.is_cuda:
        return products / fp32 + factor / (fp32 * FP64_GPU_FACTOR)
    seconds = factor / (fp32 * FP64_CPU_FACTOR)
    if solve_outputs is not None:  # the refit's products: refit_seconds scales them (REFIT_CPU_EFFICIENCY)
        return seconds + products / fp32
    matrices = sum(d * d for d in widths) * MATRIX_ELEMENT_SECONDS
    return seconds + products / (fp32 * SECOND_MOMENT_GEMM_EFFICIENCY) + matrices


def refit_seconds(spec: ModelSpec, layers, tokens: int, seq_len: int, machine: Machine, *, keep: float = 1.0) -> float:
    """Predicted time of the least-squares refit (`refit.refit_model`) of the structure `layers` on
    `tokens` calibration tokens in windows of `seq_len`: one float32 pass of every unpruned block
    (each pruned layer's o_proj and down_proj applied once more after their refit, to the kept
    inputs), the pruned layers' second moments and the solves on their kept inputs, and one read of
    the parent's blocks. `layers` None: a structure not chosen yet, every layer pruned to `keep` of its inputs."""
    if layers is None:
        pruned = list(spec.layers)
        kept = [round(keep * d) for d in _projection_inputs(spec, pruned)]
    else:
        chosen = [(p, s) for p, s in zip(spec.layers, layers) if len(s.heads) < len(p.heads) or len(s.mlp) < len(p.mlp)]
        pruned = [p for p, _ in chosen]
        kept = _projection_inputs(spec, [s for _, s in chosen])
    forward = tokens * (flops_per_token(spec, spec.layers, seq_len) - 2 * spec.hidden * spec.vocab)
    forward += 2 * tokens * spec.hidden * sum(kept)
    fp32 = _large_gemm_flops(machine)
    weights = sum(spec.block_params(s) for s in spec.layers) * spec.dtype.itemsize
    cached = _cached_share(spec, machine)
    compute = forward / fp32 + second_moment_seconds(spec, pruned, tokens, machine, solve_outputs=spec.hidden, kept=kept)
    if not machine.is_cuda:
        compute = compute / REFIT_CPU_EFFICIENCY + tokens * elements_per_token(spec, spec.layers) * ELEMENT_FLOPS / fp32
    return compute + _first_read_seconds(weights, cached, machine) + weights / HOST_COPY_BPS


def _cached_share(spec: ModelSpec, machine: Machine) -> float:
    """Share of the checkpoint a first read finds in the page cache: all of it when the whole
    checkpoint fits there, else what was cached at the start."""
    ckpt = (spec.non_embedding_params() + spec.embedding_params()) * spec.dtype.itemsize
    return 1.0 if ckpt <= machine.page_cache else machine.cached


def _first_read_seconds(nbytes: float, cached: float, machine: Machine) -> float:
    """Reading `nbytes` of which the share `cached` is in the page cache and the rest on disk."""
    return nbytes * (cached / PAGE_CACHE_BPS + (1 - cached) / machine.disk_bps)
