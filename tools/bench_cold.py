"""A dense pass whose weights come from disk, taken apart: the reads alone, the pass with and without
prefetch, the pass computing on copies of its weights, and the pass with the checkpoint cached.

On a 2-core VM the 8B dense pass (1 x 128 tokens) took 14-17 s cold, where its reads alone took
7 s and its compute alone 2.7 s (docs/PERFORMANCE.md, thirtieth session): this tells which part
of a cold pass is slow. Each case drops the checkpoint from the page cache first (except `warm`),
runs `engine.evaluate` on the real checkpoint and reports its seconds, the seconds spent loading
blocks (`BlockLoader.block`) and in `ops.block_forward`, and the disk's bytes read. One JSON object
on stdout (kind "cold_pass"); --record writes it to docs/results/.

  python tools/bench_cold.py /work/scale/llama3-8b --hold-ram 10GB --record cold-llama3-8b-s30.json
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

import bench_engine as BE  # noqa: E402
import scale_extras as SX  # noqa: E402

from bonsai_lite.io.blocks import BlockLoader  # noqa: E402
from bonsai_lite.io.model import StreamedModel  # noqa: E402
from bonsai_lite.search import engine as E  # noqa: E402
from bonsai_lite.search.machine import detect_machine, parse_bytes  # noqa: E402
from bonsai_lite.search.planner import Work, make_plan  # noqa: E402

CASES = ("reads", "pass", "pass_prefetch", "pass_on_copies", "warm")


class Timers:
    """Seconds inside BlockLoader.block and ops.block_forward (as the engine calls it) while active."""

    def __init__(self, copies: bool = False):
        self.copies, self.load, self.forward = copies, 0.0, 0.0

    def __enter__(self):
        self._block, self._forward = BlockLoader.block, E.block_forward
        timers = self

        def block(loader, layer):
            t0 = time.perf_counter()
            w = timers._block(loader, layer)
            if timers.copies:  # the same values in fresh anonymous memory
                w = dataclasses.replace(w, **{f.name: getattr(w, f.name).clone() for f in dataclasses.fields(w)
                                              if isinstance(getattr(w, f.name), torch.Tensor)})
            timers.load += time.perf_counter() - t0
            return w

        def forward(*a, **kw):
            t0 = time.perf_counter()
            try:
                return timers._forward(*a, **kw)
            finally:
                timers.forward += time.perf_counter() - t0
        BlockLoader.block, E.block_forward = block, forward
        return self

    def __exit__(self, *exc):
        BlockLoader.block, E.block_forward = self._block, self._forward


def run_case(case: str, model: StreamedModel, plan, tokens: torch.Tensor, dtype: torch.dtype, *,
             settle: float) -> dict:
    if case != "warm":
        SX.drop_from_page_cache(model.root)
        time.sleep(settle)
    disk0 = SX.disk_read_bytes() or 0
    t0 = time.perf_counter()
    with Timers(copies=case == "pass_on_copies") as timers:
        if case == "reads":
            loader = model.loader(device="cpu", dtype=dtype)
            for layer in range(len(model.layers)):
                loader.block(layer)
        else:
            p = dataclasses.replace(plan, prefetch=case == "pass_prefetch")
            E.evaluate(model, tokens, None, p)
    seconds = time.perf_counter() - t0
    disk = (SX.disk_read_bytes() or 0) - disk0
    return {"case": case, "seconds": round(seconds, 3), "load_seconds": round(timers.load, 3),
            "forward_seconds": round(timers.forward, 3), "disk_read_bytes": disk,
            "disk_read_bps": round(disk / seconds) if seconds > 0 else None}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a checkpoint folder (e.g. one tools/bench_scale.py --keep left)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma separated, from {', '.join(CASES)}")
    ap.add_argument("--tokens", type=int, default=128, help="one row of this many tokens (the dense pass)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each case, in turn")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds to wait after dropping the checkpoint")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hold-ram", default=None, metavar="SIZE",
                    help="keep this much RAM resident in a child process while measuring (bench_scale.py's)")
    ap.add_argument("--record", help="also write the JSON to docs/results/<name>")
    args = ap.parse_args(argv)
    cases = args.cases.split(",")  # a case may repeat: "warm,warm" is the second pass after the first
    if unknown := sorted(set(cases) - set(CASES)):
        raise SystemExit(f"bench_cold: unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    torch.set_num_threads(args.threads)
    model = StreamedModel.open(args.model)
    dtype = getattr(torch, args.dtype)
    tokens = torch.randint(0, model.spec.vocab, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    rows = []
    with SX.hold_ram(parse_bytes(args.hold_ram)) if args.hold_ram else nullcontext() as held:
        machine = detect_machine(device="cpu", budget=None, checkpoint=model.root)
        plan = make_plan(model.spec, model.layers, Work(1, 1, args.tokens), machine, dtype=args.dtype)
        for rep in range(args.repeats):
            for case in cases:
                row = {"repeat": rep, **run_case(case, model, plan, tokens, dtype, settle=args.settle)}
                rows.append(row)
                print(f"[cold] {case}: {row['seconds']:.1f} s (load {row['load_seconds']:.1f}, "
                      f"forward {row['forward_seconds']:.1f})", file=sys.stderr)
    result = {"kind": "cold_pass", "model": str(args.model), "tokens": args.tokens, "dtype": args.dtype,
              "threads": args.threads, "settle_seconds": args.settle, "hold_ram": held, "checkpoint_bytes": model.ckpt.nbytes(),
              "plan": {k: v for k, v in plan.to_json().items() if k != "breakdown"}, "rows": rows,
              "load_average": list(os.getloadavg())}
    return BE.emit(result, "bench_cold.py", argv, args.record)


if __name__ == "__main__":
    main()
