"""Library entry point of a whole prune: inputs checked first, search (resumable), export (atomic)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_tensors

from bonsai_lite.calib.data import load_tokenizer, read_text, tokenize
from bonsai_lite.config import RunConfig
from bonsai_lite.errors import BonsaiError
from bonsai_lite.io.model import StreamedModel
from bonsai_lite.prune.loop import run_pruning
from bonsai_lite.prune.state import RunState, atomic_write_bytes
from bonsai_lite.search.planner import Work, detect_machine, make_plan

log = logging.getLogger(__name__)

SELF_TEXT = "calib-sampled.safetensors"  # in the run directory: calibration text sampled from the model


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


def _check_length(cfg: RunConfig, ids) -> None:
    c = cfg.calib
    prior_need = c.prior_samples * (c.prior_seq_len or c.seq_len)
    if prior_need and ids.numel() < prior_need:
        raise BonsaiError(f"calibration text too short for the prior pass: {c.prior_samples} windows x "
                          f"{c.prior_seq_len or c.seq_len} tokens need {prior_need} tokens, the text has {ids.numel()}; "
                          "give more text or fewer --prior-samples")
    need = cfg.calib.samples * cfg.calib.seq_len
    if ids.numel() < need:
        raise BonsaiError(f"calibration text too short: {cfg.calib.samples} samples x {cfg.calib.seq_len} tokens "
                          f"need {need} tokens, the text has {ids.numel()}; give more text, fewer --calib-samples "
                          "or a shorter --seq-len")


def prune(cfg: RunConfig, *, run_dir=None, restart: bool = False, overwrite: bool = False,
          show_progress: bool = False, checkpoint_masks: int | None = None) -> dict:
    """Check every input, search (resumable from `run_dir`, default OUT.run), export atomically.

    Bad input raises a BonsaiError before anything is written; a kill at any point leaves the run
    state and any previous output intact, and the same call resumes (docs/RELIABILITY.md).
    """
    from bonsai_lite.export import export_pruned

    out = Path(cfg.out)
    if out.exists() and not overwrite:
        raise BonsaiError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    parent = StreamedModel.open(cfg.model)  # fails fast on missing/unsupported/corrupt checkpoints
    cfg = _check_compensation(cfg, parent.spec)
    if cfg.spill_dir:
        try:
            Path(cfg.spill_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BonsaiError(f"cannot use --spill-dir {cfg.spill_dir} ({e.strerror or e})") from e
    machine = detect_machine(device=cfg.device, budget=cfg.budget, spill_dir=cfg.spill_dir)
    # The first pass of every iteration; raises BudgetError naming the smallest budget that works.
    make_plan(parent.spec, parent.layers, Work(1, cfg.calib.samples, cfg.calib.seq_len), machine, dtype=cfg.dtype)
    # A text file is checked before the run directory is touched; sampled text is kept in it.
    ids = calibration_ids(cfg, cfg.model) if cfg.calib.text is not None else None
    if ids is not None:
        _check_length(cfg, ids)
    state = RunState(run_dir or default_run_dir(out))
    with state.lock():
        if ids is None:
            if restart:
                (state.dir / SELF_TEXT).unlink(missing_ok=True)
            ids = calibration_ids(cfg, cfg.model, cache_dir=state.dir)
            _check_length(cfg, ids)
        progress = _progress_bars() if show_progress else None
        try:
            outcome = run_pruning(cfg, ids=ids, run_dir=state.dir, restart=restart, progress=progress,
                                  checkpoint_masks=checkpoint_masks)
        finally:  # closed before an error is printed, so the error stays the last line
            if progress:
                progress(close=True)
        _remove_stale_exports(out)
        result = export_pruned(cfg.model, outcome.layers, out, uniform=cfg.search.uniform,
                               extra_biases=outcome.extra_biases or None, overwrite=overwrite,
                               metadata={"method": cfg.search.method, "sparsity": cfg.search.sparsity})
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
    }


def _check_compensation(cfg: RunConfig, spec) -> RunConfig:
    """A --uniform export writes a stock config: compensation biases on o_proj / down_proj need a
    config switch for them (Llama's attention_bias / mlp_bias). Refused up front when asked for,
    switched off (with a log line) when it was only the default."""
    from dataclasses import replace

    from bonsai_lite.export import STOCK_BIASES

    s = cfg.search
    if not (s.uniform and s.compensates):
        return cfg
    always, flags = STOCK_BIASES.get(spec.adapter.name, ((), {}))
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


def _progress_bars():
    from tqdm import tqdm

    bars: dict = {}

    def update(stage=None, done=0, total=0, close=False):
        if close:
            for b in bars.values():
                b.close()
            return
        bar = bars.get(stage)
        if bar is None or bar.total != total or done < bar.n:
            if bar is not None:
                bar.close()
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="it" if stage == "iteration" else "step",
                                     leave=stage == "iteration")
        bar.update(done - bar.n)

    return update
