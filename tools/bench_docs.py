"""docs/PERFORMANCE.md from the JSON records in docs/results/; plots in docs/img/.

`python tools/bench_docs.py` regenerates every generated block of docs/PERFORMANCE.md (the text
between `<!-- TOOL:begin -->` and `<!-- TOOL:end -->`) and the plots from the records alone, so a
table can never disagree with its data. Each record is one file, `docs/results/TOOL-NNN.json`
(`{"tool": ..., record fields}`); a benchmark run with --write-docs (or --from-json, for results
printed on another machine) adds a record, or replaces the one of the same hardware and setting,
then regenerates its block. No JSON lives in the markdown. Plots need matplotlib (the `plots`
extra); without it the tables are still written.
"""
from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import bench_engine as BE
import scale_docs as SD
from bonsai_lite.search.machine import fmt_bytes

STAGES = ("priors", "sampling", "evaluate", "regression", "selection")

DOCS = BE.DOCS
RESULTS = BE.ROOT / "docs" / "results"
IMG = BE.ROOT / "docs" / "img"
GPU_HOWTO = """### How to run on a GPU

`tools/gpu_session.sh` is the whole GPU half as one command for a lent machine (one 10-minute
command, 15 minutes of device time in all, a bare machine per call): each step has its own time
limit and writes JSON and a log under $OUT. On the H200 the steps took: `tests` 23-26 s, `scale`
156 s (8 and 24 GB, export, accelerate, references; the 15 GiB checkpoint is generated in 13 s),
`sweep` 183 s (8 and 12 GB with the planner sweep), `infer` 95-150 s (parent and 50% variants).
bitsandbytes and gguf travel unpacked in `.whl/site` (ignored by git; `pip install --no-deps
--target .whl/site` of their wheels here, then delete the CUDA builds the GPU does not need):

```
bash tools/gpu_session.sh tests,scale,infer        # run with carry: [".whl"]
bash tools/gpu_session.sh tests,sweep,infer        # a second call
# then here, with FILES = the run tool's files_at folder:
python tools/bench_scale.py --from-json FILES/scale.json FILES/sweep.json --records --record-tag TAG --write-docs
python tools/bench_infer.py --from-json FILES/infer.json --write-docs
python tools/bench_docs.py
```

The device's copy of the checkout can carry an older commit in its git metadata (the H200 runs
printed the session's starting commit plus `+dirty`): commit before each call and correct the
`commit` field of the JSON before recording it, as docs/results/gpu-h200-s31-*.json did.
"""


def _record_files(tool: str) -> list[Path]:
    return sorted(RESULTS.glob(f"{tool}-[0-9][0-9][0-9].json"))


def read_records(tool: str) -> list[dict]:
    """The tool's records in the order they were first recorded (file number)."""
    out = []
    for f in _record_files(tool):
        rec = json.loads(f.read_text())
        rec.pop("tool", None)
        out.append(rec)
    return out


def save_records(tool: str, records: list[dict]) -> None:
    """Write the records as docs/results/TOOL-NNN.json, NNN = position (a replaced record keeps its file)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    for i, rec in enumerate(records):
        text = json.dumps({"tool": tool, **rec}, indent=1, default=str) + "\n"
        path = RESULTS / f"{tool}-{i:03d}.json"
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)


def write_block(tool: str, lines: list[str], page: Path | None = None, *, heading: str | None = None,
                intro: str | None = None) -> None:
    """Rewrite only what lies between the tool's markers (appended at the end when absent, under a new
    `## heading` when one is given; a page that does not exist yet starts with `intro`)."""
    begin, end = f"<!-- {tool}:begin -->", f"<!-- {tool}:end -->"
    block = begin + "\n" + "\n".join(lines) + "\n" + end
    target = page or DOCS
    doc = target.read_text() if target.is_file() else (intro or BE.INTRO)
    if begin in doc and end in doc:
        doc = doc[: doc.index(begin)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip() + "\n\n" + (f"## {heading}\n\n" if heading else "") + block + "\n"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(doc)


def where(hw: dict) -> str:
    return hw["gpu"] if hw.get("gpu") else f"{hw['cpu']}, {hw['threads']} thr"


def merge_record(old: dict | None, new: dict) -> dict:
    """A later run of the same setting replaces measured fields; fields it skipped (None) are kept."""
    if old is None:
        return new
    out = {**old, **{k: v for k, v in new.items() if v is not None}}
    out["run"] = {**old["run"], **{k: v for k, v in new["run"].items() if v is not None}}
    out["commands"] = list(dict.fromkeys(old.get("commands", []) + new.get("commands", [])))
    return out


def _scale_key(r: dict) -> tuple:
    s = r["settings"]
    return (where(r["hardware"]), s["model"], s["masks"], s["samples"], s["seq_len"], r["run"]["budget"])


def _secs(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.0f}"


def _gib(n) -> str:
    return fmt_bytes(n) if n else "-"


def _gpu_peak(result: dict) -> dict:
    """The MFU yardstick: on a GPU the dense bf16 datasheet figure, as in the engine table (runs made
    before bench_scale chose it there carry it as `compute_peak`); on a CPU the measured fp32 GEMM."""
    if result["hardware"].get("gpu") and result["peak"]["source"].startswith("measured fp32"):
        return result.get("compute_peak") or result["peak"]
    return result["peak"]


def _rescaled(x: dict, peak: float, old: float) -> dict:
    return {**x, "mfu": x["mfu"] * old / peak} if x.get("mfu") is not None else x


def write_scale_docs(result: dict) -> None:
    tool = "bench_scale"
    records = {_scale_key(r): r for r in read_records(tool)}
    yardstick = _gpu_peak(result)
    peak, old = yardstick["flops"], result["peak"]["flops"]
    if peak != old:  # MFU figures against the GPU's bf16 peak, not its fp32 GEMM
        result = {**result, "runs": [_rescaled(r, peak, old) for r in result["runs"]],
                  "reference": {k: _rescaled(v, peak, old) for k, v in (result.get("reference") or {}).items()}
                  if result.get("reference") else None}
    for run_ in result["runs"]:
        run_ = dict(run_)
        if "extrapolation" in run_:
            run_["extrapolation"] = {k: v for k, v in run_["extrapolation"].items() if k != "per_iteration"}
        if run_.get("sweep"):
            run_["sweep"] = {**run_["sweep"], "runs": [
                {k: x[k] for k in ("plan", "seconds", "predicted_seconds", "peak_bytes", "predicted_peak_bytes",
                                   "mask_tokens_per_s")} for x in run_["sweep"]["runs"]]}
        rec = {"hardware": result["hardware"], "commit": result["commit"], "settings": result["settings"],
               "peak": yardstick, "run": run_, "reference": result.get("reference"),
               "commands": [result.get("command", "")]}
        records[_scale_key(rec)] = merge_record(records.get(_scale_key(rec)), rec)
    recs = list(records.values())
    save_records(tool, recs)
    write_block(tool, render_scale(recs))


def render_scale(recs: list[dict]) -> list[str]:
    lines = ["## Budgeted pruning at scale (tools/bench_scale.py)", "",
             "One real Bonsai iteration (`prune.run.run_pruning`: priors pass, mask sampling, masked evaluation, "
             "regression, selection, run state committed) per memory budget on random weights of the named shape. "
             "Stage times in seconds; mask-tok/s and MFU are the masked evaluation's (FLOPs and peak as in the "
             "engine table above); peak GPU is `max_memory_reserved`, peak RSS the process's VmHWM (CUDA "
             "libraries included; in brackets its growth during the iteration, what a CPU budget bounds). `x engine` / `x HF` = this budget's mask-tok/s over the engine with no budget "
             "and over a whole-model transformers forward with the loss on the same device. `paper run` "
             "extrapolates p 0.5, p_iter 0.05, 10 iterations of 200 x 32 x 2048 from the measured FLOP/s and the "
             "shrinking model (regression timed at 200 masks); in brackets the planner's prediction scaled by "
             "measured / predicted. The checkpoint was just written, so reads come from the page cache. A commit "
             "ending in +dirty had uncommitted changes under bonsai_lite/ or tools/ (other work in progress in the "
             "shared checkout). CPU rows: the shared 2-vCPU VM of the engine notes above, one torch thread, other "
             "jobs running; +-20% between runs.", "",
             "| hardware | commit | model | K x n x T | budget | eval plan | iteration | priors / eval / regr / select "
             "| mask-tok/s | MFU | peak GPU | peak RSS | read / to device | x engine / x HF | export | paper run |",
             "|" + " --- |" * 16]
    for r in recs:
        s, x = r["settings"], r["run"]
        head = (f"| {where(r['hardware'])} | {r['commit']} | {s['model']} | {s['masks']} x {s['samples']} x "
                f"{s['seq_len']} | {_gib(x['budget']) if x['budget'] else 'none'} ")
        if "error" in x:
            lines.append(head + f"| {x['error']} |" + " - |" * 10)
            continue
        st = {k: x["stages"].get(k, {}).get("seconds", 0.0) for k in STAGES}
        vs = {k: f"{v:.2f}" for k, v in (x.get("vs_reference") or {}).items()}
        ex = x["extrapolation"]
        plan = BE.describe_plan(x["plan"]) if x.get("plan") else "-"
        ps = ex.get("planner_scaled_seconds")
        exp = f"{x['export']['seconds']:.1f} s" if x.get("export") else "-"
        paper = f"{ex['seconds'] / 3600:.2f} h" + (f" ({ps / 3600:.2f} h)" if ps else "")
        growth = f" (+{_gib(x['peak_rss'] - x['rss_at_start'])})" if x.get("rss_at_start") else ""
        lines.append(
            head + f"| {plan} | {_secs(x['seconds'])} s "
            f"| {' / '.join(_secs(st[k]) for k in ('priors', 'evaluate', 'regression'))} / "
            f"{_secs(st['selection'] + st['sampling'])} | {x['mask_tokens_per_s']:.0f} | {100 * x['mfu']:.1f}% "
            f"| {_gib(x['peak_gpu_reserved'])} | {_gib(x['peak_rss'])}{growth} "
            f"| {_gib(x['bytes_read'])} / {_gib(x['bytes_to_device'])} "
            f"| {vs.get('engine', '-')} / {vs.get('transformers', '-')} "
            f"| {exp} | {paper} |")
    refs = {(where(r["hardware"]), r["settings"]["model"], r["settings"]["samples"], r["settings"]["seq_len"]): r
            for r in recs if r.get("reference")}
    if refs:
        lines += ["", "References (no budget, same device):", "",
                  "| hardware | commit | model | rows x T | engine: plan, mask-tok/s, MFU, peak "
                  "| transformers forward: tok/s, MFU, peak (weights included) |", "|" + " --- |" * 6]
        for r in refs.values():
            s, e, h = r["settings"], r["reference"]["engine"], r["reference"].get("transformers", {})
            hf = (f"{h['mask_tokens_per_s']:.0f}, {100 * h['mfu']:.1f}%, {_gib(h['peak_bytes'])}"
                  if "mask_tokens_per_s" in h else h.get("error", "-"))
            lines.append(f"| {where(r['hardware'])} | {r['commit']} | {s['model']} | {s['masks'] * s['samples']} x "
                         f"{s['seq_len']} | {BE.describe_plan(e['plan'])}, {e['mask_tokens_per_s']:.0f}, "
                         f"{100 * e['mfu']:.1f}%, {_gib(e['peak_bytes'])} | {hf} |")
    for r in recs:
        sw, s = r["run"].get("sweep"), r["settings"]
        if not sw:
            continue
        verdict = {True: "within 15%", False: "OUTSIDE 15%", None: "only the choice was measured"}
        lines += ["", f"Planner check, {s['model']} {s['masks']} x {s['samples']} x {s['seq_len']} under "
                  f"{_gib(r['run']['budget'])} on {where(r['hardware'])}: choice / best measured = "
                  f"{sw['choice_vs_best']:.2f} ({verdict[sw['within_tolerance']]}); "
                  "first row = planner's choice", "",
                  "| plan | predicted | measured | peak meas / pred |", "| --- | --- | --- | --- |"]
        lines += [f"| {BE.describe_plan(x['plan'])} | {_secs(x['predicted_seconds'])} s | {_secs(x['seconds'])} s "
                  f"| {_gib(x['peak_bytes'])} / {_gib(x['predicted_peak_bytes'])} |" for x in sw["runs"]]
    lines += ["", "Commands:", ""] + [f"- `{c}`" for c in dict.fromkeys(c for r in recs for c in r["commands"]) if c]
    lines += ["", GPU_HOWTO.rstrip()]
    return lines


def _infer_key(r: dict) -> tuple:
    s = r["settings"]
    return (where(r["hardware"]), s["model"], r["model"]["name"], s["dtype"], s["batch"], s["prefill_len"],
            s["prompt_len"], s["new_tokens"])


def write_infer_docs(result: dict) -> None:
    tool = "bench_infer"
    records = {_infer_key(r): r for r in read_records(tool)}
    for m in result["models"]:
        m = {k: v for k, v in m.items() if k != "dir"}
        m["prefill"] = {k: v for k, v in m["prefill"].items() if k != "times"}
        m["decode"] = {k: v for k, v in m["decode"].items() if k != "times"}
        rec = {"hardware": result["hardware"], "commit": result["commit"], "settings": result["settings"], "model": m,
               "command": result.get("command", "")}
        records[_infer_key(rec)] = rec
    recs = list(records.values())
    save_records(tool, recs)
    write_block(tool, render_infer(recs))


def render_infer(recs: list[dict]) -> list[str]:
    lines = ["## Inference speed of pruned models (tools/bench_infer.py)", "",
             "transformers `AutoModelForCausalLM` (per-layer exports through their shipped modeling file), medians "
             "after warm-up. Prefill: a [B, T] forward keeping the last position's logits. Decode: `generate` at "
             "batch 1, greedy with the KV cache, ms per token after the first (TTFT = the prompt's forward). "
             "`x parent` = speed-up over the first model of the same run. Variants were pruned with the `random` "
             "method unless the row says otherwise (speed depends on the widths kept, not on which units went); "
             "`non-emb` = non-embedding parameters as a fraction of the parent's.", "",
             "| hardware | commit | model | variant | dtype | non-emb | prefill B x T: tok/s | x parent "
             "| decode 1 x N (prompt P): ms/tok | x parent | TTFT |", "|" + " --- |" * 11]
    for r in recs:
        s, m = r["settings"], r["model"]
        variant = m["name"] + (f" ({m['method']})" if m.get("method") not in (None, "random") else "")
        dec = m.get("decode_speedup")
        lines.append(
            f"| {where(r['hardware'])} | {r['commit']} | {s['model']} | {variant} | {s['dtype']} "
            f"| {100 * m['params_fraction']:.0f}% "
            f"| {s['batch']} x {s['prefill_len']}: {m['prefill']['tokens_per_s']:.0f} "
            f"| {m['prefill_speedup']:.2f}x | 1 x {s['new_tokens']} (P {s['prompt_len']}): "
            f"{m['decode']['ms_per_token']:.2f} | {f'{dec:.2f}x' if dec else '-'} "
            f"| {1e3 * m['decode']['ttft_seconds']:.1f} ms |")
    lines += ["", "Commands:", ""] + [f"- `{c}`" for c in dict.fromkeys(r["command"] for r in recs) if c]
    lines += ["", "The paper's 1.58x (Table 2: LLaMA-2-7B at 50%, one A6000) is the end-to-end latency of forward "
              "passes over sequence-length chunks of Wikitext-2, i.e. closest to the prefill column; the GPU rows "
              "are what to compare with it. Commands for a GPU are in the bench_scale section's \"How to run on "
              "a GPU\"."]
    if (IMG / "infer-speedup.png").is_file():
        lines += ["", "![prefill speed-up against non-embedding parameters kept](img/infer-speedup.png)"]
    return lines


# ---- bench_engine ------------------------------------------------------------------------------
def engine_key(r: dict) -> tuple:
    s, hw = r["settings"], r["hardware"]
    return (hw.get("gpu") or hw["cpu"], hw["threads"], s["model"], s["masks"], s["samples"], s["seq_len"], s["budget"])


def write_engine_docs(record: dict) -> None:
    tool = "bench_engine"
    recs = [r for r in read_records(tool) if engine_key(r) != engine_key(record)]
    old = {engine_key(r): i for i, r in enumerate(read_records(tool))}
    if engine_key(record) in old:  # replaced in place: keeps its file and its row
        recs.insert(old[engine_key(record)], record)
    else:
        recs.append(record)
    save_records(tool, recs)
    write_block(tool, render_engine(recs))


def render_engine(records: list[dict]) -> list[str]:
    lines = ["| hardware | commit | model | K x n x T | budget | plan | mask-tok/s | GFLOP/s | MFU (peak) "
             "| peak mem meas / pred | time meas / pred | read / to device |", "|" + " --- |" * 12]
    for r in records:
        s, m, p = r["settings"], r["measured"], r["plan"]
        lines.append(
            f"| {where(r['hardware'])} | {r['commit']} | {s['model']} | {s['masks']} x {s['samples']} x {s['seq_len']} "
            f"| {fmt_bytes(s['budget'])} | {BE.describe_plan(p)} | {m['mask_tokens_per_s']:.0f} "
            f"| {m['flops_per_s'] / 1e9:.1f} | {100 * m['mfu']:.1f}% ({r['peak']['flops'] / 1e9:.0f} GFLOP/s) "
            f"| {fmt_bytes(m['peak_bytes'])} / {fmt_bytes(m['predicted_peak_bytes'])} "
            f"| {m['seconds']:.1f} s / {m['predicted_seconds']:.1f} s "
            f"| {fmt_bytes(m['bytes_read'])} / {fmt_bytes(m['bytes_to_device'])} |")
    for r in (r for r in records if r.get("sweep")):
        s = r["settings"]
        lines += ["", f"Sweep, {s['model']} {s['masks']} x {s['samples']} x {s['seq_len']} under "
                  f"{fmt_bytes(s['budget'])} on {r['hardware'].get('gpu') or r['hardware']['cpu']} "
                  f"({r['hardware']['threads']} thr), first row = planner's choice:", "",
                  "| plan | predicted | measured | peak meas / pred |", "| --- | --- | --- | --- |"]
        for x in r["sweep"]:
            lines.append(f"| {BE.describe_plan(x['plan'])} | {x['predicted_seconds']:.1f} s | {x['seconds']:.1f} s "
                         f"| {fmt_bytes(x['peak_bytes'])} / {fmt_bytes(x['predicted_peak_bytes'])} |")
    lines += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in records]
    if (IMG / "planner-time.png").is_file():
        lines += ["", "![measured against predicted seconds, every sweep and run](img/planner-time.png)"]
    return lines


# ---- the demo (docs/demo.md) ---------------------------------------------------------------------
DEMO_DOCS = BE.ROOT / "docs" / "demo.md"


def add_demo(report_file: str, command: str) -> None:
    """Record a `bonsai-lite demo` report (WORKDIR/demo.json) as docs/results/demo-000.json."""
    rec = json.loads(Path(report_file).read_text())
    rec = {**rec, "commit": BE.commit(), "command": command, "plot": None}
    rec["models"] = [{k: v for k, v in m.items() if k != "dir"} for m in rec["models"]]
    save_records("demo", [rec])


def render_demo(recs: list[dict]) -> list[str]:
    lines = []
    for r in recs:
        s, hw, base = r["settings"], r["hardware"], r["models"][0]
        load = r.get("load_average") or {}
        start, end = load.get("start", [float("nan")])[0], load.get("end", [float("nan")])[0]
        # a 1-minute load of half the cores before the run: another job was running (demo.json's figure)
        busy = not start < hw["cores"] / 2
        lines += [f"`{r['command']}` at commit {r['commit']} on {hw['cpu']} ({hw['cores']} cores, "
                  f"{hw['threads']} torch threads, torch {hw['torch']}); load average "
                  f"{start:.1f} at the start and {end:.1f} at the end "
                  + ("(a machine shared with other jobs: times and speeds are slower and noisier than on an idle one)."
                     if busy else "(nothing else running when it started)."),
                  "", f"| | perplexity (first {base['eval_tokens']:,} test tokens, seq {s['eval_seq_len']}) | params "
                  "| size | decode tok/s |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {m['name']} | {m['perplexity']:.2f} | {m['params']:,d} | {m['bytes'] / 1e6:.1f} MB "
                  f"| {m['decode_tokens_per_s']:.1f} |" for m in r["models"]]
        lines += ["", f"Search {r['prune_seconds']:.0f} s, adaptation ({s['adapt_steps']} LoRA steps) "
                  f"{r['adapt_seconds']:.0f} s, measuring the three models {r['measure_seconds']:.0f} s. "
                  f"Greedy continuations of `{s['prompt']}`:", ""]
        lines += [f"- **{m['name']}**: {' '.join(m['text'].split())}" for m in r["models"]]
    if (IMG / "demo.png").is_file():
        lines += ["", "![perplexity and decode speed against size](img/demo.png)"]
    return lines


# ---- plots and regeneration ----------------------------------------------------------------------
def draw_plots() -> list[Path]:
    """docs/img/*.png from the records; [] when matplotlib is missing."""
    from bonsai_lite import plots

    drawn = []
    infer: dict = {}
    for r in read_records("bench_infer"):
        m, s = r["model"], r["settings"]
        if m.get("params_fraction") is None or m["params_fraction"] >= 1:
            continue
        # one series per export family (per-layer-50-m1 -> per-layer-m1): variants of one sparsity
        # would otherwise be joined by a vertical line; decode (overhead-bound on a GPU) is in the table
        family = re.sub(r"-\d+(?=-|$)", "", m["name"])
        infer.setdefault(f"{s['model']}, {where(r['hardware'])}: {family}", []).append(
            (m["params_fraction"], m["prefill_speedup"]))
    if infer:
        drawn.append(plots.lines(infer, IMG / "infer-speedup.png", xlabel="non-embedding parameters kept (fraction)",
                                 ylabel="prefill speed-up over the parent", title="Prefill speed of pruned models"))
    timing: dict = {}
    for r in read_records("bench_engine"):
        m = r["measured"]
        timing.setdefault("bench_engine", []).append((m["predicted_seconds"], m["seconds"]))
        for x in r.get("sweep") or []:
            timing["bench_engine"].append((x["predicted_seconds"], x["seconds"]))
    for r in read_records("bench_scale"):
        for x in ((r["run"].get("sweep") or {}).get("runs") or []):
            timing.setdefault("bench_scale sweeps", []).append((x["predicted_seconds"], x["seconds"]))
    if timing:
        drawn.append(plots.scatter(timing, IMG / "planner-time.png", xlabel="planner's predicted seconds",
                                   ylabel="measured seconds", title="Planner time predictions (y = x dashed)"))
    for r in read_records("demo")[:1]:
        drawn.append(plots.size_tradeoff(r["models"], IMG / "demo.png",
                                         title=f"SmolLM2-135M: {r['settings']['method']} at "
                                         f"{r['settings']['sparsity']:.0%}, then {r['settings']['adapt_steps']} LoRA steps"))
    return [p for p in drawn if p is not None]


def regenerate() -> dict:
    """Every generated table and plot from docs/results/*.json: docs/PERFORMANCE.md, docs/RESULTS.md
    (tools/render_quality.py), docs/demo.md's table and docs/img/."""
    plots = draw_plots()
    counts = {}
    for tool, render in (("bench_engine", render_engine), ("bench_scale", render_scale),
                         ("bench_infer", render_infer)):
        recs = read_records(tool)
        counts[tool] = len(recs)
        if recs:
            write_block(tool, render(recs))
    scale = SD.load()  # kind=scale records (bench_scale --records): the 7-8B tables, CPU and GPU
    counts["scale"] = len(scale)
    scale_cpu = [r for r in scale if r["device"] == "cpu"]
    scale_gpu = [r for r in scale if r["device"] != "cpu"]
    if scale_cpu:
        write_block("scale_cpu", SD.render(scale_cpu).splitlines())
    if scale_gpu:
        write_block("scale_gpu", SD.render_gpu(scale_gpu).splitlines())
    import plan_choices  # noqa: PLC0415 - the planner's predicted choices, from their stored run

    if plan_choices.RESULT.is_file():
        write_block("plan_choices", plan_choices.render(json.loads(plan_choices.RESULT.read_text())))
    import bench_distributed  # noqa: PLC0415 - their blocks come from their own records in docs/results
    import gguf_docs  # noqa: PLC0415

    import render_quality  # noqa: PLC0415 - docs/RESULTS.md's tables and plots, from the quality records

    bench_distributed.write_docs()
    import bench_prune  # noqa: PLC0415

    bench_prune.write_docs()
    import bench_refit  # noqa: PLC0415

    bench_refit.write_docs()
    gguf_docs.main()
    render_quality.render_docs(render_quality.load_records())
    if read_records("demo"):
        write_block("demo", render_demo(read_records("demo")), DEMO_DOCS)
    return {"docs": str(DOCS), "records": counts, "plots": [str(p) for p in plots]}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="regenerate docs tables and plots from docs/results/*.json")
    ap.add_argument("--add-demo", metavar="DEMO_JSON", help="record WORKDIR/demo.json of a demo run first")
    ap.add_argument("--command", default="bonsai-lite demo", help="the command that produced --add-demo's file")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.add_demo:
        add_demo(args.add_demo, args.command)
    print(json.dumps(regenerate()))
