"""Library entry point of a whole prune: inputs checked first, search (resumable), export (atomic)."""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_tensors

from bonsai_lite.calib.data import calibration_tokens, load_tokenizer, read_text, tokenize
from bonsai_lite.config import ALLOCATION_MIN_STEP, RunConfig, auto_first_step
from bonsai_lite.errors import BonsaiError, BudgetError
from bonsai_lite.io.fingerprint import model_fingerprint
from bonsai_lite.io.model import StreamedModel
from bonsai_lite.io.outdir import check_destination, check_free_space
from bonsai_lite.prune.distributed import agreement_facts, from_env, host_budget_share
from bonsai_lite.prune.run import run_pruning
from bonsai_lite.prune.state import RunState, atomic_write_bytes
from bonsai_lite.progress import METRICS_NAME, fmt_duration, make_progress, process_peak_rss_bytes
from bonsai_lite.search.machine import detect_machine, search_dtype
from bonsai_lite.search.offsets import allocation_grid
from bonsai_lite.search.planner import Work, make_plan
from bonsai_lite.search.sampling import _n_fixed

log = logging.getLogger(__name__)

SAMPLED_METHODS = ("bonsai", "bonsai-noregress")  # methods that evaluate perturbed sub-models
SELF_TEXT = "calib-sampled.safetensors"  # in the run directory: calibration text sampled from the model
REFIT_DIR = "refit"  # in the run directory: the refitted projections the export reads (prune/refit.py)


def default_run_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".run")


def prunable_params(spec, layers) -> int:
    """Parameters of attention and MLP projections (what pruning can remove): non-embedding minus norms."""
    return spec.non_embedding_params(layers) - spec.hidden * (2 * len(layers) + 1)


def calibration_ids(cfg: RunConfig, model_dir, *, cache_dir: str | Path | None = None):
    """Token ids of the calibration text; text sampled from the model is kept in `cache_dir` (the
    run directory), so that a resumed run does not sample it again (hours when streamed)."""
    tok = load_tokenizer(model_dir)
    if cfg.calib.text is not None:
        return tokenize(tok, read_text(cfg.calib.text))
    from bonsai_lite.calib.self_text import sample_text_ids

    key = json.dumps({"model": str(model_dir), "samples": cfg.calib.samples, "seq_len": cfg.calib.seq_len,
                      "seed": cfg.search.seed}, sort_keys=True)
    cached = Path(cache_dir) / SELF_TEXT if cache_dir is not None else None
    if cached is not None and cached.is_file():
        try:
            with safe_open(str(cached), "pt") as f:
                if f.metadata().get("key") == key:
                    log.info("calibration text sampled from the model earlier: %s", cached)
                    return f.get_tensor("ids")
        except (OSError, SafetensorError):
            pass  # unreadable: sample again
    log.info("no --calib text given: sampling calibration text from the parent model itself (seed %d)",
             cfg.search.seed)
    ids = sample_text_ids(model_dir, tokenizer=tok, samples=cfg.calib.samples, seq_len=cfg.calib.seq_len,
                          seed=cfg.search.seed, device=cfg.device, budget=cfg.budget)
    if cached is not None:
        atomic_write_bytes(cached, save_tensors({"ids": ids.contiguous()}, metadata={"key": key}))
    return ids


def _check_length(cfg: RunConfig, ids, *, clamp_refit: bool = False) -> RunConfig:
    """Refuses text too short for the search's windows or the prior pass's; `--refit auto` takes as
    many refit windows as the text holds (none: no refit), an explicit --refit must have them all
    unless their count was chosen for it (`clamp_refit`: --refit-samples auto; then at least one)."""
    need = cfg.calib.samples * cfg.calib.seq_len
    if ids.numel() < need:
        raise BonsaiError(f"calibration text too short: {cfg.calib.samples} samples x {cfg.calib.seq_len} tokens "
                          f"need {need} tokens, the text has {ids.numel()}; give more text, fewer --calib-samples "
                          "or a shorter --seq-len")
    c = cfg.calib
    prior_need = c.prior_samples * (c.prior_seq_len or c.seq_len)
    if prior_need and ids.numel() < prior_need:
        raise BonsaiError(f"calibration text too short for the prior pass: {c.prior_samples} windows x "
                          f"{c.prior_seq_len or c.seq_len} tokens need {prior_need} tokens, the text has {ids.numel()}; "
                          "give more text or fewer --prior-samples")
    if cfg.refit == "auto":
        windows = min(cfg.refit_samples, ids.numel() // cfg.refit_seq_len)
        if windows < cfg.refit_samples:
            log.info("--refit auto: the calibration text holds %d refit windows of %d tokens (of %d)%s", windows,
                     cfg.refit_seq_len, cfg.refit_samples, "" if windows else "; no refit")
        return replace(cfg, refit="ls" if windows else "off", refit_samples=max(windows, 1))
    if clamp_refit and cfg.refit != "off" and ids.numel() // cfg.refit_seq_len:
        cfg = replace(cfg, refit_samples=min(cfg.refit_samples, ids.numel() // cfg.refit_seq_len))
    refit_need = cfg.refit_samples * cfg.refit_seq_len if cfg.refit != "off" else 0
    if ids.numel() < refit_need:
        raise BonsaiError(f"calibration text too short for the refit: {cfg.refit_samples} windows x "
                          f"{cfg.refit_seq_len} tokens need {refit_need} tokens, the text has {ids.numel()}; "
                          "give more text or fewer --refit-samples")
    return cfg


def prune(cfg: RunConfig, *, run_dir=None, restart: bool = False, overwrite: bool = False,
          show_progress: bool = False, checkpoint_masks: int | None = None, dist_timeout: float | None = None) -> dict:
    """Check every input, search (resumable from `run_dir`, default OUT.run), export atomically.

    Bad input raises a BonsaiError before anything is written; a kill at any point leaves the run
    state and any previous output intact, and the same call resumes (docs/RELIABILITY.md). Under
    torchrun (WORLD_SIZE > 1) the ranks check and compare their inputs first, then rank 0 runs the
    prune while the others evaluate their share of each chunk (prune/distributed.py, docs/distributed.md).
    """
    ranks = from_env(device=cfg.device, timeout_s=dist_timeout)
    clamp = not cfg.refit_samples  # --refit-samples auto: as many refit windows as the text holds, up to the pick
    if ranks is None:
        cfg, parent, ids, machine = _check_inputs(cfg, run_dir=run_dir, overwrite=overwrite, restart=restart)
        return _search_and_export(cfg, parent, ids, run_dir=run_dir, restart=restart, overwrite=overwrite,
                                  show_progress=show_progress, checkpoint_masks=checkpoint_masks, machine=machine,
                                  clamp_refit=clamp)
    with ranks:
        parent = ids = machine = error = None
        facts: dict = {}
        try:
            single = lambda: detect_machine(device="cpu", budget=None).budget  # noqa: E731
            cfg = replace(cfg, budget=host_budget_share(ranks, device=cfg.device, budget=cfg.budget,
                                                        default_budget=single))
            if cfg.refit == "loop":  # the other ranks would need rank 0's refitted weights
                raise BonsaiError("--refit loop runs on one process; under torchrun use --refit ls")
            cfg, parent, ids, machine = _check_inputs(cfg, run_dir=run_dir, overwrite=overwrite, root=ranks.is_root,
                                                      restart=restart)
            facts = agreement_facts(cfg.resume_key(), model_fingerprint=model_fingerprint(cfg.model),
                                    device=cfg.device)
        except BonsaiError as e:
            error = str(e)
        ranks.agree(facts, error=error)
        if ranks.is_root and cfg.search.method != "bonsai":
            log.warning("--method %s evaluates no sub-models on other ranks: rank 0 does all the work while they "
                        "wait (docs/distributed.md)", cfg.search.method)
        if not ranks.is_root:
            from bonsai_lite.prune.loop import Pruner

            done = ranks.serve(Pruner(cfg, ids=None, state=None).evaluate_share)
            return {"rank": ranks.rank, "world_size": ranks.world, "sub_models_evaluated": done}
        result = _search_and_export(cfg, parent, ids, run_dir=run_dir, restart=restart, overwrite=overwrite,
                                    show_progress=show_progress, checkpoint_masks=checkpoint_masks, ranks=ranks,
                                    machine=machine, clamp_refit=clamp)
        result["world_size"] = ranks.world
        return result


def _check_inputs(cfg: RunConfig, *, run_dir=None, overwrite: bool, root: bool = True, restart: bool = False):
    """Everything that can be refused before work: output path, model, spill dir, budget, calibration text.

    Returns the config (compensation possibly switched off), the parent model, the calibration
    ids (None when they are to be sampled from the model) and the machine as the planner measured
    it. Ranks other than 0 check only what they use: the model, the spill dir and their budget.
    """
    out = Path(cfg.out)
    if root:  # only rank 0 writes the run state and the export
        state_dir = RunState(run_dir or default_run_dir(out)).dir
        check_destination(out, {"parent model": Path(cfg.model)}, overwrite=overwrite)
        if out.resolve() == state_dir.resolve() or out.resolve() in state_dir.resolve().parents:
            raise BonsaiError(f"--run-dir {state_dir} is inside --out {out}, which the export replaces; choose a "
                              "--run-dir outside it")
    parent = StreamedModel.open(cfg.model)  # fails fast on missing/unsupported/corrupt checkpoints
    cfg = _check_compensation(cfg, parent.spec)
    _check_search(cfg, parent)
    if root:
        check_free_space(out.parent, export_bytes(parent, cfg.search.sparsity), what=f"the pruned model {out}")
    if cfg.spill_dir:
        try:
            Path(cfg.spill_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BonsaiError(f"cannot use --spill-dir {cfg.spill_dir} ({e.strerror or e})") from e
    machine = detect_machine(device=cfg.device, budget=cfg.budget, spill_dir=cfg.spill_dir, checkpoint=cfg.model)
    auto = search_dtype(machine, parent.spec) if cfg.dtype is None else None
    if auto:  # resolved here, so the resume key holds it and a resumed run computes as this one did
        log.info("searching in %s: this CPU's bf16 GEMMs run %.1fx its fp32 rate (--dtype float32 keeps fp32)",
                 auto, machine.bf16_factor)
        cfg = replace(cfg, dtype=auto)
    if cfg.allow_8bit:
        from bonsai_lite.search.int8 import check_8bit

        check_8bit(machine.device)
    # The first pass of every iteration; raises BudgetError naming the smallest budget that works.
    make_plan(parent.spec, parent.layers, Work(1, cfg.calib.samples, cfg.calib.seq_len), machine, dtype=cfg.dtype,
              allow_8bit=cfg.allow_8bit)
    auto_samples = not cfg.refit_samples
    if auto_samples:
        cfg = _pick_refit_samples(cfg, parent.spec, machine)
    cfg = _resolve_refit(cfg, parent.spec, machine.budget, earlier=None if restart else _earlier_fluctuation(cfg, run_dir),
                         seconds=_search_and_refit_seconds(cfg, parent.spec, machine) if cfg.refit == "auto" else None)
    if cfg.refit != "off":
        _check_refit_memory(cfg, parent.spec, machine.budget)
    if cfg.search.fluctuation == "residual":
        _check_residual_memory(parent.spec, machine.budget)
    # A text file is checked before the run directory is touched; sampled text is kept in it.
    ids = calibration_ids(cfg, cfg.model) if root and cfg.calib.text is not None else None
    if ids is not None:
        cfg = _check_length(cfg, ids, clamp_refit=auto_samples)
    return cfg, parent, ids, machine


def _search_and_export(cfg: RunConfig, parent, ids, *, run_dir, restart: bool, overwrite: bool,
                       show_progress: bool, checkpoint_masks: int | None, ranks=None, machine=None,
                       clamp_refit: bool = False) -> dict:
    from bonsai_lite.export import export_pruned

    out = Path(cfg.out)
    state = RunState(run_dir or default_run_dir(out))
    with state.lock():
        if ids is None:
            if restart:
                (state.dir / SELF_TEXT).unlink(missing_ok=True)
            ids = calibration_ids(cfg, cfg.model, cache_dir=state.dir)
            cfg = _check_length(cfg, ids, clamp_refit=clamp_refit)
        progress = make_progress(show=show_progress, metrics_path=state.dir / METRICS_NAME)
        estimate = _run_estimate(cfg, parent.spec, machine) if machine else None
        if estimate is not None:
            log.info("the planner predicts %s for this prune on this machine (%d iteration(s)%s; export not "
                     "counted)", fmt_duration(estimate.seconds), len(estimate.iterations),
                     f", the refit {fmt_duration(estimate.refit)}" if estimate.refit else "")
        try:
            outcome = run_pruning(cfg, ids=ids, run_dir=state.dir, restart=restart, progress=progress,
                                  checkpoint_masks=checkpoint_masks, ranks=ranks, estimate=estimate)
            if ranks is not None:  # the search is over: release the other ranks before the (long) export
                ranks.close()
            biases, overlay = dict(outcome.extra_biases or {}), None
            if cfg.refit != "off":
                overlay = state.dir / REFIT_DIR
                biases.update(_refit(cfg, parent, outcome.layers, ids, overlay, progress))
            _remove_stale_exports(out)
            try:
                with progress.stage("export", total=0):  # the exporter draws its own bar, one step per shard
                    result = export_pruned(cfg.model, outcome.layers, out, uniform=cfg.search.uniform,
                                           extra_biases=biases or None, overwrite=overwrite, overlay=overlay,
                                           metadata={"method": cfg.search.method, "sparsity": cfg.search.sparsity,
                                                     "refit": cfg.refit},
                                           show_progress=show_progress)
            except BonsaiError as e:  # a late failure must not cost the search: say how to export from it
                raise BonsaiError(f"{e}. The search is saved in {state.dir}: re-run the same command to export "
                                  f"again, or export elsewhere with --out NEW_DIR --run-dir {state.dir}") from e
        finally:  # closed before an error is printed, so the error stays the last line
            progress.close()
    log.info("run state kept in %s (with it, --overwrite re-exports without searching again); delete it when "
             "no longer needed", state.dir)
    spec = parent.spec
    return {
        "params_before": parent.params(),
        "params_after": parent.with_layers(outcome.layers).params(),
        "prunable_params_before": prunable_params(spec, parent.layers),
        "prunable_params_after": prunable_params(spec, outcome.layers),
        "out": str(result.out if hasattr(result, "out") else out),
        "run_dir": str(state.dir),
        "iterations": len(outcome.history),
        "history": outcome.history,
        # the refit as it ran: `--refit auto` and `--refit-samples auto` resolved
        "refit": cfg.refit, "refit_samples": cfg.refit_samples if cfg.refit != "off" else 0,
        # the planner's prediction for this run (search and refit, export not counted), made when it started
        "planned": None if estimate is None else {"seconds": estimate.seconds, "start": estimate.start,
                                                  "iterations": list(estimate.iterations), "refit": estimate.refit},
        # this process's RSS high-water mark, every stage included (a resumed run: since it resumed)
        "peak_rss_bytes": process_peak_rss_bytes(),
    }


# --refit auto leaves the refit out when it is predicted to take longer than this many times the
# search itself (an 8B model's float32 refit on a 2-core CPU: 21 min measured, 3.9x its 5.4-minute
# quick search). 3, not 2, since the planner counts the refit's elementwise work
# (planner.ELEMENT_FLOPS): SmolLM2's quick refit of 128 windows, 1.75x its search measured and
# the preset's largest quality gain (docs/RESULTS.md), was then predicted at 2.2x and cut to 64 windows.
REFIT_TIME_RATIO = 3.0


def _rung(cfg: RunConfig) -> dict:
    """The run's search settings as a rung of `presets.LADDER` spells them."""
    c, s = cfg.calib, cfg.search
    return dict(p_iter=s.p_iter, masks_per_iter=s.masks_per_iter, samples=c.samples, seq_len=c.seq_len,
                prior_samples=c.prior_samples, prior_seq_len=c.prior_seq_len)


def _pick_refit_samples(cfg: RunConfig, spec, machine) -> RunConfig:
    """--refit-samples auto: `refit.auto_refit_samples` of the budget, and under --refit auto of
    the time too (at most REFIT_TIME_RATIO x the search's predicted time)."""
    from bonsai_lite.prune.refit import auto_refit_samples

    if cfg.refit == "off":
        return replace(cfg, refit_samples=32)  # unused; a valid value for the run's record
    from bonsai_lite.search.pass_costs import refit_seconds

    fits_time = lambda n: True  # noqa: E731
    search = _search_and_refit_seconds(cfg, spec, machine) if cfg.refit == "auto" else None
    if search is not None:  # the search predicted once; each count's refit against it
        t, keep = cfg.refit_seq_len, 1 - cfg.search.sparsity
        fits_time = lambda n: refit_seconds(spec, None, n * t, t, machine, keep=keep) <= REFIT_TIME_RATIO * search[0]  # noqa: E731
    n = auto_refit_samples(spec, cfg.refit_seq_len, machine.budget, fits_time)
    log.info("--refit-samples auto: %d windows of %d tokens for the refit", n, cfg.refit_seq_len)
    return replace(cfg, refit_samples=n)


def _search_and_refit_seconds(cfg: RunConfig, spec, machine) -> tuple[float, float] | None:
    """(the search's, the refit's) predicted seconds on `machine`, or None where the planner cannot
    plan the search (the budget check that follows says why)."""
    from bonsai_lite.prune.presets import estimate
    from bonsai_lite.search.pass_costs import refit_seconds

    s = cfg.search
    try:
        search = estimate(spec, _rung(cfg), method=s.method, sparsity=s.sparsity, machine=machine, dtype=cfg.dtype,
                          first_step=s.first_step, regression=s.regression, allocation=s.allocation,
                          allow_8bit=cfg.allow_8bit)
    except BudgetError:
        return None
    return search.seconds, refit_seconds(spec, None, cfg.refit_samples * cfg.refit_seq_len, cfg.refit_seq_len, machine,
                                         keep=1 - s.sparsity)


def _run_estimate(cfg: RunConfig, spec, machine):
    """The planner's prediction of this run as `cfg` now stands (`presets.Estimate`: per iteration and
    the refit), or None where it cannot plan it."""
    from bonsai_lite.prune.presets import estimate

    s = cfg.search
    try:
        return estimate(spec, _rung(cfg), method=s.method, sparsity=s.sparsity, machine=machine, dtype=cfg.dtype,
                        refit=cfg.refit, refit_samples=cfg.refit_samples, fluctuation=s.fluctuation,
                        first_step=s.first_step, regression=s.regression, allocation=s.allocation,
                        allow_8bit=cfg.allow_8bit)
    except BudgetError:
        return None


def _resolve_refit(cfg: RunConfig, spec, budget: int, *, earlier: str | None = None,
                   seconds: tuple[float, float] | None = None) -> RunConfig:
    """`--refit auto`: stays auto (ls once `_check_length` has the text) when its memory fits the
    budget and its predicted time (`seconds`: the search's and its own) is at most REFIT_TIME_RATIO
    times the search's, else off; `--fluctuation auto`: residual when the run
    refits and its second moments fit too (both measured better together, docs/RESULTS.md), or
    `earlier`, what the run being resumed searched with (a finished search re-exported with another
    --refit is not searched again); `--first-step auto`: `config.auto_first_step` of the result;
    `--allocation auto`: `config.auto_allocation` of the resulting steps."""
    from bonsai_lite.prune.refit import refit_peak_bytes, residual_fits

    if cfg.refit == "auto":
        fits = refit_peak_bytes(spec, cfg.refit_samples * cfg.refit_seq_len, cfg.refit_seq_len) <= budget
        if not fits:
            log.info("--refit auto: the least-squares refit does not fit the memory budget; biases only")
        elif seconds is not None and seconds[1] > REFIT_TIME_RATIO * seconds[0]:
            log.info("--refit auto: the least-squares refit is predicted to take %.0f s, over %.0fx the search's "
                     "%.0f s on this machine; biases only (--refit ls runs it anyway)", seconds[1], REFIT_TIME_RATIO,
                     seconds[0])
            fits = False
        elif seconds is not None:
            log.info("--refit auto: the least-squares refit follows the search (predicted %.0f s on this machine, "
                     "the search %.0f s; --refit off leaves it out)", seconds[1], seconds[0])
        cfg = replace(cfg, refit="auto" if fits else "off")  # the text's length decides the rest (_check_length)
    if cfg.search.fluctuation == "auto" and earlier in ("variance", "residual"):
        cfg = replace(cfg, search=replace(cfg.search, fluctuation=earlier))
    if cfg.search.fluctuation == "auto":
        c = cfg.calib
        rows = c.prior_samples * (c.prior_seq_len or c.seq_len) if c.prior_samples else c.samples * c.seq_len
        residual = cfg.refit != "off" and residual_fits(spec, rows, budget)
        cfg = replace(cfg, search=replace(cfg.search, fluctuation="residual" if residual else "variance"))
    s = cfg.search
    if s.first_step == "auto":
        first = auto_first_step(s.method, s.regression, s.prior, s.fluctuation, s.p_iter, s.sparsity)
        if first:
            log.info("--first-step auto: one iteration removes all %g, its dense pass over %dx the windows (FLAP's "
                     "ranking on them; measured better than %g steps at this size, docs/RESULTS.md); --first-step 0 "
                     "keeps the paper's equal steps", first, round(first / s.p_iter), s.p_iter)
        cfg = replace(cfg, search=replace(s, first_step=first))
    s = cfg.search
    if s.allocation == "auto":
        allocation = s.resolved_allocation()
        if allocation == "search":
            log.info("--allocation auto: search: each step's split between heads and MLP units and between edge and "
                     "middle layers is chosen among %d offsets by their sub-models' losses (measured better on steps "
                     "of %g and more, docs/RESULTS.md); --allocation prior leaves it to the prior",
                     len(allocation_grid()), ALLOCATION_MIN_STEP)
        cfg = replace(cfg, search=replace(s, allocation=allocation))
    return cfg


def _earlier_fluctuation(cfg: RunConfig, run_dir) -> str | None:
    """The fluctuation the run state at `run_dir` (default OUT.run) was searched with, if any."""
    path = Path(run_dir or default_run_dir(cfg.out)) / "state.json"
    try:
        return json.loads(path.read_text())["meta"]["config"]["search"]["fluctuation"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_refit_memory(cfg: RunConfig, spec, budget: int) -> None:
    from bonsai_lite.prune.refit import refit_peak_bytes
    from bonsai_lite.search.machine import fmt_bytes

    need = refit_peak_bytes(spec, cfg.refit_samples * cfg.refit_seq_len, cfg.refit_seq_len)
    if need > budget:
        raise BudgetError(f"--refit ls needs about {fmt_bytes(need)} for this model (one float32 block, the widest "
                          f"projection's second moments), over the {fmt_bytes(budget)} budget; raise --memory-budget, "
                          "use fewer --refit-samples, or --refit off")


def _check_residual_memory(spec, budget: int) -> None:
    from bonsai_lite.prune.refit import residual_peak_bytes
    from bonsai_lite.search.machine import fmt_bytes

    need = residual_peak_bytes(spec)
    if need > budget:
        raise BudgetError(f"--fluctuation residual needs about {fmt_bytes(need)} for this model (one float32 block, "
                          f"the widest projection's second moments and their inverse), over the {fmt_bytes(budget)} "
                          "budget; raise --memory-budget or use --fluctuation variance")


def _refit(cfg: RunConfig, parent: StreamedModel, layers, ids, folder: Path, progress) -> dict:
    """The least-squares refit of the chosen structure (prune/refit.py): weights under `folder`,
    biases returned. Redone on every export, so it always matches the structure being exported."""
    from bonsai_lite.prune.refit import refit_model
    from bonsai_lite.search.pass_costs import refit_seconds

    tokens = calibration_tokens(ids, samples=cfg.refit_samples, seq_len=cfg.refit_seq_len, seed=cfg.search.seed)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    machine = detect_machine(device=device, budget=cfg.budget, spill_dir=cfg.spill_dir, checkpoint=cfg.model)
    predicted = refit_seconds(parent.spec, layers, tokens.numel(), tokens.shape[1], machine)
    with progress.stage("refit", total=len(layers), predicted=predicted, tokens=tokens.numel()) as bar:
        return refit_model(parent, layers, tokens, folder, device=device, progress=lambda _l: bar.advance())


def export_bytes(parent: StreamedModel, sparsity: float) -> int:
    """Bytes the export will write, about: the checkpoint less the pruned share of its projections."""
    info = parent.ckpt.info(parent.spec.adapter.block_tensor_names(0)["q_w"])
    removed = sparsity * prunable_params(parent.spec, parent.layers) * info.dtype.itemsize
    return max(0, int(parent.ckpt.nbytes() - removed))


def _check_search(cfg: RunConfig, parent: StreamedModel) -> None:
    """Settings that only the model's widths can judge, before the first forward pass."""
    head_p, mlp_p = parent.spec.unit_params()
    per_iter = cfg.search.p_iter * parent.spec.non_embedding_params()
    if per_iter < min(head_p, mlp_p):  # no iteration could remove a unit: the loop would never progress
        least = min(head_p, mlp_p) / parent.spec.non_embedding_params()
        raise BonsaiError(f"--p-iter {cfg.search.p_iter} removes {per_iter:.0f} parameters per iteration, less than "
                          f"one unit of this model ({min(head_p, mlp_p)}); use --p-iter {least:.3g} or more")
    if cfg.search.method not in SAMPLED_METHODS:
        return
    sizes = [n for s in parent.layers for n in (len(s.heads), len(s.mlp))]
    perturbed = sum(n - _n_fixed(n, cfg.search.p_iter) for n in sizes)
    if perturbed < 2:  # the sub-models would all be the same model: nothing to regress on
        least = 0.25 / max(sizes)
        raise BonsaiError(f"--p-iter {cfg.search.p_iter} perturbs {perturbed} unit(s) of this model (layers of "
                          f"{max(sizes)} units at most), so its sub-models would not differ; use --p-iter {least:.3g} "
                          "or more")


def _check_compensation(cfg: RunConfig, spec) -> RunConfig:
    """A --uniform export writes a stock config: compensation biases on o_proj / down_proj need a
    config switch for them (Llama's attention_bias / mlp_bias). Refused up front when asked for,
    switched off (with a log line) when it was only the default."""
    from dataclasses import replace

    s = cfg.search
    if not (s.uniform and s.compensates):
        return cfg
    always, flags = spec.adapter.stock_biases, dict(spec.adapter.stock_bias_flags)
    covered = set(always).union(*flags.values()) if flags else set(always)
    if {"o", "down"} <= covered:
        return cfg
    if s.compensate == "on":
        raise BonsaiError(f"--compensate on with --uniform: a stock {spec.adapter.name} config has no bias on "
                          "o_proj/down_proj to hold the compensation; drop --uniform or use --compensate off")
    log.info("--uniform on %s: compensation switched off (a stock config cannot hold its biases)", spec.adapter.name)
    return replace(cfg, search=replace(s, compensate="off"))


def _remove_stale_exports(out: Path) -> None:
    """Temporary directories of an export that was killed (export.py names them `.OUT.partial-*`)."""
    for tmp in out.parent.glob(f".{out.name}.partial-*"):
        if tmp.is_dir():
            log.info("removing %s, left by an interrupted export", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
