"""Re-plan the stored 7-8B runs with the current planner: would its time model have predicted them?

Each `kind: "scale"` CPU record whose machine was probed (it stores `gemm_flops_per_s` and
`bf16_factor`) holds the measured engine seconds of one dense pass (`priors`) and one masked
evaluation (`evaluate`), and what the planner of its day predicted. The machine's disk rate and page
cache at the time are not stored, so the re-plan is a difference: the planner of the record's own
commit (`--base` where that commit's planner cannot be loaded) and the current one both plan the two
passes on the recorded machine, and the record's prediction moves by the change. Prints JSON (one
row per record, and how many are within 30% before and after):

    python tools/replan_scale.py --base 9545c28 --out docs/results/replan-scale-s24.json

With --gpu FILE ..., the masked evaluations a GPU session stored instead (`tools/gpu_session.sh`: per
budget, the prune's own and, with `sweep`, other plans measured the same way): each measured plan is
priced again with the current cost model (`planner.candidate_cost`) on the recorded GPU, with the
checkpoint in the page cache as it was there (the bench writes it just before the runs; 16 GB of a
128 GiB host), and `make_plan` is asked what it would choose now; where the session measured that
plan (same order, rows per pass and tile), its time is given beside it:

    python tools/replan_scale.py --gpu docs/results/gpu-h200-s31-run*.json --out docs/results/replan-gpu-s32.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import bench_engine  # noqa: E402
from random_checkpoint import shape_spec  # noqa: E402
from scale_docs import RESULTS  # noqa: E402

from bonsai_lite.search import planner as current  # noqa: E402
from bonsai_lite.search.machine import Machine, _gpu_flops  # noqa: E402

# What the planner may use of the recorded GPU host's 128 GiB (HOST_RAM_FRACTION of what was free).
GPU_HOST_RAM = 80 * 2**30
SAME = ("order", "group_rows", "tile_rows")


def _module_at(commit: str, path: str, name: str, replace_imports: dict[str, str]):
    """`path` as it was at `commit`, imported as module `name` (its imports of the modules in
    `replace_imports` pointed at the given stand-ins)."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{path}"], check=True, capture_output=True,
                         text=True).stdout
    for old, new in replace_imports.items():
        src = src.replace(f"from {old} import", f"from {new} import")
    with tempfile.TemporaryDirectory() as tmp:  # the source is read once, when the module executes
        file = Path(tmp) / f"{name}.py"
        file.write_text(src)
        spec = importlib.util.spec_from_file_location(name, file)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return mod


def _machine_flops(machine_mod, gemm: float) -> float:
    """What `detect_machine` of that commit stored as Machine.flops for a probed rate `gemm`."""
    return getattr(machine_mod, "CPU_ENGINE_FRACTION", 1.0) * gemm


def _planner_at(commit: str, cache: dict):
    """(machine module, planner module) of `commit`, or None where they do not load here."""
    if commit not in cache:
        tag = commit.replace("+", "_")
        try:
            mach = _module_at(commit, "bonsai_lite/search/machine.py", f"machine_{tag}", {})
            plan = _module_at(commit, "bonsai_lite/search/planner.py", f"planner_{tag}",
                              {"bonsai_lite.search.machine": f"machine_{tag}"})
            cache[commit] = (mach, plan)
        except (subprocess.CalledProcessError, ImportError, AttributeError, SyntaxError, TypeError):
            cache[commit] = None
    return cache[commit]


def replan(base: str) -> dict:
    cache: dict = {}
    rows = []
    for path in sorted(RESULTS.glob("*.json")):
        r = json.loads(path.read_text())
        st = r.get("stages", {})
        if r.get("kind") != "scale":
            continue
        if r.get("device") != "cpu" or not r.get("bf16_factor") or "priors" not in st or "evaluate" not in st:
            continue
        own = r["commit"].split("+")[0]
        used = own if _planner_at(own, cache) else base
        old_machine, old = _planner_at(used, cache)
        spec = shape_spec(r["shape"])
        m = Machine("cpu", r["budget_bytes"], r["budget_bytes"], 10**11, r["gemm_flops_per_s"], r["threads"],
                    page_cache=20 * 2**30, bf16_factor=r["bf16_factor"])
        mo = old_machine.Machine("cpu", r["budget_bytes"], r["budget_bytes"], 10**11,
                                 _machine_flops(old_machine, r["gemm_flops_per_s"]), r["threads"],
                                 page_cache=20 * 2**30, bf16_factor=r["bf16_factor"])
        if r.get("fresh_page_bps"):  # probed since the twenty-fifth session; before, the nominal rate
            m = replace(m, fresh_page_bps=r["fresh_page_bps"])
            if hasattr(mo, "fresh_page_bps"):
                mo = replace(mo, fresh_page_bps=r["fresh_page_bps"])
        works = [(1, r["samples"], r["seq_len"]), (r["masks"], r["samples"], r["seq_len"])]
        before = sum(old.make_plan(spec, spec.layers, old.Work(*w), mo, dtype=r["dtype"]).predicted_seconds
                     for w in works)
        after = sum(current.make_plan(spec, spec.layers, current.Work(*w), m, dtype=r["dtype"]).predicted_seconds
                    for w in works)
        predicted = r["predicted_seconds"] + after - before
        rows.append({"record": path.name, "commit": r["commit"], "replanned_against": used,
                     "cpu": r["hardware"]["cpu"], "dtype": r["dtype"], "bf16_factor": round(r["bf16_factor"], 2),
                     "load_average": r.get("load_average", [None])[0], "engine_seconds": round(r["engine_seconds"], 1),
                     "stored_predicted": round(r["predicted_seconds"], 1), "replanned": round(predicted, 1),
                     "stored_ratio": round(r["predicted_seconds"] / r["engine_seconds"], 2),
                     "replanned_ratio": round(predicted / r["engine_seconds"], 2)})

    return {"kind": "replan-scale", "base": base, "commit": bench_engine.commit(), "records": len(rows),
            **_within(rows), "rows": rows}


def _within(rows: list[dict]) -> dict:
    return {f"within_30pct_{k}": sum(abs(x[f"{k}_ratio"] - 1) <= 0.3 for x in rows) for k in ("stored", "replanned")}


def _measured(path: Path) -> list[dict]:
    """(budget, source, plan, seconds) of every masked evaluation a GPU session file holds."""
    r = json.loads(path.read_text())
    s = r["settings"]
    out = []
    for run in r["runs"]:
        found = [("prune", run["plan"], run["stages"]["evaluate"]["seconds"])]
        found += [("sweep", x["plan"], x["seconds"]) for x in (run.get("sweep") or {}).get("runs", [])]
        out += [dict(file=path.name, gpu=r["hardware"]["gpu"], shape=s["model"], dtype=s["dtype"],
                     work=(s["masks"], s["samples"], s["seq_len"]), disk_bps=s["cold_read_bps"],
                     budget=run["budget"], source=src, plan=plan, seconds=sec) for src, plan, sec in found]
    return out


def _machine(m: dict) -> Machine:
    return Machine("cuda", m["budget"], GPU_HOST_RAM, 40 * 2**30, _gpu_flops(m["gpu"]), 16, m["gpu"],
                   page_cache=GPU_HOST_RAM, disk_bps=m["disk_bps"], cached=1.0)


def replan_gpu(paths: list[Path]) -> dict:
    measured = [m for p in paths for m in _measured(p)]
    rows, choices = [], {}
    for m in measured:
        spec, p = shape_spec(m["shape"]), m["plan"]
        _, now, _, _ = current.candidate_cost(
            spec, spec.layers, current.Work(*m["work"]), _machine(m), dtype=p["dtype"], order=p["order"],
            cache=p["cache"], group_rows=p["group_rows"], tile_rows=p["tile_rows"], head_chunk=p["head_chunk"],
            prefetch=p["prefetch"], weights_8bit=p["weights_8bit"], src_bytes=2)
        rows.append({"file": m["file"], "budget_gib": m["budget"] / 2**30, "source": m["source"],
                     "plan": {k: p[k] for k in (*SAME, "head_chunk", "cache")}, "seconds": round(m["seconds"], 2),
                     "stored_predicted": round(p["predicted_seconds"], 2), "replanned": round(now, 2),
                     "stored_ratio": round(p["predicted_seconds"] / m["seconds"], 2),
                     "replanned_ratio": round(now / m["seconds"], 2)})
        key = (m["shape"], m["work"], m["budget"])
        if key not in choices:
            chosen = current.make_plan(spec, spec.layers, current.Work(*m["work"]), _machine(m), dtype=m["dtype"])
            choices[key] = {"shape": m["shape"], "work": m["work"], "budget_gib": m["budget"] / 2**30,
                            "plan": {k: getattr(chosen, k) for k in (*SAME, "head_chunk", "cache")},
                            "predicted": round(chosen.predicted_seconds, 2)}
    for c in choices.values():  # measured times of the plan chosen now, and of the prune's own choice then
        key = tuple(c["plan"][k] for k in SAME)
        same = [m for m in measured if m["shape"] == c["shape"] and m["budget"] / 2**30 == c["budget_gib"]]
        c["measured_seconds"] = sorted(round(m["seconds"], 2) for m in same if tuple(m["plan"][k] for k in SAME) == key)
        c["prune_then_seconds"] = sorted(round(m["seconds"], 2) for m in same if m["source"] == "prune")

    return {"kind": "replan-gpu", "commit": bench_engine.commit(), "files": [p.name for p in paths],
            "measured": len(rows), **_within(rows), "rows": rows, "choices": list(choices.values())}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--base", help="the commit whose planner made the stored CPU predictions")
    which.add_argument("--gpu", nargs="+", type=Path, metavar="FILE",
                       help="raw GPU session JSONs (docs/results/gpu-*.json)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    out = json.dumps(replan_gpu(args.gpu) if args.gpu else replan(args.base), indent=1)
    print(out)
    if args.out:
        Path(args.out).write_text(out + "\n")


if __name__ == "__main__":
    main()
