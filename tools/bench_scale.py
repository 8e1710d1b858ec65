"""Budgeted Bonsai at scale: one real prune iteration per memory budget, costed stage by stage.

For a model shape (random bf16 weights written as sharded safetensors, one shard in host memory at
a time, drawn on the GPU when there is one) this runs the library's own search loop
(`prune.run.run_pruning` with sparsity = p_iter: exactly one iteration of priors pass, mask
sampling, masked evaluation, regression and selection, run state committed as in a real run) under
each --memory-budget, and reports per stage: wall time, mask-tokens/s, model FLOPs utilisation,
peak GPU memory (torch.cuda.max_memory_reserved), peak host RSS (VmHWM), bytes read from the
checkpoint and moved to the device. The same run measures two references on the same device: the
engine with no budget (the planner's unconstrained plan) and a whole-model transformers forward
with the loss (AutoModelForCausalLM, every weight resident), and the ratio of each budget to them.
From the measured rates and the shrinking model it extrapolates the paper's full run (p 0.5,
p_iter 0.05: 10 iterations of 200 masks x 32 samples x 2048 tokens). --sweep runs, per budget, tile
sizes of both streaming orders through the engine (tools/bench_engine.py's candidate list) and
checks the planner's choice is within 15% of the best measured.

The tool prints one JSON object (hardware, commit, settings, results); --write-docs records it in
docs/PERFORMANCE.md between `<!-- bench_scale:begin -->` and `<!-- bench_scale:end -->`;
--from-json FILE re-records a JSON printed on another machine (the GPU box) without running.

  python tools/bench_scale.py --shape smollm2-135m --budgets 64MB,1GB --masks 4 --samples 2 --seq-len 64
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_engine as BE  # noqa: E402
from bonsai_lite.config import CalibConfig, RunConfig, SearchConfig  # noqa: E402
from bonsai_lite.errors import BudgetError  # noqa: E402
from bonsai_lite.io.checkpoint import INDEX_NAME  # noqa: E402
from bonsai_lite.io.model import StreamedModel  # noqa: E402
from bonsai_lite.prune import loop, ranking  # noqa: E402
from bonsai_lite.prune.run import run_pruning  # noqa: E402
from bonsai_lite.search.machine import detect_machine, fmt_bytes, parse_bytes, search_dtype  # noqa: E402
from bonsai_lite.search.pass_costs import column_norm_seconds  # noqa: E402
from bonsai_lite.search.planner import Work, flops_per_token, make_plan  # noqa: E402
from bonsai_lite.structure import load_spec  # noqa: E402

import scale_extras as SX  # noqa: E402
from random_checkpoint import SHAPES, shape_bytes, write_random_model  # noqa: E402
from bench_docs import write_scale_docs  # noqa: E402

PLANNER_TOLERANCE = 1.15  # the acceptance: choice within 15% of the best measured plan


# ---- per-stage meter ---------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        return True
    except OSError:
        return False  # then a stage's peak RSS is the process's peak so far: an over-estimate


class StageMeter:
    """Wall time, peak memory and engine counters per named stage (stages do not nest)."""

    def __init__(self, device: str, machine=None):
        self.device, self.cuda, self.machine = device, device.startswith("cuda"), machine
        self.stages: dict[str, dict] = {}
        self.current: str | None = None

    def _entry(self, name: str) -> dict:
        return self.stages.setdefault(name, dict(seconds=0.0, calls=0, peak_gpu_reserved=0, peak_rss=0, passes=0,
                                                 engine_calls=0, mask_tokens=0, flops=0.0, predicted_seconds=0.0,
                                                 bytes_read=0, bytes_to_device=0, bytes_spilled=0,
                                                 disk_read_bytes=0, scores_seconds=0.0))

    @contextmanager
    def stage(self, name: str):
        if self.current is not None:  # called from inside another stage: counted there
            yield
            return
        self.current = name
        _sync(self.device)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        _reset_rss_peak()
        disk0 = SX.disk_read_bytes() or 0
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            s = self._entry(name)
            s["seconds"] += time.perf_counter() - t0
            s["disk_read_bytes"] += (SX.disk_read_bytes() or 0) - disk0  # from storage, not the page cache
            s["calls"] += 1
            if self.cuda:
                s["peak_gpu_reserved"] = max(s["peak_gpu_reserved"], torch.cuda.max_memory_reserved())
            s["peak_rss"] = max(s["peak_rss"], BE._status_bytes("VmHWM") or 0)
            self.current = None

    def evaluated(self, model, res, plan, rows: int, tokens: int, bytes_read: int) -> None:
        s = self._entry(self.current or "other")
        s["engine_calls"] += 1
        s["passes"] += res.stats.passes
        s["mask_tokens"] += res.stats.tokens
        s["flops"] += rows * tokens * flops_per_token(model.spec, model.layers, tokens)
        s["predicted_seconds"] += plan.predicted_seconds
        s["bytes_read"] += bytes_read
        s["bytes_to_device"] += res.stats.bytes_to_device
        s["bytes_spilled"] += res.stats.bytes_spilled


@contextmanager
def instrumented(meter: StageMeter):
    """Wrap the search loop's stage functions (in the namespaces of `prune.loop` and `prune.ranking`) with the meter."""
    saved = []

    def wrap(owner, attr: str, stage: str):
        fn = getattr(owner, attr)
        saved.append((owner, attr, fn))

        @functools.wraps(fn)
        def inner(*a, **kw):
            with meter.stage(stage):
                return fn(*a, **kw)
        setattr(owner, attr, inner)

    wrap(loop.Pruner, "_priors", "priors")
    wrap(loop, "sample_masks", "sampling")
    wrap(loop.Pruner, "_evaluate_masks", "evaluate")
    wrap(ranking, "fit_relevance", "regression")
    for fn in ("greedy_drop", "uniform_drop", "apply_drop"):
        wrap(loop, fn, "selection")
    engine = loop.evaluate
    saved.append((loop, "evaluate", engine))

    def evaluate(model, tokens, masks, plan, **kw):
        before = model.ckpt.bytes_read
        res = engine(model, tokens, masks, plan, **kw)
        rows = (1 if masks is None else len(masks)) * len(tokens)
        meter.evaluated(model, res, plan, rows, tokens.shape[1], model.ckpt.bytes_read - before)
        if kw.get("on_weights") is not None and meter.machine is not None:  # FLAP's norms, taken in the pass
            meter._entry(meter.current or "other")["predicted_seconds"] += column_norm_seconds(
                model.spec, meter.machine, read=False)
        return res
    loop.evaluate = evaluate
    scores = loop.S.flap_unit_scores  # the prior's own cost inside the priors stage (it reads o/down)
    saved.append((loop.S, "flap_unit_scores", scores))

    def flap_unit_scores(model, *a, **kw):
        cols = kw.get("columns_of")
        if cols is not None and not cols.loaded and meter.machine is not None:  # the loop predicts this read
            meter._entry(meter.current or "other")["predicted_seconds"] += column_norm_seconds(model.spec, meter.machine)
        t0 = time.perf_counter()
        try:
            return scores(model, *a, **kw)
        finally:
            meter._entry(meter.current or "other")["scores_seconds"] += time.perf_counter() - t0
    loop.S.flap_unit_scores = flap_unit_scores
    try:
        yield meter
    finally:
        for owner, attr, fn in reversed(saved):
            setattr(owner, attr, fn)


def _slim(plan) -> dict:
    return {k: v for k, v in plan.to_json().items() if k != "breakdown"}


# ---- one budgeted iteration --------------------------------------------------------------------
def prune_iteration(model_dir: Path, ids: torch.Tensor, *, budget: int | None, device: str, work: Work, seed: int,
                    run_dir: Path, peak: float, dtype: str | None = None) -> dict:
    cfg = RunConfig(model=str(model_dir), out=str(run_dir / "out"),
                    calib=CalibConfig(text=None, samples=work.samples, seq_len=work.tokens),
                    search=SearchConfig(method="bonsai", sparsity=SX.PAPER["p_iter"], p_iter=SX.PAPER["p_iter"],
                                        masks_per_iter=work.masks, seed=seed),
                    budget=budget, device=device, dtype=dtype)
    parent = StreamedModel.open(model_dir)
    machine = detect_machine(device=device, budget=budget, checkpoint=model_dir)
    # The plans the loop makes (and logs) for all masks and for the priors pass; the masks are
    # evaluated in chunks of one pass of the plan each, with the run state committed in between.
    plan = make_plan(parent.spec, parent.layers, work, machine, dtype=dtype)
    priors_plan = make_plan(parent.spec, parent.layers, Work(1, work.samples, work.tokens), machine, dtype=dtype)
    meter = StageMeter(device, machine)
    BE._reset_peak(device)  # empties the CUDA cache: each budget starts from nothing reserved
    rss0 = BE._status_bytes("VmRSS") or 0
    t0 = time.perf_counter()
    with instrumented(meter):
        outcome = run_pruning(cfg, ids=ids, run_dir=run_dir, restart=True)
    _sync(device)
    seconds = time.perf_counter() - t0
    end_rss = BE._status_bytes("VmHWM") or 0
    end_gpu = torch.cuda.max_memory_reserved() if device.startswith("cuda") else 0
    stages = meter.stages
    for s in stages.values():
        s["mask_tokens_per_s"] = s["mask_tokens"] / s["seconds"] if s["mask_tokens"] else None
        s["flops_per_s"] = s["flops"] / s["seconds"] if s["flops"] else None
        s["mfu"] = s["flops_per_s"] / peak if s["flops"] else None
    ev = stages["evaluate"]
    info = outcome.history[-1]
    return {
        "budget": budget, "seconds": seconds, "other_seconds": seconds - sum(s["seconds"] for s in stages.values()),
        "plan": _slim(plan), "priors_plan": _slim(priors_plan), "stages": stages,
        "mask_tokens_per_s": ev["mask_tokens_per_s"], "flops_per_s": ev["flops_per_s"], "mfu": ev["mfu"],
        "peak_gpu_reserved": max([end_gpu] + [s["peak_gpu_reserved"] for s in stages.values()]),
        "peak_rss": max([end_rss] + [s["peak_rss"] for s in stages.values()]),
        "rss_at_start": rss0,  # peak_rss - rss_at_start is what a CPU --memory-budget bounds
        "bytes_read": sum(s["bytes_read"] for s in stages.values()),
        "bytes_to_device": sum(s["bytes_to_device"] for s in stages.values()),
        "removed_units": info.get("removed_units"), "cv_kendall_tau": info.get("cv_kendall_tau"),
        "layers": outcome.layers,
    }


# ---- references: no budget -----------------------------------------------------------------------
def engine_unbudgeted(model: StreamedModel, work: Work, device: str, seed: int, peak: float,
                      checkpoint: Path | None = None, dtype: str | None = None) -> dict:
    machine = detect_machine(device=device, budget=None, checkpoint=checkpoint)
    plan = make_plan(model.spec, model.layers, work, machine, dtype=dtype)
    return {**BE.measure(model, plan, work, seed=seed, peak=peak), "plan": _slim(plan)}


def hf_forward(model_dir: Path, *, device: str, dtype: str, batch: int, seq_len: int, batches: int, seed: int,
               peak: float) -> dict:
    """Whole-model transformers forward with the loss (every weight resident), `batches` x [batch, T]."""
    from transformers import AutoModelForCausalLM

    cuda = device.startswith("cuda")
    BE._reset_peak(device)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype),
                                                 **({"device_map": device} if cuda else {})).eval()
    load_s = time.perf_counter() - t0
    spec = load_spec(model_dir)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, spec.vocab, (batch, seq_len), generator=g).to(device)
    with torch.no_grad():
        model(ids, labels=ids)  # warm-up: kernels, allocator pools
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(batches):
            loss = model(ids, labels=ids).loss
        float(loss)
        _sync(device)
    seconds = time.perf_counter() - t0
    peak_mem = torch.cuda.max_memory_reserved() if cuda else BE._status_bytes("VmHWM") or 0
    del model, loss
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    flops = batches * batch * seq_len * flops_per_token(spec, spec.layers, seq_len)
    tokens = batches * batch * (seq_len - 1)
    return {"seconds": seconds, "load_seconds": load_s, "rows": batches * batch, "mask_tokens_per_s": tokens / seconds,
            "flops_per_s": flops / seconds, "mfu": flops / seconds / peak, "peak_bytes": peak_mem, "dtype": dtype}


# ---- planner check -------------------------------------------------------------------------------
def sweep(model: StreamedModel, work: Work, device: str, budget: int | None, *, per_order: int, max_predicted: float,
          seed: int, peak: float, deadline: float, checkpoint: Path | None = None, dtype: str | None = None) -> dict:
    """The planner's choice and, per streaming order, its fastest predicted tile plus tiles spread
    over the others that fit, all measured. Candidates predicted slower than `max_predicted` x the
    choice are left out (on an 8B model they are minutes each: many passes re-reading 16 GB).
    `checkpoint` and `dtype`: plan as the prune iteration does, with the checkpoint's page-cache share,
    its disk rate and the run's compute dtype (without them every plan was priced as read cold and,
    on a CPU, in the planner's own dtype: the H200's 12 GB sweep checked a choice the prune itself
    did not make)."""
    machine = detect_machine(device=device, budget=budget, checkpoint=checkpoint)
    chosen = make_plan(model.spec, model.layers, work, machine, dtype=dtype)
    cands = [p for p in BE.sweep_plans(model, work, machine, chosen, 10**6)[1:]
             if p.predicted_seconds <= max_predicted * chosen.predicted_seconds]
    picked = [chosen]
    for order in ("mask-group-major", "layer-major"):
        mine = sorted((p for p in cands if p.order == order), key=lambda p: p.tile_rows)
        if not mine or per_order < 1:
            continue
        sel = [min(mine, key=lambda p: p.predicted_seconds)]
        n = len(mine) - 1
        for k in range(per_order if per_order > 1 else 0):  # evenly over the tile sizes, ends included
            p = mine[round(k * n / (per_order - 1))]
            if all(p is not q for q in sel):  # Plan holds a dict: not hashable
                sel.append(p)
        picked += sorted(sel[:per_order], key=lambda p: p.tile_rows)
    runs, skipped = [], 0
    for p in picked:
        if runs and time.perf_counter() > deadline:
            skipped += 1
            continue
        print("[sweep] " + p.describe(), file=sys.stderr)
        runs.append({"plan": _slim(p), **BE.measure(model, p, work, seed=seed, peak=peak)})
    best = min(x["seconds"] for x in runs)
    ratio = runs[0]["seconds"] / best
    return {"runs": runs, "skipped_for_deadline": skipped, "best_seconds": best, "choice_vs_best": ratio,
            "within_tolerance": ratio <= PLANNER_TOLERANCE if len(runs) > 1 else None}


# ---- main ----------------------------------------------------------------------------------------
def run(args) -> dict:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    deadline = time.perf_counter() + (args.deadline or math.inf)
    tmp = tempfile.TemporaryDirectory(prefix="bench-scale-") if args.work_dir is None else None
    work_dir = Path(args.work_dir or tmp.name)
    model_dir = work_dir / args.shape
    created = not (model_dir / INDEX_NAME).is_file()  # never delete a checkpoint this run did not write
    if created:
        need = SX.disk_needed(shape_bytes(args.shape), export=args.export, accelerate=args.accelerate)
        SX.check_disk(work_dir, need)
        print(f"[generate] {args.shape}: {fmt_bytes(shape_bytes(args.shape))} of random bf16 weights in {model_dir} "
              f"(the run needs {fmt_bytes(need)} free)", file=sys.stderr)
    t0 = time.perf_counter()
    write_random_model(args.shape, model_dir, device=device, seed=args.seed)
    gen_s = time.perf_counter() - t0
    try:
        if not args.hold_ram:
            return _run(args, device, deadline, work_dir, model_dir, gen_s)
        with SX.hold_ram(parse_bytes(args.hold_ram)) as held:  # after generating: that needs the RAM
            result = _run(args, device, deadline, work_dir, model_dir, gen_s)
        return {**result, "held_ram": held}
    finally:
        if tmp is not None:
            tmp.cleanup()
        elif created and not args.keep:
            shutil.rmtree(model_dir, ignore_errors=True)


def _run(args, device: str, deadline: float, work_dir: Path, model_dir: Path, gen_s: float) -> dict:
    model = StreamedModel.open(model_dir)
    work = Work(args.masks, args.samples, args.seq_len)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, model.spec.vocab, (2 * args.samples * args.seq_len,), generator=g)
    budgets = [parse_bytes(b) for b in args.budgets.split(",")] if args.budgets else [None]
    unbounded = detect_machine(device=device, budget=None, checkpoint=model_dir)
    # --dtype auto: what `bonsai-lite prune` computes in here (bf16 on an AMX CPU for a 7-8B model)
    dtype = (search_dtype(unbounded, model.spec) if args.dtype == "auto" else args.dtype) or \
        make_plan(model.spec, model.layers, work, unbounded).dtype
    # MFU yardstick: on a CPU the measured fp32 GEMM rate (issue 12's), on a GPU its dense bf16 figure
    peak, peak_src = BE.peak_flops(device, "bfloat16" if device.startswith("cuda") else "float32")
    compute_peak = BE.peak_flops(device, dtype) if dtype != "float32" else (peak, peak_src)
    masks, wids = BE._inputs(model, 1, 1, min(args.seq_len, 32), args.seed)  # warm-up: kernels, page cache
    loop.evaluate(model, wids, masks, make_plan(model.spec, model.layers, Work(1, 1, wids.shape[1]), unbounded))
    reg_s = SX.paper_regression_seconds(model, args.seed) if args.paper_regression else None
    runs = []
    for budget in budgets:
        if args.hold_ram:
            SX.start_cold(model_dir, args.cold_start)  # each budget starts cold, as on a machine that could not cache it
        if runs and time.perf_counter() > deadline:
            runs.append({"budget": budget, "error": "skipped: --deadline passed"})
            continue
        print(f"[budget] {fmt_bytes(budget) if budget else 'none'}", file=sys.stderr)
        try:
            r = prune_iteration(model_dir, ids, budget=budget, device=device, work=work, seed=args.seed,
                                run_dir=work_dir / f"run-{args.shape}", peak=peak, dtype=dtype)
        except BudgetError as e:  # the budget is below the planner's minimum: a result, not a crash
            runs.append({"budget": budget, "error": str(e)})
            continue
        layers = r.pop("layers")
        rows = ids[: args.samples * args.seq_len].view(args.samples, args.seq_len)
        if args.export:  # exported once (first budget), evaluated under every budget
            export_dir = work_dir / f"export-{args.shape}"
            if not any("export" in x for x in runs):
                r["export"] = SX.export_model(model_dir, layers, export_dir)
            r["export_eval"] = SX.eval_export(export_dir, budget=budget, ids=rows, device=device)
        if args.accelerate and budget:
            print(f"[accelerate] offloaded transformers at {fmt_bytes(budget)}", file=sys.stderr)
            try:
                r["accelerate"] = SX.accelerate_forward(model_dir, budget=budget, dtype=dtype, ids=rows, device=device,
                                                        cold=model_dir if args.hold_ram else None, cold_start=args.cold_start)
            except Exception as e:  # noqa: BLE001  # a third-party failure is a result; it must not lose ours
                r["accelerate"] = {"error": f"{e.__class__.__name__}: {str(e)[:300]}"}
        r["extrapolation"] = SX.extrapolate(model, r, work, device=device, regression_s=reg_s)
        r["preset_extrapolation"] = SX.preset_extrapolation(model, r, shrink=SX.shrunk, gemm_flops=peak,
                                                            cores=BE.hardware()["cores"])
        runs.append(r)
    ok = [r for r in runs if "error" not in r]
    reference = None
    if not args.no_reference and time.perf_counter() < deadline:
        reference = {"engine": engine_unbudgeted(model, work, device, args.seed, peak, checkpoint=model_dir,
                                                       dtype=dtype)}
        try:
            reference["transformers"] = hf_forward(model_dir, device=device, dtype=dtype, batch=args.samples,
                                                   seq_len=args.seq_len, batches=args.ref_batches, seed=args.seed,
                                                   peak=peak)
        except (RuntimeError, ValueError, OSError) as e:  # e.g. out of memory: report, keep the rest
            reference["transformers"] = {"error": f"{e.__class__.__name__}: {str(e)[:300]}"}
        for r in ok:
            r["vs_reference"] = {k: r["mask_tokens_per_s"] / v["mask_tokens_per_s"]
                                 for k, v in reference.items() if v.get("mask_tokens_per_s")}
    if args.export and not args.keep:
        shutil.rmtree(work_dir / f"export-{args.shape}", ignore_errors=True)
    for r in ok if args.sweep else []:
        if time.perf_counter() > deadline:
            r["sweep"] = None
            continue
        r["sweep"] = sweep(model, work, device, r["budget"], per_order=args.sweep_per_order,
                           max_predicted=args.sweep_max_predicted, seed=args.seed, peak=peak, deadline=deadline,
                           checkpoint=model_dir, dtype=dtype)
    return {
        "tool": "bench_scale", "hardware": BE.hardware(), "commit": BE.commit(),
        "settings": {"model": args.shape, "masks": args.masks, "samples": args.samples, "seq_len": args.seq_len,
                     "device": device, "dtype": dtype, "seed": args.seed, "params": model.params(),
                     "weights_bytes": model.ckpt.nbytes(), "generate_seconds": gen_s,
                     "cold_read_bps": unbounded.disk_bps, "cold_start": args.cold_start if args.hold_ram else None,
                     "planned_flops_per_s": unbounded.flops,
                     "bf16_factor": unbounded.bf16_factor, "fresh_page_bps": unbounded.fresh_page_bps,
                     "paper_regression_seconds": reg_s},
        "peak": {"flops": peak, "source": peak_src},
        "compute_peak": {"flops": compute_peak[0], "source": compute_peak[1]}, "runs": runs, "reference": reference,
        "load_average": os.getloadavg(),
    }


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--work-dir", default=None, help="where the random checkpoint is written and kept (default: temp)")
    ap.add_argument("--budgets", default="8GB,12GB,24GB", help="comma-separated memory budgets ('' = none)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="compute dtype of the search; auto: what bonsai-lite prune picks here (machine.search_dtype)")
    ap.add_argument("--masks", type=int, default=32)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on a CPU run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--export", action="store_true",
                    help="export the pruned model (first budget), load its config, evaluate it under every budget")
    ap.add_argument("--accelerate", action="store_true",
                    help="per budget: transformers + accelerate offload (max_memory = budget, offload_folder) on the "
                         "same rows, for comparison")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint and export in --work-dir")
    ap.add_argument("--hold-ram", default=None, metavar="SIZE",
                    help="emulate a machine with SIZE less RAM (a child keeps it resident) and start each run with "
                         "the checkpoint out of the page cache: the case of a checkpoint the page cache cannot hold")
    ap.add_argument("--records", action="store_true", help="write one kind=scale JSON record per budget to docs/results")
    ap.add_argument("--record-tag", default="", metavar="TAG",
                    help="appended to the records' file names (e.g. idle); an existing record is never replaced")
    ap.add_argument("--sweep", action="store_true", help="per budget: tiles x both orders measured; choice vs best")
    ap.add_argument("--sweep-per-order", type=int, default=3, help="tile sizes measured per streaming order")
    ap.add_argument("--sweep-max-predicted", type=float, default=3.0,
                    help="leave out sweep candidates predicted slower than this x the planner's choice")
    ap.add_argument("--cold-start", choices=SX.COLD_STARTS, default="stream",
                    help="with --hold-ram, how each budget's run and accelerate's forward start cold: stream "
                         "(default: drop the checkpoint's pages, then read it once through the page cache, the "
                         "state a machine that cannot cache it is in) or drop (only drop them: on a VM with a "
                         "memory balloon the pass then computes into just-freed memory, 4-11x slower; records "
                         "before the thirty-first session used it; see scale_extras.start_cold)")
    ap.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                    help="start no new budget, reference or sweep run after this long (fits a device time limit)")
    ap.add_argument("--no-reference", action="store_true", help="skip the unbudgeted references")
    ap.add_argument("--ref-batches", type=int, default=2, help="timed transformers forwards of [samples, seq-len]")
    ap.add_argument("--no-paper-regression", dest="paper_regression", action="store_false",
                    help="skip timing the regression at the paper's 200 masks")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--from-json", nargs="+", default=None, metavar="FILE",
                    help="record results printed by earlier runs (e.g. on a GPU machine) instead of running")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | list:
    args = parse_args(argv)
    if args.from_json:
        results = [json.loads(Path(f).read_text()) for f in args.from_json]
        for res in results:
            if args.records:  # a run printed on another machine (the GPU box), recorded here
                for path in SX.write_records(SX.records(res), extra=args.record_tag):
                    print(f"[records] {path}", file=sys.stderr)
            if args.write_docs:
                write_scale_docs(res)
        return results
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    result["command"] = "python tools/bench_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(json.dumps(result, indent=1, default=str))
    if args.records:
        for path in SX.write_records(SX.records(result), extra=args.record_tag):
            print(f"[records] {path}", file=sys.stderr)
    if args.write_docs:
        write_scale_docs(result)
    return result


if __name__ == "__main__":
    main()
