"""Quality benchmark: every method x sparsity on a real model, perplexity side by side.

Prunes with the library API (the same code path as `bonsai-lite prune`), evaluates parent and
pruned models with the streamed evaluator, appends one JSON line per result to --results (so an
interrupted benchmark resumes), prints the JSON summary, and with --write-docs regenerates the
table in docs/RESULTS.md between `<!-- bench_quality:begin -->` and `<!-- bench_quality:end -->`.

  python tools/bench_quality.py --model /path/smollm2 --calib ../shared/data/wikitext2-valid.txt \
      --eval ../shared/data/wikitext2-raw-test.txt --preset quick --eval-tokens 8192 --write-docs
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bonsai_lite.config import METHODS, PRESETS, CalibConfig, RunConfig, SearchConfig  # noqa: E402
from bonsai_lite.eval.perplexity import perplexity  # noqa: E402
from bonsai_lite.prune.api import prune  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "RESULTS.md"
BEGIN, END = "<!-- bench_quality:begin -->", "<!-- bench_quality:end -->"


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
            "threads": torch.get_num_threads()}


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip()


def load_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def key(r: dict) -> tuple:
    return (r["method"], r["sparsity"], r.get("tag", ""))


def run_one(args, method: str, sparsity: float, tag: str = "", **overrides) -> dict:
    q = dict(PRESETS[args.preset])
    q.update({k: v for k, v in overrides.items() if k in q})
    out = Path(args.work) / f"{method}-{int(round(sparsity * 100))}{('-' + tag) if tag else ''}"
    search = SearchConfig(method=method, sparsity=sparsity, p_iter=min(q["p_iter"], sparsity),
                          masks_per_iter=q["masks_per_iter"], seed=args.seed,
                          **{k: v for k, v in overrides.items() if k in ("rank", "penalty", "prior", "keep_spread")})
    cfg = RunConfig(model=str(Path(args.model).resolve()), out=str(out.resolve()),
                    calib=CalibConfig(text=str(Path(args.calib).resolve()), samples=q["samples"], seq_len=q["seq_len"]),
                    search=search, device=args.device)
    t0 = time.perf_counter()
    res = prune(cfg, overwrite=True, restart=True)
    prune_s = time.perf_counter() - t0
    row = {"method": method, "sparsity": sparsity, "tag": tag, "prune_seconds": prune_s,
           "params": res["params_after"], "prunable_params": res["prunable_params_after"],
           "settings": {**q, **overrides}, "ppl": {}}
    for seq in args.seq_lens:
        row["ppl"][str(seq)] = perplexity(out, text=args.eval, seq_len=seq, max_tokens=args.eval_tokens,
                                          device=args.device)["perplexity"]
    return row


def table(rows: list[dict], parent: dict, seq_lens: list[int]) -> str:
    head = "| method | sparsity | params | " + " | ".join(f"ppl @{s}" for s in seq_lens) + " | prune s |"
    lines = [head, "|" + " --- |" * (4 + len(seq_lens))]
    lines.append(f"| parent | 0 | {parent['params']:,} | " + " | ".join(f"{parent['ppl'][str(s)]:.2f}" for s in seq_lens)
                 + " | - |")
    main = [r for r in rows if not r.get("tag")]
    for sp in sorted({r["sparsity"] for r in main}):
        group = sorted((r for r in main if r["sparsity"] == sp), key=lambda r: r["ppl"][str(seq_lens[0])])
        for r in group:
            lines.append(f"| {r['method']} | {sp:.2f} | {r['params']:,} | "
                         + " | ".join(f"{r['ppl'][str(s)]:.2f}" for s in seq_lens) + f" | {r['prune_seconds']:.0f} |")
    ab = [r for r in rows if r.get("tag")]
    if ab:
        lines += ["", "Ablations (bonsai):", "", "| variant | sparsity | " + " | ".join(f"ppl @{s}" for s in seq_lens)
                  + " | prune s |", "|" + " --- |" * (3 + len(seq_lens))]
        for r in sorted(ab, key=lambda r: (r["tag"].split("=")[0], r["sparsity"], r["tag"])):
            lines.append(f"| {r['tag']} | {r['sparsity']:.2f} | " + " | ".join(f"{r['ppl'][str(s)]:.2f}" for s in seq_lens)
                         + f" | {r['prune_seconds']:.0f} |")
    return "\n".join(lines)


def write_docs(text: str) -> None:
    doc = DOCS.read_text() if DOCS.is_file() else "# Results\n"
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in doc:
        doc = doc[: doc.index(BEGIN)] + block + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip() + "\n\n## Method comparison (tools/bench_quality.py)\n\n" + block + "\n"
    DOCS.write_text(doc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--sparsities", default="0.2,0.35,0.5")
    ap.add_argument("--seq-lens", default="2048,512")
    ap.add_argument("--eval-tokens", type=int, default=None, help="evaluate on the first T tokens (all by default)")
    ap.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    ap.add_argument("--ablations", default="", help="comma list of masks=N, p_iter=X, rank=R (bonsai, at --ablation-sparsity)")
    ap.add_argument("--ablation-sparsity", type=float, default=0.35)
    ap.add_argument("--work", default="/tmp/bonsai-quality")
    ap.add_argument("--results", default=None, help="JSONL of finished results (default WORK/results.jsonl)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    args.seq_lens = [int(s) for s in args.seq_lens.split(",")]
    Path(args.work).mkdir(parents=True, exist_ok=True)
    results_path = Path(args.results or Path(args.work) / "results.jsonl")
    rows = load_results(results_path)
    done = {key(r) for r in rows}
    parent = next((r for r in rows if r["method"] == "parent"), None)
    if parent is None:
        parent = {"method": "parent", "sparsity": 0.0, "tag": "", "ppl": {}, "params": None}
        for seq in args.seq_lens:
            p = perplexity(args.model, text=args.eval, seq_len=seq, max_tokens=args.eval_tokens, device=args.device)
            parent["ppl"][str(seq)], parent["params"] = p["perplexity"], p["params"]
        with open(results_path, "a") as f:
            f.write(json.dumps(parent) + "\n")
        rows.append(parent)
    methods = [m for m in args.methods.split(",") if m and m != "none"]
    todo = [(m, float(s), "", {}) for s in args.sparsities.split(",") for m in methods]
    for ab in filter(None, args.ablations.split(",")):
        name, value = ab.split("=")
        parse = {"masks": ("masks_per_iter", int), "p_iter": ("p_iter", float), "rank": ("rank", str),
                 "samples": ("samples", int), "spread": ("keep_spread", float)}
        field_name, cast = parse[name]
        over = {field_name: cast(value)}
        todo.append(("bonsai", args.ablation_sparsity, ab, over))
    for method, sp, tag, over in todo:
        if (method, sp, tag) in done:
            continue
        print(f"[bench_quality] {method} sparsity {sp} {tag}", file=sys.stderr, flush=True)
        row = run_one(args, method, sp, tag, **over)
        with open(results_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
    body = [r for r in rows if r["method"] != "parent"]
    settings = {"model": args.model, "calib": args.calib, "eval": args.eval, "eval_tokens": args.eval_tokens,
                "preset": args.preset, "preset_settings": PRESETS[args.preset], "seed": args.seed}
    summary = {"hardware": hardware(), "commit": commit(), "settings": settings, "parent": parent, "results": body}
    print(json.dumps(summary, indent=1))
    if args.write_docs:
        cmd = "python tools/bench_quality.py " + " ".join(sys.argv[1:])
        hw = summary["hardware"]
        text = (f"Hardware: {hw['cpu']} ({hw['cores']} cores, torch {hw['torch']}, {hw['threads']} threads)"
                f"{', GPU ' + hw['gpu'] if hw['gpu'] else ''}; commit {summary['commit']}.\n"
                f"Settings: preset `{args.preset}` {PRESETS[args.preset]}, seed {args.seed}; calibration "
                f"`{Path(args.calib).name}`, evaluation `{Path(args.eval).name}`"
                f"{f' (first {args.eval_tokens} tokens)' if args.eval_tokens else ''}.\n\nCommand: `{cmd}`\n\n"
                + table(body, parent, args.seq_lens))
        write_docs(text)


if __name__ == "__main__":
    main()
