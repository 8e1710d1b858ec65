"""Re-plan the stored 7-8B CPU runs with the current planner: would its time model have predicted them?

Each `kind: "scale"` CPU record whose machine was probed (it stores `gemm_flops_per_s` and
`bf16_factor`) holds the measured engine seconds of one dense pass (`priors`) and one masked
evaluation (`evaluate`), and what the planner of its day predicted. The machine's disk rate and page
cache at the time are not stored, so the re-plan is a difference: the planner of the record's own
commit (`--base` where that commit's planner cannot be loaded) and the current one both plan the two
passes on the recorded machine, and the record's prediction moves by the change. Prints JSON (one
row per record, and how many are within 30% before and after):

    python tools/replan_scale.py --base 9545c28 --out docs/results/replan-scale-s24.json
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

from random_checkpoint import shape_spec  # noqa: E402
from scale_docs import RESULTS  # noqa: E402

from bonsai_lite.search import planner as current  # noqa: E402
from bonsai_lite.search.machine import Machine  # noqa: E402


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

    def within(key):
        return sum(abs(x[key] - 1) <= 0.3 for x in rows)

    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    return {"kind": "replan-scale", "base": base, "commit": head, "records": len(rows),
            "within_30pct_stored": within("stored_ratio"), "within_30pct_replanned": within("replanned_ratio"),
            "rows": rows}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the commit whose planner made the stored predictions")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    out = json.dumps(replan(args.base), indent=1)
    print(out)
    if args.out:
        Path(args.out).write_text(out + "\n")


if __name__ == "__main__":
    main()
