"""Re-cost the stored GPU evaluations with the current planner: how close are its predictions, which plan would it choose?

A GPU session (`tools/gpu_session.sh`) stores, per budget, the masked evaluation the prune ran (its
plan and measured seconds) and, with `sweep`, other plans under the same budget measured in the same
way. Each measured plan is priced again with the current cost model (`planner.candidate_cost`) on
the recorded GPU, with the checkpoint in the page cache as it was there (the bench writes it just
before the runs; 16 GB of a 128 GiB host), and `make_plan` is asked what it would choose now; where
the session measured that plan (same order, rows per pass and tile), its time is given beside it.
Prints JSON:

    python tools/replan_gpu.py docs/results/gpu-h200-s31-run*.json --out docs/results/replan-gpu-s32.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from random_checkpoint import shape_spec  # noqa: E402

from bonsai_lite.search.machine import Machine, _gpu_flops  # noqa: E402
from bonsai_lite.search.planner import Work, candidate_cost, make_plan  # noqa: E402

HOST_RAM = 80 * 2**30  # what the planner may use of the recorded host's 128 GiB (HOST_RAM_FRACTION of what was free)
SAME = ("order", "group_rows", "tile_rows")


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
    return Machine("cuda", m["budget"], HOST_RAM, 40 * 2**30, _gpu_flops(m["gpu"]), 16, m["gpu"],
                   page_cache=HOST_RAM, disk_bps=m["disk_bps"], cached=1.0)


def replan(paths: list[Path]) -> dict:
    measured = [m for p in paths for m in _measured(p)]
    rows, choices = [], {}
    for m in measured:
        spec, p = shape_spec(m["shape"]), m["plan"]
        _, now, _, _ = candidate_cost(spec, spec.layers, Work(*m["work"]), _machine(m), dtype=p["dtype"], order=p["order"],
                                      cache=p["cache"], group_rows=p["group_rows"], tile_rows=p["tile_rows"],
                                      head_chunk=p["head_chunk"], prefetch=p["prefetch"],
                                      weights_8bit=p["weights_8bit"], src_bytes=2)
        rows.append({"file": m["file"], "budget_gib": m["budget"] / 2**30, "source": m["source"],
                     "plan": {k: p[k] for k in (*SAME, "head_chunk", "cache")}, "seconds": round(m["seconds"], 2),
                     "stored_predicted": round(p["predicted_seconds"], 2), "replanned": round(now, 2),
                     "stored_ratio": round(p["predicted_seconds"] / m["seconds"], 2),
                     "replanned_ratio": round(now / m["seconds"], 2)})
        key = (m["shape"], m["work"], m["budget"])
        if key not in choices:
            chosen = make_plan(spec, spec.layers, Work(*m["work"]), _machine(m), dtype=m["dtype"])
            choices[key] = {"shape": m["shape"], "work": m["work"], "budget_gib": m["budget"] / 2**30,
                            "plan": {k: getattr(chosen, k) for k in (*SAME, "head_chunk", "cache")},
                            "predicted": round(chosen.predicted_seconds, 2)}
    for c in choices.values():  # measured times of the plan chosen now, and of the prune's own choice then
        key = tuple(c["plan"][k] for k in SAME)
        same = [m for m in measured if m["shape"] == c["shape"] and m["budget"] / 2**30 == c["budget_gib"]]
        c["measured_seconds"] = sorted(round(m["seconds"], 2) for m in same if tuple(m["plan"][k] for k in SAME) == key)
        c["prune_then_seconds"] = sorted(round(m["seconds"], 2) for m in same if m["source"] == "prune")

    def within(key):
        return sum(abs(x[key] - 1) <= 0.3 for x in rows)

    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    return {"kind": "replan-gpu", "commit": head, "files": [p.name for p in paths], "measured": len(rows),
            "within_30pct_stored": within("stored_ratio"), "within_30pct_replanned": within("replanned_ratio"),
            "rows": rows, "choices": list(choices.values())}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="raw GPU session JSONs (docs/results/gpu-*.json)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    out = json.dumps(replan(args.files), indent=1)
    print(out)
    if args.out:
        Path(args.out).write_text(out + "\n")


if __name__ == "__main__":
    main()
