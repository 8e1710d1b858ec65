"""Masked-evaluation benchmark: throughput, model FLOPs utilisation, peak memory, planner accuracy.

Plans with the real machine probe and a --memory-budget, evaluates K random masks x n samples x T
tokens with the streamed engine, and prints one JSON object: hardware, commit, settings, the plan,
mask-tokens/s, achieved FLOP/s and MFU against a stated peak, peak memory (CPU: growth of this
process's RSS high-water mark; CUDA: torch.cuda.max_memory_reserved), bytes read from disk and
moved to the device, and predicted vs measured time and peak. --sweep also runs other tile sizes
and both streaming orders that fit the budget and reports the planner's choice against the best
measured. --write-docs records the run in docs/results/ and regenerates the table between
`<!-- bench_engine:begin -->` and `<!-- bench_engine:end -->` (one row per hardware x setting).

The model is --model DIR, or --shape NAME: random weights written to disk as sharded safetensors
(generated on the GPU when there is one; 8B parameters take minutes on a CPU).

  python tools/bench_engine.py --shape smollm2-135m --masks 8 --samples 2 --seq-len 128 \\
      --memory-budget 1GB --threads 1 --write-docs
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bonsai_lite.io.model import StreamedModel  # noqa: E402
from bonsai_lite.search.engine import evaluate  # noqa: E402
from bonsai_lite.search.machine import GPU_PEAK_FLOPS, detect_machine, parse_bytes  # noqa: E402
from bonsai_lite.search.planner import GROUP_TILES, Plan, Work, candidate_cost, flops_per_token, make_plan  # noqa: E402
from bonsai_lite.structure import UnitLayout  # noqa: E402
from random_checkpoint import SHAPES, write_random_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "PERFORMANCE.md"
INTRO = """# Performance

Measured figures, each with the hardware, commit and command it came from. The measurements are
JSON files in `docs/results/` (one per hardware x setting); the tables between
`<!-- tool:begin -->` / `<!-- tool:end -->` markers and the plots in `docs/img/` are generated from
them by `python tools/bench_docs.py` (a benchmark run with `--write-docs` adds its record and
regenerates its own table).

## Masked evaluation engine (tools/bench_engine.py)

Mask-tokens/s counts (sub-model, sample) rows x predicted tokens. FLOPs are those of the dense
forward the engine computes for every row (masks zero unit outputs, they do not skip work): 2 x
block parameters + causal attention + LM head, per token. MFU is against the peak in the `peak`
column: the vendor's dense bf16 figure on a GPU, a measured 2048^3 fp32 GEMM with the same threads
on a CPU (so CPU MFU reads "fraction of the best GEMM this machine does", not of a datasheet).
Peak memory is the growth of the process's RSS high-water mark on a CPU (what --memory-budget
bounds there) and `torch.cuda.max_memory_reserved` on a GPU.
"""

# ---- environment ---------------------------------------------------------------------------------
def hardware() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": cores, "threads": torch.get_num_threads(), "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version()}


def commit() -> str:
    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "bonsai_lite", "tools")
    return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")


def emit(result: dict, tool: str, argv, record: str | None) -> dict:
    """Stamp a benchmark's result with the commit, hardware and command that made it, print it as JSON
    on stdout and, given `record`, write it to docs/results/<record>."""
    result.update(commit=commit(), hardware=hardware(),
                  command=f"python tools/{tool} " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(json.dumps(result, indent=1))
    if record:
        (ROOT / "docs" / "results" / record).write_text(json.dumps(result, indent=1) + "\n")
    return result


def peak_flops(device: str, dtype: str) -> tuple[float, str]:
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)
        if peak is not None and dtype in ("bfloat16", "float16"):
            return peak, f"{name} dense {dtype} datasheet"
    n = 2048  # a GEMM large enough to reach the machine's best rate with the current threads
    # fp32 unless a CPU computes in bf16 (AMX makes that several times faster there)
    gemm_dtype = torch.bfloat16 if dtype == "bfloat16" and not device.startswith("cuda") else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=gemm_dtype), torch.randn(n, n, device=device, dtype=gemm_dtype)
    a @ b  # warm-up: oneDNN builds its kernels on the first calls
    best = float("inf")
    for _ in range(4):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    kind = "bf16" if gemm_dtype == torch.bfloat16 else "fp32"
    where = torch.cuda.get_device_name(0) if device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    return 2 * n**3 / best, f"measured {kind} {n}^3 GEMM, {where}"


# ---- measurement ---------------------------------------------------------------------------------
def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return None


def _reset_peak(device: str) -> int:
    """Reset the peak-memory counter; the baseline it is measured from."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_reserved()
    import psutil

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # peak RSS := current RSS
    except OSError:
        pass  # then the peak includes earlier phases: an over-estimate
    return psutil.Process().memory_info().rss


def _peak_growth(device: str, baseline: int) -> int:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_reserved() - baseline
    return (_status_bytes("VmHWM") or 0) - baseline


def _inputs(model: StreamedModel, masks: int, samples: int, tokens: int, seed: int):
    layout = UnitLayout.of(model.layers)
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(masks, layout.total, generator=g) > 0.3  # ~30% of units off, as in a Bonsai iteration
    m[0] = True
    return m, torch.randint(0, model.spec.vocab, (samples, tokens), generator=g)


def measure(model: StreamedModel, plan: Plan, work: Work, *, seed: int, peak: float) -> dict:
    masks, ids = _inputs(model, work.masks, work.samples, work.tokens, seed)
    baseline = _reset_peak(plan.device)
    t0 = time.perf_counter()
    res = evaluate(model, ids, masks, plan)
    if plan.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    grown = _peak_growth(plan.device, baseline)
    flops = work.rows * work.tokens * flops_per_token(model.spec, model.layers, work.tokens)
    return {
        "seconds": seconds, "predicted_seconds": plan.predicted_seconds,
        "peak_bytes": grown, "predicted_peak_bytes": plan.predicted_peak_bytes,
        "mask_tokens_per_s": res.stats.tokens / seconds, "flops": flops, "flops_per_s": flops / seconds,
        "mfu": flops / seconds / peak, "passes": res.stats.passes, "bytes_read": res.stats.bytes_read,
        "bytes_to_device": res.stats.bytes_to_device, "bytes_spilled": res.stats.bytes_spilled,
        "nll_mean": float(res.nll.mean()),
    }


def sweep_plans(model: StreamedModel, work: Work, machine, chosen: Plan, limit: int) -> list[Plan]:
    """Per (order, tile): the planner's best fitting variant (cache, group, prefetch); the choice first."""
    spec, rows = model.spec, work.rows
    best: dict[tuple[str, int], Plan] = {}
    for tile in sorted({min(rows, 2**i) for i in range(16)}):
        combos = [("layer-major", c, rows, pf) for c in ("device", "host", "disk") for pf in (False, True)]
        combos += [("mask-group-major", "device", tile * k, pf) for k in GROUP_TILES if tile * k < rows
                   for pf in (False, True)]
        for order, cache, group, pf in combos:
            peak, secs, bd, host = candidate_cost(
                spec, model.layers, work, machine, dtype=chosen.dtype, order=order, cache=cache, group_rows=group,
                tile_rows=tile, head_chunk=chosen.head_chunk, prefetch=pf, weights_8bit=chosen.weights_8bit,
                src_bytes=spec.dtype.itemsize)
            if peak > machine.budget or host > machine.host_ram:
                continue
            p = Plan(machine.device, chosen.dtype, order, cache, group, tile, chosen.head_chunk, pf,
                     chosen.weights_8bit, peak, secs, machine.budget, bd)
            if (order, tile) not in best or secs < best[(order, tile)].predicted_seconds:
                best[(order, tile)] = p
    others = sorted(best.values(), key=lambda p: p.predicted_seconds)
    same = lambda a, b: (a.order, a.tile_rows, a.group_rows, a.cache, a.prefetch) == (  # noqa: E731
        b.order, b.tile_rows, b.group_rows, b.cache, b.prefetch)
    return [chosen] + [p for p in others if not same(p, chosen)][: max(0, limit - 1)]


def describe_plan(p: dict) -> str:
    pf = ", prefetch" if p["prefetch"] else ""
    return f"{p['order']}, cache {p['cache']}, tile {p['tile_rows']}, group {p['group_rows']}{pf}"


# ---- docs ----------------------------------------------------------------------------------------
def write_docs(result: dict, command: str) -> None:
    """Record the run as docs/results/bench_engine-NNN.json and regenerate its block (tools/bench_docs.py)."""
    from bench_docs import write_engine_docs

    slim = {k: result[k] for k in ("hardware", "commit", "settings", "plan", "measured", "peak", "sweep")}
    slim["command"] = command
    slim["plan"] = {k: v for k, v in slim["plan"].items() if k != "breakdown"}
    slim["sweep"] = [{**x, "plan": {k: v for k, v in x["plan"].items() if k != "breakdown"}}
                     for x in slim["sweep"] or []] or None
    write_engine_docs(slim)


# ---- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a model directory (config.json + safetensors)")
    src.add_argument("--shape", choices=sorted(SHAPES), help="generate random weights of this shape on disk")
    ap.add_argument("--work-dir", default=None, help="where --shape writes its weights (kept; default: a temp dir)")
    ap.add_argument("--masks", type=int, default=8)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--memory-budget", default=None, help="e.g. 8GB (default: the device's memory / free RAM)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--allow-8bit", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on a CPU run")
    ap.add_argument("--sweep", action="store_true", help="also run other tiles and orders that fit; choice vs best")
    ap.add_argument("--sweep-max", type=int, default=6, help="plans run by --sweep, the planner's choice included")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tmp = None
    if args.shape:
        if args.work_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="bench-engine-")
        root = Path(args.work_dir or tmp.name) / args.shape
        t0 = time.perf_counter()
        model_dir = write_random_model(args.shape, root, device=device)
        gen_s = time.perf_counter() - t0
    else:
        model_dir, gen_s = Path(args.model), 0.0
    model = StreamedModel.open(model_dir)
    budget = parse_bytes(args.memory_budget) if args.memory_budget else None
    machine = detect_machine(device=device, budget=budget)
    work = Work(args.masks, args.samples, args.seq_len)
    plan = make_plan(model.spec, model.layers, work, machine, dtype=args.dtype, allow_8bit=args.allow_8bit)
    print(plan.describe(), file=sys.stderr)
    peak, peak_src = peak_flops(device, plan.dtype)
    if not args.no_warmup:  # code pages, kernels, page cache of the checkpoint, allocator pools
        masks, ids = _inputs(model, 1, 1, min(args.seq_len, 32), args.seed)
        evaluate(model, ids, masks, replace(plan, group_rows=1, tile_rows=1))
    measured = measure(model, plan, work, seed=args.seed, peak=peak)
    sweep = None
    if args.sweep:
        sweep = []
        for p in sweep_plans(model, work, machine, plan, args.sweep_max):
            print("[sweep] " + p.describe(), file=sys.stderr)
            sweep.append({"plan": p.to_json(), **measure(model, p, work, seed=args.seed, peak=peak)})
        best = min(sweep, key=lambda x: x["seconds"])
        measured["sweep_best_seconds"], measured["choice_vs_best"] = best["seconds"], sweep[0]["seconds"] / best["seconds"]
    result = {
        "tool": "bench_engine", "hardware": hardware(), "commit": commit(),
        "settings": {"model": args.shape or str(model_dir), "masks": args.masks, "samples": args.samples,
                     "seq_len": args.seq_len, "budget": machine.budget, "device": device, "dtype": plan.dtype,
                     "allow_8bit": args.allow_8bit, "seed": args.seed, "params": model.params(),
                     "weights_bytes": model.ckpt.nbytes(), "generate_seconds": gen_s},
        "plan": plan.to_json(), "peak": {"flops": peak, "source": peak_src}, "measured": measured, "sweep": sweep,
    }
    print(json.dumps(result, indent=1))
    if args.write_docs:
        argv_text = " ".join(argv if argv is not None else sys.argv[1:])
        write_docs(result, f"python tools/bench_engine.py {argv_text}")
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
