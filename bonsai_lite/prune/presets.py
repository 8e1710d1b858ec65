"""Search settings for a wall-clock budget, from the planner's time model.

A ladder of settings from the cheapest (`quick`) to the paper's, each rung spending more forward
tokens where issue 10's measurements say it pays (more sub-models, then longer windows, then a
larger dense pass). `--time-budget` takes the most expensive rung whose predicted prune time fits.
The prediction sums, per iteration, the planner's predicted seconds for the dense pass and for the
sub-model evaluations on the structure left at that iteration (the model shrinks as it is pruned).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch

from bonsai_lite.config import (PRESETS, auto_allocation, auto_first_step, auto_regression, dense_scale, removal_schedule,
                                smallest_step)
from bonsai_lite.errors import BonsaiError
from bonsai_lite.prune.refit import auto_refit_samples, refit_peak_bytes, residual_fits
from bonsai_lite.search.machine import Machine
from bonsai_lite.search.offsets import allocation_grid
from bonsai_lite.search.pass_costs import column_norm_seconds, exact_cast, refit_seconds, second_moment_seconds
from bonsai_lite.search.planner import Work, make_plan
from bonsai_lite.structure import ModelSpec

LADDER: tuple[tuple[str, dict], ...] = (
    ("quick", PRESETS["quick"]),
    ("quick+prior", dict(PRESETS["quick"], prior_samples=16, prior_seq_len=512)),
    ("standard", PRESETS["standard"]),
    ("standard-64", dict(PRESETS["standard"], masks_per_iter=64, samples=8, seq_len=256, prior_samples=32)),
    ("standard-100", dict(PRESETS["standard"], masks_per_iter=100, samples=16, seq_len=512, prior_samples=32,
                          prior_seq_len=1024)),
    ("paper", PRESETS["paper"]),
)
# Methods that evaluate sub-models; the others only pay the dense pass of each iteration.
SEARCH_METHODS = ("bonsai", "bonsai-noregress")
# Every rung is open to Bonsai again: with the guard and within-group ranking (issue 10) `standard`
# measured better than `quick` (SmolLM2 35%, 3 seeds: 105.6 against 125.8, docs/RESULTS.md), where
# the unguarded global ranking of betas had given 521.7.


def parse_seconds(text: str) -> float:
    """'90s', '20m', '1.5h' or a plain number of seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", str(text))
    if not m:
        raise BonsaiError(f"cannot read the time budget {text!r}; use e.g. 300s, 20m or 1.5h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


@dataclass(frozen=True)
class Estimate:
    """A rung's predicted prune: `seconds` = `start` (FLAP's one column read) + sum(`iterations`, each
    with its own refit under --refit loop) + `refit` (the refit after the search)."""
    name: str
    settings: dict
    seconds: float
    forward_tokens: int
    iterations: tuple[float, ...] = ()
    start: float = 0.0
    refit: float = 0.0


def seconds_left(e: Estimate, done: int, pace: float) -> float:
    """What is left of the prune `e` predicts once `done` iterations are over: its iterations at
    `pace` (the run's measured seconds per planned second so far: the planner calibrated on the run
    itself), the refit after the search at its own prediction. The refit's time model was fitted
    apart from the search's (`pass_costs.refit_seconds`), and a search running slow does not make it
    slow: SmolLM2 at 50% (docs/PERFORMANCE.md) searched at 1.12x and 1.15x its plan while its refit
    ran at 0.87x and 0.83x of its own, which the pace read as 1.27-1.37x of the time left."""
    return pace * sum(e.iterations[done:]) + e.refit


def estimate(spec: ModelSpec, settings: dict, *, method: str, sparsity: float, machine: Machine,
             dtype: str | None = None, refit: str = "off", refit_samples: int = 0,
             fluctuation: str = "variance", first_step: float | str = 0.0, regression: str = "unit",
             allocation: str = "prior", allow_8bit: bool = False) -> Estimate:
    """Predicted prune seconds and forward tokens for one rung (export and tokenisation excluded).

    `refit` ("off", "ls", "loop", or "auto": ls where its memory fits) adds the least-squares refit
    on `refit_samples` windows of the dense pass's length (after every iteration with "loop"; 0: the
    most that fit the memory, `refit.auto_refit_samples`);
    `fluctuation` ("auto": residual when the run refits and `refit.residual_fits`) adds the residual
    metric's second moments to each dense pass of the methods that use FLAP's metric; `first_step`
    is --first-step (`config.removal_schedule`; "auto": `config.auto_first_step`); `regression` "none"
    evaluates no sub-models ("auto": `config.auto_regression` of the rung's windows); `allocation`
    "search" adds, per iteration, the sub-models of the whole offset grid and the two that confirm a
    winner (an upper bound: identical removals are evaluated once, and a confirmation only when the
    prior's allocation does not win; "auto": `config.auto_allocation`)."""
    p_iter = min(settings["p_iter"], sparsity)
    if regression == "auto":
        regression = auto_regression(method, settings["samples"], settings["seq_len"])
    prior_n = settings.get("prior_samples") or settings["samples"]
    prior_t = settings.get("prior_seq_len") or settings["seq_len"]  # the refit's windows
    dense_t = prior_t if settings.get("prior_samples") else settings["seq_len"]  # without its own: the search's
    if not refit_samples:
        refit_samples = auto_refit_samples(spec, prior_t, machine.budget)
    if refit == "auto":
        fits = refit_peak_bytes(spec, refit_samples * prior_t, prior_t) <= machine.budget
        refit = "ls" if fits else "off"
    flap_metric = method in ("bonsai", "flap")  # FLAP's scores: bonsai's default prior, and flap itself
    residual = flap_metric and (fluctuation == "residual" or (
        fluctuation == "auto" and refit != "off" and residual_fits(spec, prior_n * dense_t, machine.budget)))
    if first_step == "auto":  # bonsai's default prior is FLAP's (flap-parent)
        first_step = auto_first_step(method, regression, "flap-parent", "residual" if residual else "variance",
                                     p_iter, sparsity)
    schedule = (sparsity,) if method == "flap" else removal_schedule(sparsity, p_iter, first_step)
    n_iter = len(schedule)
    if allocation == "auto":  # bonsai's default prior is FLAP's (flap-parent)
        allocation = auto_allocation(method, "flap-parent" if method == "bonsai" else "wanda", regression,
                                     smallest_step(schedule))
    # a step larger than p_iter draws more dense-pass windows (config.dense_scale), when it has its own
    steps = [schedule[it] - (schedule[it - 1] if it else 0.0) for it in range(n_iter)]
    scales = [dense_scale(method, st, p_iter, first_step) if settings.get("prior_samples") else 1 for st in steps]
    # one dense pass on the parent per scale, with the residual metric's second moments
    plans = {k: make_plan(spec, spec.layers, Work(1, prior_n * k, dense_t), machine, dtype=dtype,
                       allow_8bit=allow_8bit) for k in set(scales)}
    per_scale = {k: p.predicted_seconds + (second_moment_seconds(spec, spec.layers, prior_n * k * dense_t, machine)
                                           if residual else 0.0) for k, p in plans.items()}
    # FLAP's column norms, once per run: taken in the first dense pass where it loads the projections
    # as stored or exactly cast (`scores.whole_projections`), else read once more
    first = plans[scales[0]]
    taken = not first.weights_8bit and exact_cast(spec.dtype, getattr(torch, first.dtype))
    start = column_norm_seconds(spec, machine, read=not taken) if flap_metric else 0.0
    ev_seconds, ev_tokens = 0.0, 0
    if method in SEARCH_METHODS and regression != "none":  # one iteration's sub-models on the parent
        k = settings["masks_per_iter"]
        ev_seconds = make_plan(spec, spec.layers, Work(k, settings["samples"], settings["seq_len"]), machine,
                               dtype=dtype, allow_8bit=allow_8bit).predicted_seconds
        ev_tokens = k * settings["samples"] * settings["seq_len"]
    if allocation == "search" and method in SEARCH_METHODS:  # the grid's sub-models, then a confirming pair
        k = len(allocation_grid()) + 2
        ev_seconds += make_plan(spec, spec.layers, Work(k, settings["samples"], settings["seq_len"]), machine,
                                dtype=dtype, allow_8bit=allow_8bit).predicted_seconds
        ev_tokens += k * settings["samples"] * settings["seq_len"]
    # the structure at iteration `it` keeps ~(1 - what the iterations before removed) of the prunable
    # parameters: scale the parent's compute by it (the planner's time is dominated by compute on a CPU)
    iterations = [max(0.05, 1.0 - (schedule[it - 1] if it else 0.0)) * (per_scale[scales[it]] + ev_seconds)
                  for it in range(n_iter)]
    tokens = sum(prior_n * dense_t * k + ev_tokens for k in scales)
    refits = 0 if refit == "off" else (n_iter if refit == "loop" else 1)
    one_refit = refit_seconds(spec, None, refit_samples * prior_t, prior_t, machine, keep=1 - sparsity) if refits else 0.0
    for it in range(refits - 1):  # --refit loop: after every iteration but the last, whose refit follows the search
        iterations[it] += one_refit
    tokens += refits * refit_samples * prior_t  # the refit passes each block once, as the loop counts it
    seconds = start + sum(iterations) + one_refit
    return Estimate("", dict(settings), seconds, tokens, tuple(iterations), start, one_refit)


def fit_time_budget(spec: ModelSpec, budget_seconds: float, *, method: str, sparsity: float, machine: Machine,
                    dtype: str | None = None, **extra) -> Estimate:
    """The most expensive rung of LADDER predicted to fit; BonsaiError naming the cheapest otherwise."""
    best = None
    cheapest = None
    for name, settings in LADDER:
        e = estimate(spec, settings, method=method, sparsity=sparsity, machine=machine, dtype=dtype, **extra)
        e = replace(e, name=name)
        cheapest = cheapest or e
        if e.seconds <= budget_seconds:
            best = e
    if best is None:
        raise BonsaiError(f"no search settings fit a time budget of {budget_seconds:.0f} s: the cheapest ('quick') "
                          f"is predicted to take {cheapest.seconds:.0f} s on this machine; give a larger "
                          "--time-budget or a larger --p-iter")
    return best
