"""The resumable run: `Pruner.iteration` (prune/loop.py) repeated to the target sparsity.

After every iteration the run state (prune/state.py) is committed with the new structure, the
compensation biases so far and the iteration's record, so a run killed at any point resumes where
it stopped (docs/RELIABILITY.md); a run directory holding other settings is refused before any work.
"""
from __future__ import annotations

import hashlib
import logging
import math
import shutil
import time
from pathlib import Path

import torch

from bonsai_lite.config import RunConfig
from bonsai_lite.errors import BonsaiError
from bonsai_lite.io.model import StreamedModel
from bonsai_lite.progress import fmt_duration
from bonsai_lite.prune.faults import checkpoint
from bonsai_lite.prune.loop import LOOP_REFIT_DIR, Pruner, PruneOutcome
from bonsai_lite.prune.presets import seconds_left
from bonsai_lite.prune.state import RunState, jsonable, layers_from_json, layers_to_json, settings_differences

log = logging.getLogger(__name__)

# search settings added after runs existed that ran without them, and the flag that resumes those runs
SETTINGS_ADDED = {"prior_memory": "--prior-memory 0", "allocation": "--allocation prior"}


def run_pruning(cfg: RunConfig, *, ids: torch.Tensor, run_dir: str | Path, restart: bool = False,
                progress=None, checkpoint_masks: int | None = None, ranks=None, estimate=None) -> PruneOutcome:
    """Run (or resume) the search; returns the final structure. Export is the caller's next step.

    `checkpoint_masks` caps the sub-models evaluated between two commits of the run state (speed
    versus work lost to a kill; results do not depend on it beyond floating-point rounding).
    `estimate` (`presets.Estimate` of this run): each iteration then logs the time left, the
    planner's remaining prediction scaled by the pace measured so far.
    """
    state = RunState(run_dir)
    key = {**jsonable(cfg.resume_key()), "calib_tokens_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
           # config.json + tensor names/shapes: a different model at the same path is not resumed
           "model_layout_sha256": StreamedModel.open(cfg.model).fingerprint()}
    n_iter = 1 if cfg.search.method == "flap" else cfg.search.iterations
    fresh = not state.exists or restart
    if not fresh:
        state.load()
        old = state.meta.get("config", {})
        diff = settings_differences(old, key)
        if diff:
            # a setting added since the run started: the flag that resumes it as it ran
            then = [flag for name, flag in SETTINGS_ADDED.items() if name not in old.get("search", {})
                    and name in key["search"]]
            raise BonsaiError(f"{run_dir} holds a run with different settings ({'; '.join(diff)}); pass "
                              + (f"{' '.join(then)} to resume it as it ran, " if then else "")
                              + "--restart to start over or use another --run-dir")
        if state.meta["iteration"] >= n_iter:
            log.info("resuming %s: the search finished before (%d iterations); exporting", run_dir, n_iter)
        else:
            log.info("resuming %s at iteration %d/%d (%d sub-models of it already evaluated)", run_dir,
                     state.meta["iteration"] + 1, n_iter, int(state.meta.get("masks_done", 0)))
    else:
        if state.exists:
            log.info("--restart: discarding the run state in %s", run_dir)
        state.meta = {"config": key, "iteration": 0, "history": [], "layers": None}
        state.tensors = {}
    pruner = Pruner(cfg, ids=ids, state=state, progress=progress, checkpoint_masks=checkpoint_masks, ranks=ranks)
    if fresh:  # the metrics of a run that is not resumed are not this run's
        pruner.progress.start_over()
    layers = layers_from_json(state.meta["layers"]) if state.meta["layers"] else pruner.parent.layers
    pruner.progress.iteration(state.meta["iteration"], n_iter)
    while state.meta["iteration"] < n_iter:
        it = state.meta["iteration"]
        biases = {k.split(":", 1)[1]: v for k, v in state.tensors.items() if k.startswith("bias:")}
        layers, biases, info = pruner.iteration(it, layers, biases)
        pace = pruner.progress.pace() if estimate is not None else None
        left = None if pace is None else seconds_left(estimate, it + 1, pace)
        log.info("iteration %d/%d: %s%s", it + 1, n_iter, iteration_line(info), "" if left is None else
                 f"; about {fmt_duration(left)} left at this run's pace ({pace:.2f}x the planner's time)")
        if cfg.refit == "loop" and it + 1 < n_iter:  # the last structure is refitted by the export
            t0 = time.perf_counter()
            overlay, refitted = pruner.refit(it, layers)
            biases = {**biases, **refitted}
            state.meta["refit_overlay"] = overlay
            info.update(refit_seconds=time.perf_counter() - t0,
                        forward_tokens=info["forward_tokens"] + cfg.refit_samples * cfg.refit_seq_len)
        for name, bias in biases.items():  # totals so far: the next iteration's model carries them
            state.tensors[f"bias:{name}"] = bias
        state.meta.update(iteration=it + 1, layers=layers_to_json(layers), masks_done=0, pending=None)
        state.meta["history"].append(info)
        if "losses" in state.tensors:  # each sub-model's loss, kept for analysis (and compared across rank counts)
            state.tensors[f"losses:{it}"] = state.tensors.pop("losses")
        for name in ("losses", "prior", "masks", "candidates") + tuple(k for k in state.tensors if k.startswith("mean:")):
            state.tensors.pop(name, None)
        state.commit()
        if cfg.refit == "loop":  # older overlays are no longer named by the state
            for old in (state.dir / LOOP_REFIT_DIR).glob("*"):
                if old.name != state.meta.get("refit_overlay"):
                    shutil.rmtree(old, ignore_errors=True)
        checkpoint("iteration")
        pruner.progress.record(stage="iteration", **{k: v for k, v in info.items() if k != "regression"},
                               **({} if left is None else dict(pace=pace, predicted_seconds_left=left)))
        pruner.progress.iteration(it + 1, n_iter)
    extra = {k.split(":", 1)[1]: v for k, v in state.tensors.items() if k.startswith("bias:")}
    return PruneOutcome(layers=layers, extra_biases=extra, history=state.meta["history"])


def iteration_line(info: dict) -> str:
    """One short line for the log: what an iteration removed and how sure the regression was."""
    parts = [f"removed {info['removed_units']} units", f"{info['params_non_embedding'] / 1e6:.1f}M non-embedding "
             "params left"]
    if info.get("cv_kendall_tau") is not None:
        parts.append(f"tau {info['cv_kendall_tau']:.2f}")
    if info.get("loss_mean") is not None:
        parts.append(f"sub-model loss {info['loss_mean']:.3f} +- {info['loss_std']:.3f}")
    if info.get("confirmed") is False:
        parts.append(f"sub-model {info['best_mask']} not confirmed on fresh windows ({info['confirm_best']:.3f} "
                     f"against the prior's proposal's {info['confirm_prior']:.3f}): removed the proposal")
    elif info.get("best_mask") is not None:
        parts.append(f"removed as sub-model {info['best_mask']} ({info['loss_best']:.3f}; the prior's proposal "
                     f"{info['loss_prior']:.3f})")
    if info.get("allocation") is not None:
        (a, e), losses = info["allocation"], info["allocation_losses"]
        text = (f"allocation heads {a:+g}, edge layers {e:+g} of {len(losses)} tried (loss "
                f"{losses.get(f'{a:g},{e:g}', math.nan):.3f}; the prior's {losses['0,0']:.3f})")
        if info.get("allocation_confirmed") is False:
            text = (f"allocation: the prior's, the best of {len(losses)} tried not confirmed on fresh windows "
                    f"(its {info['allocation_confirm'][0]:.3f} against the prior's {info['allocation_confirm'][1]:.3f})")
        parts.append(text)
    parts.append(f"dense loss {info['dense_nll']:.3f}, {info['seconds']:.0f} s")
    return ", ".join(parts)
