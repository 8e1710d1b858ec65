"""bench_scale's comparisons and records: what a user would otherwise do (accelerate's offloaded
transformers model at the same budget), the pruned export evaluated under the same budget, the
full-prune extrapolations (the paper's run and each preset), and one `kind: "scale"` JSON record
per budget.

Kept apart from bench_scale.py, which measures the prune iteration itself.
"""
from __future__ import annotations

import gc
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import bench_engine as BE
from bonsai_lite.config import PRESETS
from bonsai_lite.errors import BudgetError
from bonsai_lite.io.model import StreamedModel
from bonsai_lite.search.engine import evaluate
from bonsai_lite.search.machine import detect_machine, fmt_bytes
from bonsai_lite.search.planner import Work, flops_per_token, make_plan
from bonsai_lite.search.regression import fit_relevance
from bonsai_lite.search.sampling import sample_masks
from bonsai_lite.structure import LayerStructure, UnitLayout

ROOT = Path(__file__).resolve().parents[1]
PAPER = dict(sparsity=0.5, p_iter=0.05, masks=200, samples=32, seq_len=2048)  # appendix A.2
RESULTS = ROOT / "docs" / "results"
# An 8-core laptop is not measured here: its estimate scales this machine's measured GEMM rate per
# core by 8 cores (laptop cores boost less under all-core load, so this errs short).
LAPTOP_CORES = 8
# Free disk the run needs beyond the checkpoint: the export (at most the parent's size) plus room
# for spilled activations and the offload folder of the accelerate reference (the model in fp32).
EXPORT_FACTOR, OFFLOAD_FACTOR = 1.0, 2.0


def disk_needed(weights_bytes: int, *, export: bool, accelerate: bool) -> int:
    return int(weights_bytes * (1 + (EXPORT_FACTOR if export else 0) + (OFFLOAD_FACTOR if accelerate else 0)))


def emit(record: dict, path: Path | None) -> dict:
    """Print a tool's record as one JSON line; also write it (indented) to `path` when given."""
    print(json.dumps(record))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"recorded {path}", file=sys.stderr)
    return record


def check_disk(path: Path, need: int) -> None:
    """Refuse before writing anything when the disk cannot hold the run (one line, with the figures)."""
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if free < need:
        raise SystemExit(f"bench_scale: {path} has {fmt_bytes(free)} free, the run needs {fmt_bytes(need)} "
                         f"(checkpoint, export, offload); pass --work-dir on a larger disk")


def disk_read_bytes() -> int | None:
    """Bytes this process (all its threads) made the kernel fetch from storage: page-cache hits are
    not counted, mmap page-ins are (psutil's read of /proc/self/io `read_bytes`)."""
    import psutil

    try:
        return psutil.Process().io_counters().read_bytes
    except (AttributeError, psutil.Error):  # no per-process I/O accounting on this OS
        return None


def mem_available() -> int:
    import psutil

    return psutil.virtual_memory().available


def drop_from_page_cache(model_dir: Path) -> None:
    """Ask the kernel to drop the checkpoint's clean pages from the page cache (no root needed), so
    a run starts cold instead of from what the previous run left there."""
    for f in (f for f in Path(model_dir).rglob("*") if f.is_file()):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


COLD_STARTS = ("drop", "stream")


def start_cold(model_dir: Path, how: str, *also: Path) -> None:
    """Make the next pass find the checkpoint out of the page cache. "drop": drop its pages (and
    those of `also`). "stream": then read every file of the checkpoint once through the page cache,
    the state a pass over a checkpoint the page cache cannot hold leaves: its tail cached, the rest
    recycled by the kernel, no large pool of free memory. On a VM whose balloon hands free memory
    back to its host, a dense pass that read into such a pool right after a drop computed 3-7x
    slower than one reading into recycled pages (tools/bench_cold.py, docs/PERFORMANCE.md)."""
    for d in (model_dir, *also):
        drop_from_page_cache(d)
    if how == "stream":
        view = memoryview(bytearray(64 * 2**20))
        for f in sorted(Path(model_dir).glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(view):
                    pass


_HOLDER = """
import os, sys, numpy
with open("/proc/self/oom_score_adj", "w") as f:
    f.write("1000")  # under memory pressure the kernel kills this, never the benchmark
a = numpy.ones(int(sys.argv[1]), dtype=numpy.uint8)  # every page written: resident (there is no swap)
print("ready", flush=True)
sys.stdin.read()
"""


@contextmanager
def hold_ram(nbytes: int):
    """Emulate a machine with `nbytes` less RAM: a child process keeps that much anonymous memory
    resident, so the page cache cannot hold what it otherwise would (issue 12's case of a budget and
    a checkpoint that do not both fit). Yields a dict that says at exit whether the hold survived."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(nbytes)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise SystemExit(f"bench_scale: could not hold {fmt_bytes(nbytes)} of RAM (--hold-ram); lower it")
    state = {"held_bytes": nbytes, "mem_available_bytes": mem_available(), "pid": proc.pid}
    try:
        yield state
    finally:
        state["held_to_the_end"] = proc.poll() is None  # killed by the OOM killer: the emulation broke
        proc.stdin.close()
        proc.wait(timeout=60)


def _rss_growth_since(rss0: int) -> int:
    return max(0, (BE._status_bytes("VmHWM") or 0) - rss0)


def accelerate_forward(model_dir: Path, *, budget: int, dtype: str, ids: torch.Tensor, cold: Path | None = None,
                       cold_start: str = "stream", device: str = "cpu") -> dict:
    """What people use today for a model that does not fit: transformers + accelerate with
    `device_map="auto"`, `max_memory` at the budget (GPU memory on CUDA, the rest in host RAM; RAM on
    a CPU) and the rest offloaded to an `offload_folder`. One forward with the loss over `ids`
    [rows, T] (after a one-row warm-up): tokens/s, RSS growth, and on CUDA the peak GPU memory
    reserved (accelerate budgets the weights only: activations and logits come on top).
    `cold`: the checkpoint folder, out of the page cache (with the offload folder) before the timed
    forward, as `start_cold(cold_start)` leaves it."""
    from transformers import AutoModelForCausalLM

    cuda = device.startswith("cuda")
    if cuda:
        index = torch.device(device).index or 0
        max_memory = {index: budget, "cpu": int(mem_available() * 0.8)}
        ids = ids.to(device)
    else:
        max_memory = {"cpu": budget}
    rss0 = BE._reset_peak("cpu")
    offload = tempfile.mkdtemp(prefix="bench-accelerate-offload-", dir=model_dir.parent)
    try:
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=getattr(torch, dtype), device_map="auto", max_memory=max_memory,
            offload_folder=offload).eval()
        load_s = time.perf_counter() - t0
        placed = sorted(set(map(str, getattr(model, "hf_device_map", {}).values())))
        with torch.no_grad():
            model(ids[:1, :8])  # warm-up: offload hooks, kernels
            if cold is not None:
                start_cold(cold, cold_start, Path(offload))
            if cuda:
                BE._reset_peak(device)
            disk0 = disk_read_bytes()
            t0 = time.perf_counter()
            loss = float(model(ids, labels=ids).loss)  # float(): waits for the GPU
        seconds = time.perf_counter() - t0
        disk = disk_read_bytes() - disk0 if disk0 is not None else None
        growth = _rss_growth_since(rss0)
        peak_gpu = torch.cuda.max_memory_reserved() if cuda else None
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    finally:
        shutil.rmtree(offload, ignore_errors=True)
    tokens = ids.shape[0] * (ids.shape[1] - 1)
    return {"seconds": seconds, "load_seconds": load_s, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "loss": loss, "peak_rss_growth_bytes": growth, "peak_gpu_bytes": peak_gpu, "budget_bytes": budget,
            "dtype": dtype, "placement": placed, "disk_read_bytes": disk}


def export_model(model_dir: Path, layers, out: Path) -> dict:
    """Export the pruned model shard by shard and load its config with transformers."""
    from transformers import AutoConfig

    from bonsai_lite.export import export_pruned

    t0 = time.perf_counter()
    res = export_pruned(model_dir, layers, out, overwrite=True)
    seconds = time.perf_counter() - t0
    # Our own export: the shipped modeling file is the one this checkout wrote, hence trusted here.
    cfg = AutoConfig.from_pretrained(str(out), trust_remote_code=True)
    return {"seconds": seconds, "bytes": res.bytes, "bytes_per_s": res.bytes / seconds,
            "config_class": type(cfg).__name__}


def eval_export(out: Path, *, budget: int | None, ids: torch.Tensor, device: str) -> dict:
    """The exported model through the streamed engine under the same budget (RSS growth measured
    from the same point as the prune's)."""
    rss0 = BE._reset_peak(device)
    model = StreamedModel.open(out)
    machine = detect_machine(device=device, budget=budget)
    plan = make_plan(model.spec, model.layers, Work(1, ids.shape[0], ids.shape[1]), machine)
    t0 = time.perf_counter()
    r = evaluate(model, ids, None, plan)
    seconds = time.perf_counter() - t0
    return {"params": model.params(), "eval_seconds": seconds, "eval_nll": r.row_nll[0].mean().item(),
            "eval_peak_rss_growth_bytes": _rss_growth_since(rss0) if device == "cpu" else None,
            "eval_plan": plan.describe()}


def preset_extrapolation(model: StreamedModel, run: dict, *, shrink, gemm_flops: float, cores: int,
                         sparsity: float = 0.5) -> dict:
    """Wall time of a full prune to `sparsity` per preset, from this budget's measured FLOP/s in the
    priors pass and the masked evaluation (the model shrinking by p_iter each iteration); the
    regression and bookkeeping as measured here, per iteration. An estimate: larger work amortises
    weight reads better than the small iteration measured, so this errs long."""
    st = run["stages"]
    per_iter_fixed = sum(st[k]["seconds"] for k in ("sampling", "regression", "selection") if k in st)
    per_iter_fixed += run["other_seconds"]
    out = {}
    for name, p in PRESETS.items():
        n_iter = math.ceil(sparsity / p["p_iter"] - 1e-9)
        t = p["seq_len"]
        total = 0.0
        for i in range(n_iter):
            fpt = flops_per_token(model.spec, shrink(model.layers, 1.0 - p["p_iter"] * i), t)
            prior_tokens = (p.get("prior_samples") or p["samples"]) * (p.get("prior_seq_len") or t)
            total += prior_tokens * fpt / st["priors"]["flops_per_s"]
            total += p["masks_per_iter"] * p["samples"] * t * fpt / st["evaluate"]["flops_per_s"]
            total += per_iter_fixed
        laptop = total * cores / LAPTOP_CORES  # compute-bound: scales with the cores' GEMM rate
        out[name] = {"iterations": n_iter, "settings": p, "seconds_here": total,
                     "seconds_8_core_laptop_estimate": laptop}
    return {"sparsity": sparsity, "gemm_flops_per_s": gemm_flops, "presets": out}


STAGE_FIELDS = ("seconds", "predicted_seconds", "mask_tokens", "flops_per_s", "bytes_read", "disk_read_bytes",
                "peak_rss", "scores_seconds")


def records(result: dict) -> list[dict]:
    """One `kind: "scale"` record per budget that ran, with the fields the docs table reads."""
    s, out = result["settings"], []
    for r in result["runs"]:
        if "error" in r:
            continue
        ev, pri = r["stages"]["evaluate"], r["stages"]["priors"]
        acc = r.get("accelerate") or {}
        predicted = ev["predicted_seconds"] + pri["predicted_seconds"]
        measured = ev["seconds"] + pri["seconds"]
        out.append({
            "kind": "scale", "shape": s["model"], "device": s["device"], "budget_bytes": r["budget"],
            "peak_rss_growth_bytes": r["peak_rss"] - r["rss_at_start"] if s["device"] == "cpu" else None,
            "peak_gpu_bytes": r["peak_gpu_reserved"] if s["device"] != "cpu" else None,
            "seconds": r["seconds"], "engine_seconds": measured, "predicted_seconds": predicted,
            "predicted_over_measured": predicted / measured if measured else None,
            "tokens_per_s": r["mask_tokens_per_s"], "eval_flops_per_s": r["flops_per_s"],
            "gemm_flops_per_s": result["peak"]["flops"], "gemm_fraction": r["mfu"],
            "compute_gemm_flops_per_s": (result.get("compute_peak") or result["peak"])["flops"],
            "accelerate_tokens_per_s": acc.get("tokens_per_s"),
            "accelerate_peak_rss_growth_bytes": acc.get("peak_rss_growth_bytes"),
            "accelerate_peak_gpu_bytes": acc.get("peak_gpu_bytes"),
            "accelerate_error": acc.get("error"),
            "speedup_vs_accelerate": (r["mask_tokens_per_s"] / acc["tokens_per_s"]) if acc.get("tokens_per_s") else None,
            "accelerate_disk_read_bytes": acc.get("disk_read_bytes"),
            "held_ram": result.get("held_ram"), "disk_read_bytes": sum(v.get("disk_read_bytes") or 0 for v in r["stages"].values()),
            "bytes_read": r["bytes_read"],
            "stages": {k: {kk: v.get(kk) for kk in STAGE_FIELDS} for k, v in r["stages"].items()},
            "export": {**(r.get("export") or {}), **(r.get("export_eval") or {})} or None, "extrapolation": r.get("preset_extrapolation"),
            "masks": s["masks"], "samples": s["samples"], "seq_len": s["seq_len"], "dtype": s["dtype"],
            "threads": result["hardware"]["threads"], "load_average": result.get("load_average"),
            "cold_read_bps": s.get("cold_read_bps"), "cold_start": s.get("cold_start"), "planned_flops_per_s": s.get("planned_flops_per_s"),
            "bf16_factor": s.get("bf16_factor"), "fresh_page_bps": s.get("fresh_page_bps"),
            "commit": result["commit"], "hardware": result["hardware"], "command": result.get("command"),
        })
    return out


def write_records(recs: list[dict], directory: Path = RESULTS, *, extra: str = "") -> list[Path]:
    """One file per record, named by its settings (and `extra`); an existing record is never replaced:
    the new one takes the next free `-2`, `-3`... name."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in recs:
        budget = fmt_bytes(r["budget_bytes"]).replace(" ", "") if r["budget_bytes"] else "unbudgeted"
        tag = "" if r.get("dtype") in (None, "float32") else f"-{r['dtype']}"
        if (r.get("masks"), r.get("samples")) not in ((8, 1), (None, None)):  # not the example work
            tag += f"-{r['masks']}x{r['samples']}x{r['seq_len']}"
        if r.get("held_ram"):  # a smaller machine emulated: the page cache cannot hold the checkpoint
            tag += f"-hold{fmt_bytes(r['held_ram']['held_bytes']).replace(' ', '')}"
        if r.get("cold_start") not in (None, "drop"):
            tag += f"-{r['cold_start']}"
        stem = f"scale-{r['shape']}-{r['device']}-{budget}{tag}{'-' + extra if extra else ''}"
        p, n = directory / f"{stem}.json", 1
        while p.exists():
            n += 1
            p = directory / f"{stem}-{n}.json"
        tmp = p.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(r, indent=1, default=str) + "\n")
        tmp.rename(p)
        paths.append(p)
    return paths


# ---- extrapolation to the paper's run ----------------------------------------------------------
def shrunk(layers, frac: float) -> tuple[LayerStructure, ...]:
    """Every layer cut to `frac` of its heads and MLP units (the model after i iterations, uniformly)."""
    out = []
    for s in layers:
        h, m = max(1, round(frac * len(s.heads))), max(1, round(frac * len(s.mlp)))
        out.append(LayerStructure(s.heads[:h], s.kv_of_head[:h], s.mlp[:m]))
    return tuple(out)


def paper_regression_seconds(model: StreamedModel, seed: int) -> float:
    """fit_relevance at the paper's 200 masks over the parent's units, on a planted linear problem."""
    layout = UnitLayout.of(model.layers)
    g = torch.Generator().manual_seed(seed)
    prior = torch.rand(layout.total, generator=g, dtype=torch.float64) + 0.1
    masks = sample_masks(prior, groups=layout.groups(), p_iter=PAPER["p_iter"], n_masks=PAPER["masks"],
                         generator=g).masks
    losses = 5.0 - masks.double() @ (torch.rand(layout.total, generator=g, dtype=torch.float64) * 1e-3)
    losses += 1e-3 * torch.randn(len(losses), generator=g, dtype=torch.float64)
    t0 = time.perf_counter()
    fit_relevance(masks, losses, seed=seed)
    return time.perf_counter() - t0


def extrapolate(model: StreamedModel, r: dict, work: Work, *, device: str, regression_s: float | None) -> dict:
    """The paper's 10 iterations from this budget's measured rates and the shrinking model.

    Iteration i has (1 - 0.05 i) of the heads and MLP units; its priors pass and masked evaluation
    cost their tokens x FLOPs per token over the FLOP/s this budget reached in those stages
    (rates measured at the smaller work here: the paper's work has more rows per pass, so weight
    traffic is amortised better and this errs long). The regression is the one timed at 200 masks
    when `regression_s` is given, else this run's scaled by masks; both scaled by the unit count.
    A second estimate runs the planner on each iteration's shape and scales its prediction by
    measured / predicted of this budget's evaluation (None when a paper-sized pass does not fit).
    """
    st, p = r["stages"], PAPER
    spec, t = model.spec, p["seq_len"]
    n_iter = math.ceil(p["sparsity"] / p["p_iter"] - 1e-9)
    machine = detect_machine(device=device, budget=r["budget"])
    ev = st["evaluate"]
    plan_ratio = ev["seconds"] / ev["predicted_seconds"] if ev["predicted_seconds"] > 0 else None
    fixed = sum(st[k]["seconds"] for k in ("sampling", "selection") if k in st) + r["other_seconds"]
    total, planned, rows = 0.0, (0.0 if plan_ratio else None), []
    for i in range(n_iter):
        frac = 1.0 - p["p_iter"] * i
        layers = shrunk(model.layers, frac)
        fpt = flops_per_token(spec, layers, t)
        pri = p["samples"] * t * fpt / st["priors"]["flops_per_s"]
        evs = p["masks"] * p["samples"] * t * fpt / ev["flops_per_s"]
        reg = regression_s if regression_s is not None else st["regression"]["seconds"] * p["masks"] / work.masks
        reg *= frac
        total += pri + evs + reg + fixed
        row = {"iteration": i, "fraction": frac, "priors_s": pri, "evaluate_s": evs, "regression_s": reg}
        if planned is not None:
            try:
                pe = make_plan(spec, layers, Work(p["masks"], p["samples"], t), machine).predicted_seconds
                pp = make_plan(spec, layers, Work(1, p["samples"], t), machine).predicted_seconds
            except BudgetError:
                planned = None
            else:
                row["planner_s"] = (pe + pp) * plan_ratio
                planned += row["planner_s"] + reg + fixed
        rows.append(row)
    return {"setting": p, "iterations": n_iter, "seconds": total, "planner_scaled_seconds": planned,
            "regression_measured_at_200": regression_s is not None, "per_iteration": rows}
