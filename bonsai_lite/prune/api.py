"""Library entry point of a whole prune: inputs checked first, search (resumable), export (atomic)."""
from __future__ import annotations

import logging
from pathlib import Path

from bonsai_lite.calib.data import load_tokenizer, read_text, tokenize
from bonsai_lite.config import RunConfig
from bonsai_lite.errors import BonsaiError
from bonsai_lite.io.model import StreamedModel
from bonsai_lite.prune.loop import run_pruning

log = logging.getLogger(__name__)


def default_run_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".run")


def prunable_params(spec, layers) -> int:
    """Parameters of attention and MLP projections (what pruning can remove): non-embedding minus norms."""
    return spec.non_embedding_params(layers) - spec.hidden * (2 * len(layers) + 1)


def calibration_ids(cfg: RunConfig, model_dir):
    tok = load_tokenizer(model_dir)
    if cfg.calib.text is None:
        from bonsai_lite.calib.self_text import sample_text_ids

        log.info("no --calib text given: sampling calibration text from the parent model itself (seed %d)",
                 cfg.search.seed)
        return sample_text_ids(model_dir, tokenizer=tok, samples=cfg.calib.samples, seq_len=cfg.calib.seq_len,
                               seed=cfg.search.seed, device=cfg.device, budget=cfg.budget)
    return tokenize(tok, read_text(cfg.calib.text))


def prune(cfg: RunConfig, *, run_dir=None, restart: bool = False, overwrite: bool = False,
          show_progress: bool = False) -> dict:
    from bonsai_lite.export import export_pruned

    out = Path(cfg.out)
    if out.exists() and not overwrite:
        raise BonsaiError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    parent = StreamedModel.open(cfg.model)  # fails fast on missing/unsupported/corrupt checkpoints
    ids = calibration_ids(cfg, cfg.model)
    need = cfg.calib.samples * cfg.calib.seq_len
    if ids.numel() < need:
        raise BonsaiError(f"calibration text too short: {cfg.calib.samples} samples x {cfg.calib.seq_len} tokens "
                          f"need {need} tokens, the text has {ids.numel()}; give more text, fewer --calib-samples "
                          "or a shorter --seq-len")
    progress = _progress_bars() if show_progress else None
    outcome = run_pruning(cfg, ids=ids, run_dir=run_dir or default_run_dir(out), restart=restart, progress=progress)
    if progress:
        progress(close=True)
    result = export_pruned(cfg.model, outcome.layers, out, uniform=cfg.search.uniform,
                           extra_biases=outcome.extra_biases or None, overwrite=overwrite,
                           metadata={"method": cfg.search.method, "sparsity": cfg.search.sparsity})
    spec = parent.spec
    return {
        "params_before": parent.params(),
        "params_after": parent.with_layers(outcome.layers).params(),
        "prunable_params_before": prunable_params(spec, parent.layers),
        "prunable_params_after": prunable_params(spec, outcome.layers),
        "out": str(result.out if hasattr(result, "out") else out),
        "iterations": len(outcome.history),
        "history": outcome.history,
    }


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
