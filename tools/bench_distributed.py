"""Distributed masked evaluation: sub-model throughput of 1 vs N processes on the same work.

For each N in --nprocs the driver launches `torchrun --standalone --nproc-per-node N` of this file
in --worker mode (N = 1 runs without torchrun: the single-process path) with OMP_NUM_THREADS =
--threads, and prints one JSON record: hardware, commit, settings, and per N the seconds, sub-models/s,
mask-tokens/s, each rank's compute seconds, the speed-up over the first N, the efficiency per rank
(speed-up / N), the largest loss difference from the first N, and the load average around the run
(the CPU machine is shared). --out writes the record (docs/results/bench_distributed-*.json);
--write-docs regenerates the table in docs/PERFORMANCE.md from every such file.

The workers take the path `bonsai-lite prune` takes under torchrun (prune.distributed.Ranks and
Pruner.evaluate_share): rank 0 sends the chunk, every rank evaluates its share on its own device
under its own budget, the losses are gathered. One untimed warm-up chunk (one sub-model per rank:
first reads, allocator warm-up), then --repeats timed chunks of --masks random sub-models.

  python tools/bench_distributed.py --model /work/smollm2 --nprocs 1,2 --threads 1 --masks 24 \\
      --samples 2 --seq-len 128 --out docs/results/bench_distributed-cpu.json --write-docs
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import commit, hardware  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "PERFORMANCE.md"
RESULTS = ROOT / "docs" / "results"
BEGIN, END = "<!-- bench_distributed:begin -->", "<!-- bench_distributed:end -->"


# ---- one rank -------------------------------------------------------------------------------------
def worker(args) -> None:
    from bonsai_lite.config import CalibConfig, RunConfig, SearchConfig
    from bonsai_lite.prune.distributed import from_env
    from bonsai_lite.prune.loop import Pruner
    from bonsai_lite.prune.state import layers_to_json
    from bonsai_lite.search.machine import parse_bytes
    from bonsai_lite.structure import UnitLayout

    torch.set_num_threads(args.threads)
    cfg = RunConfig(model=str(Path(args.model).resolve()), out=os.devnull,
                    calib=CalibConfig(text=None, samples=args.samples, seq_len=args.seq_len),
                    search=SearchConfig(seed=0), device=args.device,
                    budget=parse_bytes(args.memory_budget) if args.memory_budget else None)
    ranks = from_env(device=args.device, timeout_s=900)
    rank = ranks.rank if ranks else 0
    pruner = Pruner(cfg, ids=None, state=None)
    calls: list[float] = []

    def local(layers, tokens, masks, *, first, extra=None):
        t = time.perf_counter()
        nll = pruner.evaluate_share(layers, tokens, masks, first=first, extra=extra)
        calls.append(time.perf_counter() - t)
        return nll

    record = {"rank": rank, "world": ranks.world if ranks else 1}
    if ranks is not None and not ranks.is_root:
        with ranks:
            ranks.serve(local)
    else:
        g = torch.Generator().manual_seed(0)
        spec = pruner.parent.spec
        tokens = torch.randint(spec.vocab, (args.samples, args.seq_len), generator=g)
        masks = torch.rand(args.masks, UnitLayout.of(spec.layers).total, generator=g) > 0.5
        layers = layers_to_json(spec.layers)
        run = ((lambda m: ranks.evaluate(layers, tokens, m, first=0, local=local)) if ranks is not None
               else (lambda m: local(layers, tokens, m, first=0)))
        run(masks[: record["world"]])  # warm-up, untimed
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            nll = run(masks)
        record.update(seconds=time.perf_counter() - t0, nll=nll.tolist())
        if ranks is not None:
            ranks.close()
    record["compute_seconds"] = sum(calls[1:])  # the first call is the warm-up
    (Path(args.record_dir) / f"rank{rank}.json").write_text(json.dumps(record))


# ---- driver ---------------------------------------------------------------------------------------
def measure(args, n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        me = [str(Path(__file__).resolve()), "--worker", "--record-dir", tmp, "--model", args.model, "--masks",
              str(args.masks), "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--repeats",
              str(args.repeats), "--threads", str(args.threads), "--device", args.device]
        if args.memory_budget:
            me += ["--memory-budget", args.memory_budget]
        launcher = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc-per-node", str(n)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
               "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        p = subprocess.run(launcher + me, env=env, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"{n} process(es) failed:\n{p.stderr[-3000:]}")
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(n)]
    root = ranks[0]
    subs = args.masks * args.repeats
    return {"nprocs": n, "seconds": root["seconds"], "sub_models_per_s": subs / root["seconds"],
            "mask_tokens_per_s": subs * args.samples * (args.seq_len - 1) / root["seconds"],
            "compute_seconds_per_rank": [r["compute_seconds"] for r in ranks], "launch_wall_seconds": wall,
            "loadavg_1m_before_after": [load_before[0], os.getloadavg()[0]], "nll": root["nll"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (safetensors)")
    ap.add_argument("--nprocs", default="1,2", help="process counts to compare, the first is the baseline")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--masks", type=int, default=24, help="sub-models per timed chunk")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--memory-budget", default=None)
    ap.add_argument("--out", default=None, help="write the record here (docs/results/bench_distributed-*.json)")
    ap.add_argument("--write-docs", action="store_true", help="regenerate the docs/PERFORMANCE.md table")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--record-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.model:
        runs = [measure(args, int(n)) for n in args.nprocs.split(",")]
        base, ref = runs[0], torch.tensor(runs[0]["nll"])
        for r in runs:
            r["speedup"] = r["sub_models_per_s"] / base["sub_models_per_s"]
            r["efficiency_per_rank"] = r["speedup"] / (r["nprocs"] / base["nprocs"])
            r["max_abs_nll_diff_vs_first"] = float((torch.tensor(r.pop("nll")) - ref).abs().max())
        torch.set_num_threads(args.threads)
        settings = {k: getattr(args, k) for k in ("model", "nprocs", "threads", "masks", "samples", "seq_len",
                                                  "repeats", "device", "memory_budget")}
        settings["model"] = Path(args.model).name
        record = {"tool": "bench_distributed", "hardware": hardware(), "commit": commit(), "settings": settings,
                  "runs": runs, "command": "python tools/bench_distributed.py " + " ".join(sys.argv[1:]),
                  "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        print(json.dumps(record))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    if args.write_docs:
        write_docs()


def write_docs() -> None:
    """The table between the markers in docs/PERFORMANCE.md, from docs/results/bench_distributed*.json."""
    rows = ["| hardware | commit | model | K x n x T | processes x threads | sub-models/s | speed-up | efficiency "
            "per rank | compute s per rank | max loss diff | load avg (1 min) before / after |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    files = sorted(RESULTS.glob("bench_distributed*.json"))
    for f in files:
        rec = json.loads(f.read_text())
        hw, s = rec["hardware"], rec["settings"]
        where = hw["gpu"] or f"{' '.join(hw['cpu'].split()[:2])}, {hw['cores']} cores"
        for r in rec["runs"]:
            rows.append(
                f"| {where} | {rec['commit']} | {s['model']} | {s['masks']} x {s['samples']} x {s['seq_len']} | "
                f"{r['nprocs']} x {s['threads']} | {r['sub_models_per_s']:.3f} | {r['speedup']:.2f}x | "
                f"{r['efficiency_per_rank']:.0%} | {' / '.join(f'{c:.1f}' for c in r['compute_seconds_per_rank'])} | "
                f"{r['max_abs_nll_diff_vs_first']:.1e} | "
                f"{' / '.join(f'{x:.1f}' for x in r['loadavg_1m_before_after'])} |")
    sources = ", ".join(f"`docs/results/{f.name}`" for f in files) or "(none yet)"
    note = f"Generated by `python tools/bench_distributed.py --write-docs` from {sources}."
    block = "\n".join([BEGIN, *rows, "", note, END])
    doc = DOCS.read_text()
    if BEGIN in doc and END in doc:
        doc = doc[: doc.index(BEGIN)] + block + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    DOCS.write_text(doc)


if __name__ == "__main__":
    main()
