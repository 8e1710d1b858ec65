"""Quality benchmark: methods x sparsities x seeds on a real model, one JSON record per run.

Prunes with the library API (the same code path as `bonsai-lite prune`), evaluates the pruned
model with the streamed evaluator on the first --eval-tokens tokens of the test text at --seq-len,
and writes one record per run to --results-dir (default docs/results/) as
`quality-<model>-<preset>-<method>-<sparsity>-s<seed>[-<variant>].json`. A run whose record exists
is skipped, and an interrupted prune resumes from its run directory under --work, so the same
command continues a benchmark across sessions. `--git-commit` commits each record as it lands.

  python tools/bench_quality.py --model /work/smollm2 --calib ../shared/data/wikitext2-valid.txt \
      --eval ../shared/data/wikitext2-raw-test.txt --preset quick --methods bonsai,flap,wanda-sp \
      --sparsities 0.35,0.5,0.2 --seeds 0,1,2 --variants compensate=off
  python tools/bench_quality.py --render        # tables -> docs/RESULTS.md, plots -> docs/img/

Variants (`name=value`, comma separated, each run for every method it applies to, in addition to
the default row): compensate=on|off, refit=off|ls|auto (the least-squares refit after the search;
auto as `bonsai-lite prune` resolves it), refit_samples=N (default: auto, as the CLI; records hold
the resolved count), masks=N, p_iter=X, first_step=X, prior_memory=W, allocation=prior|search, samples=N, seq=N, prior_samples=N, prior_seq=N, rank=R, spread=X, regression=unit|allocation|none|best|best-confirmed (none: the prior
alone, no sub-models; best: the lowest-loss sub-model's removals; best-confirmed: best, kept only if
it beats the prior's proposal again on fresh windows), gqa=any|equal, multiple_of=N,
prior=wanda|activation|flap|flap-parent|flap-anchored, fluctuation=variance|residual, guard=on|off,
candidates=layer|global, cv_scope=all|within; joined by '+' they apply together
(prior=flap+regression=none).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bonsai_lite.config import METHODS, PRESETS, CalibConfig, RunConfig, SearchConfig  # noqa: E402

RESULTS_DIR = ROOT / "docs" / "results"
SEARCH_METHODS = {"bonsai", "bonsai-noregress"}  # methods that evaluate sub-models
# variant name -> (config field, parser, where it lives)
VARIANTS = {
    "compensate": ("compensate", str, "search"), "masks": ("masks_per_iter", int, "preset"),
    "p_iter": ("p_iter", float, "preset"), "first_step": ("first_step", float, "search"), "samples": ("samples", int, "preset"), "seq": ("seq_len", int, "preset"),
    "prior_samples": ("prior_samples", int, "preset"), "prior_seq": ("prior_seq_len", int, "preset"),
    "rank": ("rank", str, "search"), "spread": ("keep_spread", float, "search"),
    "regression": ("regression", str, "search"), "gqa": ("gqa", str, "search"),
    "multiple_of": ("multiple_of", int, "search"), "prior": ("prior", str, "search"),
    "fluctuation": ("fluctuation", str, "search"),
    "guard": ("guard", lambda v: v == "on", "search"), "candidates": ("candidates", str, "search"),
    "cv_scope": ("cv_scope", str, "search"), "prior_memory": ("prior_memory", float, "search"),
    "allocation": ("allocation", str, "search"),
    "refit": ("refit", str, "preset"), "refit_samples": ("refit_samples", int, "preset"),
}
# what a variant can change for a method that evaluates no sub-models (the others do not apply)
ONE_PASS_VARIANTS = {"compensate", "samples", "seq", "prior_samples", "prior_seq", "p_iter", "gqa", "multiple_of",
                     "refit", "refit_samples", "fluctuation"}


def hardware() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def commit() -> dict:
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT).stdout.strip()  # noqa: E731
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", "bonsai_lite", "tools"))}


def _sp(x: float) -> str:
    return f"{int(round(x * 100)):02d}"


def run_name(model: str, preset: str, method: str, sparsity: float, seed: int, variant: str = "") -> str:
    tag = f"-{variant.replace('=', '_')}" if variant else ""
    return f"quality-{model}-{preset}-{method}-{_sp(sparsity)}-s{seed}{tag}"


def settings_for(preset: str, method: str, sparsity: float, variant: str = "") -> tuple[dict, dict]:
    """(preset-level settings, search-level overrides) of one run."""
    q = dict(PRESETS[preset])
    search: dict = {}
    for part in filter(None, variant.split("+")):  # "prior=flap+regression=none": both changes
        name, value = part.split("=", 1)
        field, cast, where = VARIANTS[name]
        (q if where == "preset" else search)[field] = cast(value)
    q["p_iter"] = min(q["p_iter"], sparsity)
    return q, search


RESOLVED = ("fluctuation", "first_step", "regression")  # "auto" settings the run resolves before it starts


def resolved_settings(run_dir: Path, settings: dict) -> dict:
    """`settings` with the "auto" values the run resolved (its state.json's config), so a record says
    what ran: `--fluctuation auto` is the residual metric where the dense pass is large enough."""
    try:
        search = json.loads((Path(run_dir) / "state.json").read_text())["meta"]["config"]["search"]
    except (OSError, ValueError, KeyError, TypeError):
        return settings
    return {**settings, **{k: search[k] for k in RESOLVED if settings.get(k) == "auto" and k in search}}


def prune_and_eval(args, method: str, sparsity: float, seed: int, variant: str) -> dict:
    from bonsai_lite.eval.perplexity import perplexity
    from bonsai_lite.prune.api import prune

    q, search = settings_for(args.preset, method, sparsity, variant)
    name = run_name(args.model_name, args.preset, method, sparsity, seed, variant)
    out = Path(args.work) / name
    cfg = RunConfig(model=str(Path(args.model).resolve()), out=str(out.resolve()),
                    calib=CalibConfig(text=str(Path(args.calib).resolve()), samples=q["samples"], seq_len=q["seq_len"],
                                      prior_samples=q["prior_samples"], prior_seq_len=q["prior_seq_len"]),
                    search=SearchConfig(method=method, sparsity=sparsity, p_iter=q["p_iter"],
                                        masks_per_iter=q["masks_per_iter"], seed=seed, **search),
                    device=args.device, refit=q.get("refit", "off"), refit_samples=q.get("refit_samples", 0))
    run_dir = Path(args.work) / f"{name}.run"
    resumed = run_dir.exists()
    t0 = time.perf_counter()
    res = prune(cfg, run_dir=run_dir, overwrite=True)
    prune_s = time.perf_counter() - t0
    ev = perplexity(out, text=args.eval, seq_len=args.seq_len, max_tokens=args.eval_tokens, device=args.device)
    hist = res["history"]
    return {
        "kind": "quality", "model": args.model_name, "method": method, "sparsity": sparsity, "seed": seed,
        "preset": args.preset, "variant": variant, "compensate": cfg.search.compensates,
        "settings": resolved_settings(run_dir, {**q, **{k: v for k, v in vars(cfg.search).items()
                                                        if k not in ("method", "sparsity", "seed")},
                                                "refit": res["refit"], "refit_samples": res["refit_samples"]}),
        "eval_tokens": ev["tokens"], "eval_windows": ev["windows"], "seq_len": args.seq_len,
        "perplexity": ev["perplexity"], "nll": ev["nll"], "eval_seconds": ev["seconds"],
        "prune_seconds": prune_s, "prune_resumed": resumed,
        # the refit passes each block once over its windows (it ran each twice before 2026-12-02:
        # records of earlier commits count 2x its tokens)
        "forward_tokens": int(sum(h.get("forward_tokens", 0) for h in hist)) + res["refit_samples"] * cfg.refit_seq_len,
        "iterations": len(hist), "cv_kendall_tau": [h["cv_kendall_tau"] for h in hist if "cv_kendall_tau" in h],
        "regression": [h["regression"] for h in hist if "regression" in h],
        # the guard's choice per iteration, and the prior's own pair tau it was compared with
        "ranked_by": [h["ranked_by"] for h in hist if "ranked_by" in h],
        "prior_pair_tau": [h["prior_pair_tau"] for h in hist if "prior_pair_tau" in h],
        # --allocation search: the (head, edge-layer) offset each iteration removed by
        "allocation": [h["allocation"] for h in hist if "allocation" in h],
        "params": res["params_after"], "prunable_params": res["prunable_params_after"],
        "prunable_params_before": res["prunable_params_before"],
        **args.code, "hardware": hardware(), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def parent_record(args) -> dict:
    from bonsai_lite.eval.perplexity import perplexity

    ev = perplexity(args.model, text=args.eval, seq_len=args.seq_len, max_tokens=args.eval_tokens, device=args.device)
    return {"kind": "quality", "model": args.model_name, "method": "parent", "sparsity": 0.0, "seed": None,
            "preset": None, "variant": "", "eval_tokens": ev["tokens"], "eval_windows": ev["windows"],
            "seq_len": args.seq_len, "perplexity": ev["perplexity"], "nll": ev["nll"], "eval_seconds": ev["seconds"],
            "prune_seconds": 0.0, "forward_tokens": 0, "params": ev["params"], **args.code, "hardware": hardware(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_record(results_dir: Path, name: str, record: dict, *, git_commit: bool) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)  # a kill never leaves half a record
    if git_commit:
        for _ in range(5):  # another git command may hold the index lock for a moment
            add = subprocess.run(["git", "add", "--", str(path)], cwd=ROOT, capture_output=True)
            done = subprocess.run(["git", "commit", "-q", "-m", f"bench_quality: {name}", "--only", "--", str(path)],
                                  cwd=ROOT, capture_output=True)
            if add.returncode == 0 and done.returncode == 0:
                break
            time.sleep(3)
    return path


def jobs(args) -> list[tuple[str, float, int, str]]:
    """In the order given: for each sparsity, for each seed, every method's default row and then
    the variants (only at --variant-sparsities x --variant-seeds), so the first rows to land are the
    most decisive ones (list the sparsity that matters most first)."""
    methods = [m for m in args.methods.split(",") if m]
    sparsities = [float(s) for s in args.sparsities.split(",") if s]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    v_sp = [float(s) for s in args.variant_sparsities.split(",") if s] if args.variant_sparsities else sparsities[:1]
    v_seeds = [int(s) for s in args.variant_seeds.split(",") if s]
    out = []
    for sp in sparsities:
        for seed in seeds:
            for m in methods if not args.variants_only else ():
                out.append((m, sp, seed, ""))
            for v in variants if sp in v_sp and seed in v_seeds else ():
                for m in methods:
                    name = v.split("=", 1)[0]
                    if name == "compensate" and SearchConfig(method=m, compensate=v.split("=", 1)[1]).compensates == \
                            SearchConfig(method=m).compensates:
                        continue  # the default row already runs it
                    if m in SEARCH_METHODS or name in ONE_PASS_VARIANTS:
                        if m != "flap" or name != "p_iter":  # FLAP is one shot
                            out.append((m, sp, seed, v))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--model-name", default=None, help="name in the records (default: the directory name)")
    ap.add_argument("--calib")
    ap.add_argument("--eval")
    ap.add_argument("--methods", default="bonsai,flap,wanda-sp")
    ap.add_argument("--sparsities", default="0.2,0.35,0.5")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default="", help="comma list of name=value (see the module docstring)")
    ap.add_argument("--variant-sparsities", default="", help="sparsities the variants run at (default: the first)")
    ap.add_argument("--variant-seeds", default="0", help="seeds the variants run at")
    ap.add_argument("--variants-only", action="store_true", help="skip the default rows (another process runs them)")
    ap.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--work", default="/tmp/bonsai-quality")
    ap.add_argument("--results-dir", default=str(RESULTS_DIR))
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--git-commit", action="store_true", help="commit each record as it lands")
    ap.add_argument("--dry-run", action="store_true", help="list the runs still to do and exit")
    ap.add_argument("--render", action="store_true", help="only regenerate docs/RESULTS.md tables and docs/img plots")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    results_dir = Path(args.results_dir)
    if args.render:
        from render_quality import load_records, render_docs

        render_docs(load_records(results_dir))
        return 0
    if not (args.model and args.calib and args.eval):
        ap.error("--model, --calib and --eval are required unless --render")
    for m in args.methods.split(","):
        if m and m not in METHODS:
            ap.error(f"unknown method {m!r}")
    for v in filter(None, args.variants.split(",")):
        if "=" not in v or v.split("=", 1)[0] not in VARIANTS:
            ap.error(f"bad variant {v!r}; known: {', '.join(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.model_name = args.model_name or Path(args.model).resolve().name
    args.code = commit()  # the code this process runs: later commits to the tree do not change it
    import bonsai_lite.eval.perplexity  # noqa: F401  # import it all now, so that edits made to the tree
    import bonsai_lite.export  # noqa: F401  # while a long benchmark runs cannot mix into it
    import bonsai_lite.prune.api  # noqa: F401
    Path(args.work).mkdir(parents=True, exist_ok=True)
    todo = [j for j in jobs(args) if not (results_dir / f"{run_name(args.model_name, args.preset, *j)}.json").exists()]
    parent_name = f"quality-{args.model_name}-parent-e{args.eval_tokens}-t{args.seq_len}"
    if args.dry_run:
        print(json.dumps({"todo": [run_name(args.model_name, args.preset, *j) for j in todo]}, indent=1))
        return 0
    if not (results_dir / f"{parent_name}.json").exists():
        write_record(results_dir, parent_name, parent_record(args), git_commit=args.git_commit)
    for method, sp, seed, variant in todo:
        name = run_name(args.model_name, args.preset, method, sp, seed, variant)
        logging.info("[bench_quality] %s", name)
        rec = prune_and_eval(args, method, sp, seed, variant)
        write_record(results_dir, name, rec, git_commit=args.git_commit)
        print(json.dumps({k: rec[k] for k in ("method", "sparsity", "seed", "variant", "perplexity",
                                              "prune_seconds", "forward_tokens")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
