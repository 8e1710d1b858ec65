"""A whole `bonsai-lite prune` at a model's shape, through the CLI, against the planner's prediction.

Writes a random bf16 checkpoint of --shape (tools/bench_scale.py's generator; the tokenizer copied
from --tokenizer-from, a local model directory, so that --calib text can be read), or takes a real
model folder as it is (--parent: only read, never deleted), then runs, each as its own process:

  bonsai-lite prune PARENT --sparsity S --preset P --memory-budget B --calib TEXT --out OUT --json [EXTRA]
  bonsai-lite eval OUT --data EVAL --seq-len T --max-tokens N --memory-budget B --json

and loads the export's config with transformers. The record (kind "prune-scale") has, from the run's
own metrics.jsonl, every stage's seconds beside the planner's prediction, the prediction the run
logged when it started (`planned`), the time left each iteration predicted at the run's measured pace
against the time that was left, and each process's peak RSS (its whole RSS, not growth; the prune's
over all its stages, `prune_peak`).
A search run elsewhere (resumed, or started by hand with the same commands) is read with --collect
DIR, where DIR holds prune.json and eval.json (stdout of the commands above) and OUT.run.

  python tools/bench_prune.py --shape llama3-8b --preset standard --sparsity 0.5 --budget 8GB --threads 2 \\
      --tokenizer-from /work/smollm2 --calib ../shared/data/wikitext2-valid.txt \\
      --eval ../shared/data/wikitext2-raw-test.txt --work-dir /work/e2e8b --record
  python tools/bench_prune.py --parent /work/smollm2 --preset quick --sparsity 0.5 --threads 2 \\
      --calib ../shared/data/wikitext2-valid.txt --eval ../shared/data/wikitext2-raw-test.txt \\
      --work-dir /work/e2e-smollm2 --record idle
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_engine as BE  # noqa: E402
import scale_extras as SX  # noqa: E402
from random_checkpoint import SHAPES, shape_bytes, write_random_model  # noqa: E402
from bonsai_lite.io.checkpoint import INDEX_NAME  # noqa: E402
from bonsai_lite.progress import METRICS_NAME, read_metrics  # noqa: E402
from bonsai_lite.search.machine import fmt_bytes, parse_bytes  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def _cli(args: list[str], out: Path, log: Path, threads: int | None) -> dict:
    """One bonsai-lite command as its own process: stdout to `out`, stderr to `log`; its rusage."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    with open(out, "w") as o, open(log, "w") as e:
        p = subprocess.Popen([sys.executable, "-m", "bonsai_lite", *args], stdout=o, stderr=e, env=env)
        _, status, usage = os.wait4(p.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"bench_prune: `bonsai-lite {args[0]}` exited {code}; see {log}")
    return {"peak_rss_bytes": usage.ru_maxrss * 1024, "user_seconds": usage.ru_utime, "system_seconds": usage.ru_stime}


def _last_json(path: Path) -> dict:
    return json.loads(path.read_text().strip().splitlines()[-1])


def _time_v_peak(log: Path) -> int | None:
    """The peak RSS `/usr/bin/time -v` appended to a log (runs started by hand), in bytes."""
    m = re.findall(r"Maximum resident set size \(kbytes\): (\d+)", log.read_text()) if log.is_file() else []
    return int(m[-1]) * 1024 if m else None


def prune_peak(result: dict, stages: dict, rusage_peak: int | None) -> int | None:
    """The prune process's peak RSS: the result's `peak_rss_bytes` (VmHWM, kept across the stages'
    resets) and the stages' peaks. rusage (wait4, `/usr/bin/time -v`) only for a result without its
    own: each stage's VmHWM reset also resets it, and a child exec'd from a large process (this one,
    after writing a checkpoint) starts with that process's RSS as its ru_maxrss (Linux keeps the
    high-water mark across exec), so rusage reported the generator's 3.7 GiB for both prune and eval."""
    own = [result.get("peak_rss_bytes"), *(s["peak_rss_bytes"] for s in stages.values())]
    peaks = own if result.get("peak_rss_bytes") else [*own, rusage_peak]
    return max((p for p in peaks if p), default=None)


def collect(work: Path, settings: dict, rusage: dict | None = None) -> dict:
    """The record of a finished run in `work` (prune.json, eval.json and the run's metrics.jsonl);
    `settings`: what it was run with."""
    result = _last_json(work / "prune.json")
    metrics = read_metrics(Path(result["run_dir"]) / METRICS_NAME)
    stages = [m for m in metrics if m["stage"] != "iteration"]
    planned = result.get("planned") or {}
    # after each iteration: the time it predicted was left against what was left (the stages after
    # it up to the refit; the planner does not count the export)
    left = []
    for i, m in enumerate(metrics):
        if m["stage"] == "iteration" and m.get("predicted_seconds_left") is not None:
            rest = sum(s["seconds"] for s in metrics[i + 1:] if s["stage"] not in ("iteration", "export"))
            left.append({"after_iteration": m["iteration"] + 1, "pace": m["pace"],
                         "predicted": m["predicted_seconds_left"], "measured": rest})
    per_stage: dict[str, dict] = {}
    for s in stages:
        e = per_stage.setdefault(s["stage"], {"seconds": 0.0, "predicted_seconds": 0.0, "calls": 0, "peak_rss_bytes": 0})
        e["seconds"] += s["seconds"]
        e["predicted_seconds"] += s.get("predicted_seconds") or 0.0
        e["calls"] += 1
        e["peak_rss_bytes"] = max(e["peak_rss_bytes"], s.get("peak_rss_bytes") or 0)
    ev = _last_json(work / "eval.json") if (work / "eval.json").is_file() else None
    rusage = rusage or {k: {"peak_rss_bytes": _time_v_peak(work / f"{k}.log")} for k in ("prune", "eval")}
    out = Path(result["out"])
    seconds = sum(s["seconds"] for s in stages)
    config = None
    if out.is_dir():
        from transformers import AutoConfig

        config = type(AutoConfig.from_pretrained(out, trust_remote_code=True)).__name__  # our own export's code
    return {
        "kind": "prune-scale", **settings, "params_before": result["params_before"],
        "params_after": result["params_after"], "iterations": result["iterations"],
        "seconds": seconds,  # every stage of the run, over all its processes (a resumed run included)
        "search_and_refit_seconds": seconds - per_stage.get("export", {}).get("seconds", 0.0),
        "planned": planned, "stages": per_stage, "seconds_left": left,
        "prune_peak_rss_bytes": prune_peak(result, per_stage, rusage["prune"]["peak_rss_bytes"]),
        "export_bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file()) if out.is_dir() else None,
        "eval": None if ev is None else {"perplexity": ev.get("perplexity"), "tokens": ev.get("tokens"),
                                         "seconds": ev.get("seconds"),
                                         "peak_rss_bytes": ev.get("peak_rss_bytes") or rusage["eval"]["peak_rss_bytes"]},
        "transformers_config": config, "commit": BE.commit(), "hardware": BE.hardware(),
    }


# ---- docs/PERFORMANCE.md's block, from the records ---------------------------------------------
BLOCK = "prune_scale"


def load_records() -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted(RESULTS.glob("prune-scale-*.json"))]


def _label(r: dict) -> str:
    """'quick, 50%', with the arguments passed on to prune after it ('quick, 50% --refit ls')."""
    return " ".join([f"{r['preset']}, {r['sparsity']:.0%}", *r.get("extra_args", [])])


def _t(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 600 else f"{seconds / 60:.1f} min"


def render(records: list[dict]) -> list[str]:
    lines = ["Generated by `python tools/bench_docs.py` from docs/results/prune-scale-*.json (tools/bench_prune.py).", ""]
    lines += ["| shape | preset, sparsity | budget | threads | iterations | search (planned) | refit (planned) | "
              "search + refit (planned) | export | prune peak RSS | export size | eval ppl, peak RSS | commit |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        st, plan = r["stages"], r["planned"] or {}
        refit = st.get("refit", {}).get("seconds", 0.0)
        search = r["search_and_refit_seconds"] - refit
        p_all = plan.get("seconds")
        p_search = None if p_all is None else p_all - plan.get("refit", 0.0)
        ev = r.get("eval") or {}
        lines.append(
            f"| {r['shape']} | {_label(r)} | {fmt_bytes(r['budget_bytes']) if r['budget_bytes'] else '-'} "
            f"| {r['threads']} | {r['iterations']} | {_t(search)} ({_t(p_search) if p_search else '-'}) "
            f"| {_t(refit)} ({_t(plan['refit']) if plan.get('refit') else '-'}) "
            f"| {_t(r['search_and_refit_seconds'])} ({_t(p_all) if p_all else '-'}; "
            f"{r['search_and_refit_seconds'] / p_all if p_all else float('nan'):.2f}x) "
            f"| {_t(st.get('export', {}).get('seconds', 0.0))} | {fmt_bytes(r['prune_peak_rss_bytes'] or 0)} "
            f"| {fmt_bytes(r['export_bytes'] or 0)} | {ev.get('perplexity', float('nan')):.4g}, "
            f"{fmt_bytes(ev.get('peak_rss_bytes') or 0)} | {r['commit']} |")
    for r in records:
        if not r["seconds_left"]:
            continue
        lines += ["", f"Time left as each iteration logged it ({r['shape']}, {_label(r)}): the "
                  "planner's rest of the run times the pace measured so far, against the time that was left "
                  "(search and refit; the export is not planned):", "",
                  "| after iteration | pace (measured / planned) | predicted left | measured left | predicted / measured |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {e['after_iteration']} | {e['pace']:.2f} | {_t(e['predicted'])} | {_t(e['measured'])} | "
                  f"{e['predicted'] / e['measured'] if e['measured'] else float('nan'):.2f} |" for e in r["seconds_left"]]
    lines += ["", "Commands:", ""] + [f"    {r['command']}" for r in records]
    return lines


def write_docs() -> None:
    import bench_docs  # noqa: PLC0415 - the block writer shared by every tool

    records = load_records()
    if records:
        bench_docs.write_block(BLOCK, render(records))


def run(args, extra: list[str]) -> dict:
    work = Path(args.work_dir)
    out = work / "pruned"
    parent = Path(args.parent) if args.parent else work / "parent"
    # never delete a checkpoint this run did not write; a --parent is only read
    created = not args.parent and not (parent / INDEX_NAME).is_file()
    if created:  # the checkpoint, the export (at most as large) and room for the run state
        need = int(shape_bytes(args.shape) * (2 - args.sparsity * 0.8)) + 2**30
        SX.check_disk(work, need)
        print(f"[generate] {args.shape} in {parent} (the run needs about {fmt_bytes(need)})", file=sys.stderr)
    work.mkdir(parents=True, exist_ok=True)
    try:
        if not args.parent:
            write_random_model(args.shape, parent, device="cpu", seed=args.seed)
            for name in TOKENIZER_FILES:
                if (Path(args.tokenizer_from) / name).is_file() and not (parent / name).exists():
                    shutil.copy2(Path(args.tokenizer_from) / name, parent / name)
        budget = ["--memory-budget", args.budget] if args.budget else []
        rusage = {"prune": _cli(["prune", str(parent), "--sparsity", str(args.sparsity), "--preset", args.preset,
                                 "--calib", args.calib, "--out", str(out), "--overwrite", "--restart", *budget, "--json",
                                 *extra], work / "prune.json", work / "prune.log", args.threads)}
        rusage["eval"] = _cli(["eval", str(out), "--data", args.eval, "--seq-len", str(args.eval_seq_len),
                               "--max-tokens", str(args.eval_tokens), *budget, "--json"], work / "eval.json",
                              work / "eval.log", args.threads)
        record = collect(work, _settings(args, extra), rusage)
    finally:
        if created and not args.keep_checkpoint:
            shutil.rmtree(parent, ignore_errors=True)
    return record


def _shape(args) -> str:
    """A real model (--parent) is named by its folder, a random one by its shape."""
    return Path(args.parent).name if args.parent else args.shape


def _settings(args, extra: list[str]) -> dict:
    return {"shape": _shape(args), "real_weights": bool(args.parent),
            "device": "cpu", "preset": args.preset, "sparsity": args.sparsity,
            "budget_bytes": parse_bytes(args.budget) if args.budget else None, "threads": args.threads,
            "extra_args": extra, "eval_seq_len": args.eval_seq_len}


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="arguments after -- go to `bonsai-lite prune` as they are")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--budget", default=None, help="--memory-budget of both commands, e.g. 8GB")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokenizer-from", help="a local model directory whose tokenizer files are copied "
                     "into the random checkpoint")
    src.add_argument("--parent", help="prune this model folder (real weights, only read) instead of a random "
                     "checkpoint of --shape; the record is named by the folder")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--keep-checkpoint", action="store_true")
    ap.add_argument("--collect", action="store_true", help="only read the finished run in --work-dir")
    ap.add_argument("--record", default=None, metavar="TAG", help="write the JSON to docs/results/ under this tag")
    args = ap.parse_args(argv)
    name = f"prune-scale-{_shape(args)}-{args.preset}-{round(args.sparsity * 100)}-{args.record}.json"
    record = collect(Path(args.work_dir), _settings(args, extra)) if args.collect else run(args, extra)
    if args.collect and args.record and (RESULTS / name).is_file():  # re-collected: the code it ran is what it was
        old = json.loads((RESULTS / name).read_text())
        record["commit"], record["command"] = old["commit"], old["command"]
    else:
        record["command"] = " ".join(["python tools/bench_prune.py", *argv, *(["--", *extra] if extra else [])])
    return SX.emit(record, RESULTS / name if args.record else None)


if __name__ == "__main__":
    main()
