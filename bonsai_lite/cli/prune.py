"""`bonsai-lite prune`: search (resumable) then export shard by shard."""
from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from bonsai_lite.cli.common import add_budget_args, show_progress
from bonsai_lite.cli.main import emit_json
from bonsai_lite.config import (ALLOCATION_MIN_STEP, METHODS, PRESETS, REGRESSION_MIN_TOKENS, REGRESSIONS, ONE_STEP_SPARSITY,
                                CalibConfig, RunConfig, SearchConfig, auto_regression)
from bonsai_lite.errors import BonsaiError
from bonsai_lite.search.machine import parse_bytes

log = logging.getLogger("bonsai_lite.prune")


SEARCH_CHOICES = (
    ("--prior", ["auto", "wanda", "activation", "flap", "flap-parent", "flap-anchored"],
     "unit prior: module-level Wanda (the paper's), activation magnitude, or FLAP's standardised fluctuation "
     "(turns compensation on under --compensate auto; flap-parent: z-scored on the parent's per-layer scale in "
     "every iteration; flap-anchored: also divided by each group's median drift from the parent's scores); auto: flap-parent for bonsai, wanda otherwise"),
    ("--fluctuation", ["auto", "variance", "residual"],
     "what FLAP's metric (the flap priors, the flap method) weighs a unit's output columns by: its inputs' "
     "variance (FLAP's: what a bias cannot recover) or the part of it the other kept inputs do not predict "
     "(residual: what --refit ls cannot recover); auto: residual when the run refits"),
    ("--candidates", ["auto", "layer", "global"],
     "units an iteration perturbs and may remove: the bottom 2 x p_iter of every layer by prior (the paper's), or "
     "the lowest on the prior's global scale worth 2 x p_iter of the parameters; auto: global for bonsai"),
    ("--cv-scope", ["auto", "all", "within"],
     "what the regression's cross-validation and the guard score: whole pair differences (all, the paper's) or "
     "only the order inside each (layer, kind) group (within; auto: within with --rank within)"),
    ("--rank", ["auto", "relevance", "per-param", "within"],
     "how Bonsai's relevances rank units: globally as they are (the paper's), per parameter removed, or within: "
     "they order each (layer, kind) group and the prior decides how many units each group loses (auto: within)"),
    ("--regression", ["auto", *REGRESSIONS],
     f"auto: unit when each sub-model is evaluated on at least {REGRESSION_MIN_TOKENS} tokens (--calib-samples x "
     "--seq-len), else none (below it the sub-models measured no better than the prior alone, docs/RESULTS.md); "
     "unit: one relevance per unit (paper eq. 3); allocation: prior order within each (layer, kind), learned "
     "scale per group, ranked per parameter (docs/search-maths.md); none: no sub-models, the prior alone; best: "
     "remove what the lowest-loss sub-model removed (the prior's proposal evaluated among them); best-confirmed: "
     "best, kept only if it still beats the prior's proposal on a fresh draw of windows"),
    ("--allocation", ["auto", "prior", "search"],
     "how the removal splits between heads and MLP units and between edge and middle layers: as the prior's "
     "global scale decides, or search: each iteration evaluates the sub-models of a small grid of head / "
     "edge-layer offsets to FLAP's z-scores and keeps the best if fresh windows confirm it (auto: search for "
     f"bonsai on a flap prior with --regression none when every step removes at least {ALLOCATION_MIN_STEP:g}, "
     "where it measured better, docs/RESULTS.md)"),
    ("--compensate", ["auto", "on", "off"],
     "masked units read as their calibration mean during the search and removed units' mean output folded into "
     "the output biases (auto: where it measured better, docs/RESULTS.md)"),
)


def add_parser(sub) -> None:
    p = sub.add_parser("prune", help="prune a model directory to a target sparsity and export it")
    p.add_argument("model_dir")
    p.add_argument("--sparsity", type=float, required=True, help="fraction of non-embedding parameters to remove")
    p.add_argument("--out", required=True, help="output model directory (written atomically)")
    p.add_argument("--calib", default=None, help="calibration text file, or hf:NAME[:CONFIG[:SPLIT]] for a Hugging Face dataset "
                        "(default: text sampled from the model)")
    p.add_argument("--method", default="bonsai", choices=METHODS)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="quick: minutes on a CPU; paper: appendix A.2 settings (explicit flags win)")
    p.add_argument("--time-budget", default=None, metavar="T",
                   help="wall-clock budget for the search (e.g. 20m): picks masks/tokens/p_iter from the planner's "
                        "time model (bonsai_lite/prune/presets.py); explicit flags still win")
    p.add_argument("--p-iter", type=float, default=None, help="fraction pruned per iteration (paper: 0.05)")
    p.add_argument("--prior-memory", type=_number_or_auto("a weight (0 = off)"), default="auto", metavar="W",
                   help="average each iteration's prior with the earlier iterations' (weight W on their running "
                        "average), so a step ranks on more windows than its own dense pass read; flap-parent/"
                        "anchored priors only; 0: off; auto (default): 1 for bonsai ranking by the prior alone "
                        "(--regression none; measured better at 35%% and 50%%, docs/RESULTS.md), else 0")
    p.add_argument("--first-step", type=_number_or_auto("a fraction"), default="auto", metavar="X",
                   help="fraction the first iteration prunes, then --p-iter per iteration, its dense pass over as "
                        "many more windows; 0: --p-iter, the paper's equal steps; auto (default): the whole "
                        f"--sparsity in one step when it is at most {ONE_STEP_SPARSITY:g} and the search ranks by "
                        "FLAP's residual metric alone (--regression none, --fluctuation residual), else 0")
    p.add_argument("--masks-per-iter", type=int, default=None, help="sub-models per iteration (paper: 200)")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration windows per iteration (paper: 32)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per calibration window (paper: 2048)")
    # Bonsai's search frame: choice flags as data, the first choice the default (config.SearchConfig
    # resolves "auto" per method)
    for flag, choices, text in SEARCH_CHOICES:
        p.add_argument(flag, default=choices[0], choices=choices, help=text)
    p.add_argument("--no-guard", dest="guard", action="store_false",
                   help="rank by the regression's betas even when the prior predicts the held-out sub-model "
                        "pairs better (the paper's behaviour)")
    p.add_argument("--penalty", default="l1", choices=["l1", "l2"])
    p.add_argument("--keep-spread", type=float, default=0.0,
                   help="0 = paper (each mask keeps half the candidates); >0 varies the kept count per mask")
    p.add_argument("--prior-samples", type=int, default=None,
                   help="windows of the separate dense pass for priors and compensation means (0: reuse the "
                        "search windows)")
    p.add_argument("--prior-seq-len", type=int, default=None, help="tokens per window of that pass (0: --seq-len)")
    p.add_argument("--refit", default="auto", choices=["auto", "off", "ls", "loop"],
                   help="after the search, ls refits the kept columns of each pruned o_proj/down_proj to the dense "
                        "output on calibration windows (least squares, forward passes only; prune/refit.py); loop "
                        "also refits after every iteration, so the search sees the refitted model; auto (default): "
                        "ls when it fits --memory-budget")
    p.add_argument("--refit-samples", type=_refit_samples, default=0, metavar="N|auto",
                   help="windows of the refit (of --prior-seq-len, else --seq-len tokens); auto (default): the "
                        "most of 128, 64, 32, 16 that fit --memory-budget (and, with --refit auto, its time)")
    p.add_argument("--uniform", action="store_true", help="same widths in every layer: a stock config")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--multiple-of", type=int, default=None, metavar="N",
                   help="keep every layer's MLP width a multiple of N (fast kernels in llama.cpp and on GPUs); "
                        "1 = off; default 32 when the parent's MLP has at least 1024 units, else 1")
    p.add_argument("--gqa", default="any", choices=["any", "equal"],
                   help="equal: every layer keeps the same number of query heads per key/value head, so the "
                        "GGUF needs no repeated K/V heads (a smaller KV cache in llama.cpp); any: free choice")
    p.add_argument("--allow-8bit", action="store_true",
                   help="let the priors' and sub-models' passes use LLM.int8() weights where the planner finds "
                        "that faster or the only plan under --memory-budget (CUDA and bitsandbytes; within ~2%% "
                        "of 16-bit losses; the export keeps the checkpoint's weights)")
    p.add_argument("--run-dir", default=None, help="resumable run state (default: OUT.run beside the output)")
    p.add_argument("--restart", action="store_true", help="discard an existing run state and start over")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--gguf", default=None, metavar="OUT.gguf",
                   help="also write the export as GGUF for llama.cpp (as `bonsai-lite export-gguf OUT OUT.gguf`)")
    p.add_argument("--gguf-dtype", default="f16", choices=["f32", "f16", "bf16"])
    p.add_argument("--checkpoint-masks", type=int, default=None, metavar="N",
                   help="save the run state after at most N evaluated sub-models (default: after each pass of "
                        "the memory plan, at most ~10 minutes of work); smaller loses less work to a crash but "
                        "reads the weights once more per save")
    p.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                   help="under torchrun: how long a rank waits in a collective before giving up (default 1800; "
                        "must exceed what rank 0 does alone: priors, regression, text sampled from the model)")
    add_budget_args(p)
    p.set_defaults(run=run)


def config_from_args(args) -> RunConfig:
    preset = PRESETS[args.preset or "paper"]
    if getattr(args, "time_budget", None):
        preset = _fit_time_budget(args)
    pick = lambda v, k: v if v is not None else preset[k]  # noqa: E731
    # A file becomes an absolute path (the run state records it); a dataset name stays as given.
    text = str(Path(args.calib).resolve()) if args.calib and Path(args.calib).exists() else args.calib
    calib = CalibConfig(text=text,
                        samples=pick(args.calib_samples, "samples"), seq_len=pick(args.seq_len, "seq_len"),
                        prior_samples=pick(args.prior_samples, "prior_samples"),
                        prior_seq_len=pick(args.prior_seq_len, "prior_seq_len"))
    regression = args.regression
    if regression == "auto":
        regression = auto_regression(args.method, calib.samples, calib.seq_len)
        if regression == "none" and args.method == "bonsai":
            log.info("--regression auto: none: sub-models of %d x %d tokens (under %d) measured no better than the "
                     "prior alone (docs/RESULTS.md), so the iterations rank by the prior; --regression unit "
                     "evaluates them", calib.samples, calib.seq_len, REGRESSION_MIN_TOKENS)
    search = SearchConfig(method=args.method, sparsity=args.sparsity, p_iter=pick(args.p_iter, "p_iter"),
                          first_step=args.first_step, prior_memory=args.prior_memory,
                          masks_per_iter=pick(args.masks_per_iter, "masks_per_iter"), prior=args.prior, guard=args.guard,
                          fluctuation=args.fluctuation,
                          candidates=args.candidates, cv_scope=args.cv_scope,
                          penalty=args.penalty, rank=args.rank, keep_spread=args.keep_spread, uniform=args.uniform, seed=args.seed,
                          compensate=args.compensate, regression=regression, multiple_of=_multiple_of(args),
                          gqa=args.gqa, allocation=args.allocation)
    return RunConfig(model=str(Path(args.model_dir).resolve()), out=str(Path(args.out).resolve()), calib=calib,
                     search=search, budget=parse_bytes(args.memory_budget) if args.memory_budget else None,
                     device=args.device, dtype=args.dtype, spill_dir=args.spill_dir,
                     refit=getattr(args, "refit", "off"), refit_samples=getattr(args, "refit_samples", 0),
                     allow_8bit=getattr(args, "allow_8bit", False))


def _fit_time_budget(args) -> dict:
    from bonsai_lite.prune.presets import fit_time_budget, parse_seconds
    from bonsai_lite.search.machine import detect_machine
    from bonsai_lite.structure import load_spec

    if args.preset:
        raise BonsaiError("give either --preset or --time-budget, not both")
    seconds = parse_seconds(args.time_budget)
    machine = detect_machine(device=args.device, budget=parse_bytes(args.memory_budget) if args.memory_budget else None,
                             spill_dir=args.spill_dir, checkpoint=args.model_dir)
    e = fit_time_budget(load_spec(args.model_dir), seconds, method=args.method, sparsity=args.sparsity,
                        machine=machine, dtype=args.dtype, refit=getattr(args, "refit", "off"),
                        refit_samples=getattr(args, "refit_samples", 0), fluctuation=args.fluctuation,
                        first_step=args.first_step, regression=args.regression, allocation=args.allocation,
                        allow_8bit=getattr(args, "allow_8bit", False))
    log.info("--time-budget %s: settings '%s' %s, predicted %.0f s and %d forward tokens", args.time_budget, e.name,
             e.settings, e.seconds, e.forward_tokens)
    return e.settings


def _refit_samples(text: str) -> int:
    if text == "auto":
        return 0
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"--refit-samples must be a whole number of windows (1 or more) or auto, got {text!r}")
    return n


def _number_or_auto(what: str):
    """An argparse type: 'auto' as it is, else a float (`what` names the number in the error)."""
    def parse(text: str):
        if text == "auto":
            return text
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} or auto, got {text!r}") from None
    return parse


def _multiple_of(args) -> int:
    if args.multiple_of is not None:
        return args.multiple_of
    from bonsai_lite.prune.align import auto_multiple_of
    from bonsai_lite.structure import load_spec

    return auto_multiple_of(load_spec(args.model_dir).intermediate)


def run(args) -> int:
    from bonsai_lite.prune.api import prune

    t0 = time.perf_counter()
    cfg = config_from_args(args)
    if args.checkpoint_masks is not None and args.checkpoint_masks < 1:
        raise BonsaiError(f"--checkpoint-masks must be at least 1, got {args.checkpoint_masks}")
    gguf = Path(args.gguf) if args.gguf else None
    if gguf is not None and (gguf.suffix != ".gguf" or gguf.is_dir() or (gguf.exists() and not args.overwrite)):
        raise BonsaiError(f"--gguf {gguf}: must be a new file ending in .gguf (or pass --overwrite)")
    if gguf is not None:
        from bonsai_lite.export.gguf import check_tokenizer

        try:
            check_tokenizer(args.model_dir)  # before the search, not after it
        except ValueError as e:
            raise BonsaiError(f"--gguf: {e}") from e
    rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") not in ("", "1") else None
    if rank is not None:  # torchrun: say which rank speaks; only rank 0 draws progress bars
        for h in logging.getLogger().handlers:
            h.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s"))
    result = prune(cfg, run_dir=args.run_dir, restart=args.restart, overwrite=args.overwrite,
                   show_progress=show_progress(args) and rank in (None, "0"), checkpoint_masks=args.checkpoint_masks,
                   dist_timeout=args.dist_timeout)
    if "rank" in result:  # a worker of a distributed run: rank 0 reports the outcome
        log.info("evaluated %d sub-models for rank 0", result["sub_models_evaluated"])
        return 0
    if gguf is not None:
        from bonsai_lite.export.gguf import export_gguf

        try:
            result["gguf"] = str(export_gguf(result["out"], gguf, dtype=args.gguf_dtype, overwrite=args.overwrite).out)
        except ValueError as e:
            raise BonsaiError(str(e)) from e
    result["seconds"] = time.perf_counter() - t0
    log.info("pruned %s -> %s: %d -> %d parameters (%.1f%% of prunable removed) in %.0f s", cfg.model, result["out"],
             result["params_before"], result["params_after"],
             100 * (1 - result["prunable_params_after"] / result["prunable_params_before"]), result["seconds"])
    if args.json:
        emit_json(result)
    return 0
