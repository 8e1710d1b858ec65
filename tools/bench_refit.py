"""The least-squares refit at a model's shape, measured against the planner's prediction.

Writes a random bf16 checkpoint of --shape cut to --layers decoder blocks (tools/bench_scale.py's
generator, embeddings and LM head included), cuts every layer to --keep of its heads and MLP units,
and runs `prune.refit.refit_model` (what `bonsai-lite prune` runs after its search) on --samples x
--seq-len random tokens. It reports the wall time and peak RSS growth (VmHWM) beside
`pass_costs.refit_seconds` and `refit.refit_peak_bytes`, and the time per layer scaled to the shape's
full depth beside the planner's full-depth prediction (an estimate: every layer of a shape costs the
same). One JSON object on stdout (kind "refit-scale"); --record writes it to docs/results/.

  python tools/bench_refit.py --shape llama3-8b --layers 2 --samples 32 --seq-len 128 --threads 2 \\
      --work-dir /work/refit8b --record
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_engine as BE  # noqa: E402
import scale_extras as SX  # noqa: E402
from bench_scale import _reset_rss_peak  # noqa: E402
from scale_extras import shrunk  # noqa: E402
from random_checkpoint import SHAPES, shape_bytes, shape_spec, write_random_model  # noqa: E402
from bonsai_lite.io.checkpoint import INDEX_NAME  # noqa: E402
from bonsai_lite.io.model import StreamedModel  # noqa: E402
from bonsai_lite.prune.refit import refit_model, refit_peak_bytes  # noqa: E402
from bonsai_lite.search.machine import detect_machine, fmt_bytes  # noqa: E402
from bonsai_lite.search.pass_costs import refit_seconds  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def measure(args, model_dir: Path, work_dir: Path) -> dict:
    parent = StreamedModel.open(model_dir)
    spec = parent.spec
    layers = shrunk(parent.layers, args.keep)
    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, spec.vocab, (args.samples, args.seq_len), generator=g)
    machine = detect_machine(device="cpu", budget=None, checkpoint=str(model_dir))
    predicted = refit_seconds(spec, layers, tokens.numel(), args.seq_len, machine)
    folder = work_dir / "refit-overlay"
    _reset_rss_peak()
    rss0 = BE._status_bytes("VmRSS") or 0
    per_layer: list[float] = []
    t0 = last = time.perf_counter()

    def tick(_layer):
        nonlocal last
        now = time.perf_counter()
        per_layer.append(now - last)
        last = now

    refit_model(parent, layers, tokens, folder, device="cpu", progress=tick)
    seconds = time.perf_counter() - t0
    peak = (BE._status_bytes("VmHWM") or 0) - rss0
    shutil.rmtree(folder, ignore_errors=True)
    full = shape_spec(args.shape)
    n_full = len(full.layers)
    return {
        "kind": "refit-scale", "shape": args.shape, "device": "cpu", "threads": torch.get_num_threads(),
        "layers_measured": len(layers), "layers_full": n_full, "keep": args.keep,
        "samples": args.samples, "seq_len": args.seq_len, "tokens": tokens.numel(),
        "seconds": seconds, "seconds_per_layer": per_layer, "predicted_seconds": predicted,
        "peak_rss_growth_bytes": peak, "predicted_peak_bytes": refit_peak_bytes(spec, tokens.numel(), args.seq_len),
        # the measured layers' mean time for every layer of the full shape, against the planner's
        # prediction for the full shape with every layer pruned (an estimate: the layers are alike)
        "full_depth_seconds_estimate": sum(per_layer) / len(per_layer) * n_full,
        "full_depth_predicted_seconds": refit_seconds(full, shrunk(full.layers, args.keep), tokens.numel(),
                                                      args.seq_len, machine),
        "machine": {"gemm_flops_per_s": machine.flops, "disk_bps": machine.disk_bps, "cached": machine.cached},
        "commit": BE.commit(), "hardware": BE.hardware(),
    }


# ---- docs/PERFORMANCE.md's block, from the records ---------------------------------------------
BLOCK = "refit_scale"


def load_records() -> list[tuple[str, dict]]:
    """(run tag from the file name, record) of every refit-scale record, grouped by shape and windows."""
    out = []
    for f in sorted(RESULTS.glob("refit-scale-*.json")):
        r = json.loads(f.read_text())
        if r.get("kind") == "refit-scale":
            stem = f"refit-scale-{r['shape']}-{r['layers_measured']}l-{r['samples']}x{r['seq_len']}-t{r['threads']}"
            out.append((f.stem[len(stem) + 1:] or "-", r))
    return sorted(out, key=lambda tr: (tr[1]["shape"], tr[1]["seq_len"], tr[1]["samples"], _commit_time(tr[1]["commit"])))


def _commit_time(commit: str) -> int:
    """Commit time of `commit` in this repository (0 where unknown): rows in the order the code changed."""
    import subprocess  # noqa: PLC0415

    done = subprocess.run(["git", "log", "-1", "--format=%ct", commit.removesuffix("+dirty")], capture_output=True,
                          text=True, cwd=RESULTS.parent.parent)
    return int(done.stdout.strip() or 0) if done.returncode == 0 else 0


def render(records: list[tuple[str, dict]]) -> list[str]:
    lines = ["Generated by `python tools/bench_docs.py` from docs/results/refit-scale-*.json (tools/bench_refit.py; "
             "every layer cut to --keep of its heads and MLP units, random windows; the full-depth column is the "
             "measured layers' mean times the shape's depth).", "",
             "| shape | layers, keep | windows | CPU, threads | run | commit | measured | planner (measured / planned) "
             "| peak RSS growth | `refit_peak_bytes` | full depth, from the measured layers |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for tag, r in records:
        lines.append(
            f"| {r['shape']} | {r['layers_measured']}, {r['keep']:g} | {r['samples']} x {r['seq_len']} "
            f"| {r['hardware']['cpu']}, {r['threads']} "
            f"| {tag} | {r['commit']} | {r['seconds']:.1f} s | {r['predicted_seconds']:.1f} s "
            f"({r['seconds'] / r['predicted_seconds']:.2f}x) | {fmt_bytes(r['peak_rss_growth_bytes'])} "
            f"| {fmt_bytes(r['predicted_peak_bytes'])} | {r['full_depth_seconds_estimate'] / 60:.1f} min |")
    commands = {f"    python tools/bench_refit.py --shape {r['shape']} --layers {r['layers_measured']} --keep {r['keep']:g} "
                f"--samples {r['samples']} --seq-len {r['seq_len']} --threads {r['threads']} --work-dir DIR --record TAG"
                for _, r in records}
    return lines + ["", "Commands (TAG: the run column):", ""] + sorted(commands)


def write_docs() -> None:
    import bench_docs  # noqa: PLC0415 - the block writer shared by every tool

    records = load_records()
    if records:
        bench_docs.write_block(BLOCK, render(records))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--layers", type=int, default=2, help="decoder blocks written and refitted")
    ap.add_argument("--keep", type=float, default=0.5, help="share of each layer's heads and MLP units kept")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work-dir", default=None, help="where the checkpoint is written (default: temp; deleted after "
                                                     "unless --keep-checkpoint)")
    ap.add_argument("--keep-checkpoint", action="store_true")
    ap.add_argument("--record", nargs="?", const="", default=None, metavar="TAG",
                    help="write the JSON to docs/results/ (TAG, if given, ends the file's name)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="bench-refit-") if args.work_dir is None else None
    work_dir = Path(args.work_dir or tmp.name)
    model_dir = work_dir / f"{args.shape}-{args.layers}l"
    created = not (model_dir / INDEX_NAME).is_file()  # never delete a checkpoint this run did not write
    try:
        if created:
            need = int(shape_bytes(args.shape) * args.layers / len(shape_spec(args.shape).layers)) + 4 * 2**30
            SX.check_disk(work_dir, need)
            print(f"[generate] {args.shape} cut to {args.layers} layers in {model_dir} (needs about {fmt_bytes(need)})",
                  file=sys.stderr)
        write_random_model(args.shape, model_dir, device="cpu", seed=args.seed, layers=args.layers)
        result = measure(args, model_dir, work_dir)
    finally:
        if tmp is not None:
            tmp.cleanup()
        elif created and not args.keep_checkpoint:
            shutil.rmtree(model_dir, ignore_errors=True)
    tag = f"-{args.record}" if args.record else ""
    name = f"refit-scale-{args.shape}-{args.layers}l-{args.samples}x{args.seq_len}-t{result['threads']}{tag}.json"
    return SX.emit(result, RESULTS / name if args.record is not None else None)


if __name__ == "__main__":
    main()
