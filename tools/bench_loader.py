"""The block loader's weight handling per pass, measured against the planner's prediction.

One engine pass reads every decoder block and LM-head chunk through `io.blocks.BlockLoader`: the
checkpoint's whole tensors mapped (`Checkpoint.map`, populated; until the twenty-eighth session
read into fresh buffers), the kept units copied out of pruned projections, a cast where the
compute dtype is not the checkpoint's. This times exactly that (no compute) on a
checkpoint already in the page cache (one untimed pass first), for each compute dtype, on the
parent's structure and on one cut to --keep of every layer's heads and MLP units, and prints the
planner's `weights_io_s` for the same pass beside it (`planner.candidate_cost`, the checkpoint
taken as cached). One JSON object on stdout (kind "loader"); --record writes it to docs/results/.

  python tools/bench_loader.py --model /work/scale/llama3-8b --threads 2 --record loader-llama3-8b-s25.json
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

import bench_engine as BE  # noqa: E402
from scale_extras import shrunk  # noqa: E402

from bonsai_lite.io.model import StreamedModel  # noqa: E402
from bonsai_lite.search.machine import detect_machine  # noqa: E402
from bonsai_lite.search.planner import Work, candidate_cost  # noqa: E402

HEAD_CHUNK = 4096


def load_pass(model: StreamedModel, layers, dtype: torch.dtype) -> float:
    loader = model.with_layers(layers).loader(device="cpu", dtype=dtype)
    t0 = time.perf_counter()
    for layer in range(len(layers)):
        block = loader.block(layer)
        del block
    for _, chunk in loader.head_chunks(HEAD_CHUNK):
        del chunk
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a safetensors checkpoint (e.g. tools/bench_scale.py --keep's)")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--keep", type=float, default=0.5, help="the pruned structure's share of heads and MLP units")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per case (the fastest is reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--record", help="also write the JSON to docs/results/<name>")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = StreamedModel.open(args.model)
    spec = model.spec
    machine = detect_machine(device="cpu", budget=None, checkpoint=args.model)  # bounds the host allocator too
    warm = replace(machine, cached=1.0, page_cache=10**15)
    src_bytes = spec.dtype.itemsize
    rows = []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        for label, layers in (("parent", spec.layers), (f"keep {args.keep:g}", shrunk(spec.layers, args.keep))):
            load_pass(model, layers, dtype)  # page cache, kernels
            seconds = min(load_pass(model, layers, dtype) for _ in range(args.repeats))
            predicted = candidate_cost(spec, layers, Work(1, 1, 1), warm, dtype=name, order="layer-major",
                                       cache="device", group_rows=1, tile_rows=1, head_chunk=HEAD_CHUNK,
                                       prefetch=False, weights_8bit=False, src_bytes=src_bytes)[2]["weights_io_s"]
            rows.append({"dtype": name, "structure": label, "block_params": sum(spec.block_params(s) for s in layers),
                         "seconds": round(seconds, 3), "predicted_seconds": predicted,
                         "predicted_over_measured": round(predicted / seconds, 3)})
            print(f"[loader] {name} {label}: {seconds:.2f} s measured, {predicted:.2f} s predicted", file=sys.stderr)
    result = {"kind": "loader", "model": str(args.model), "checkpoint_dtype": str(spec.dtype).removeprefix("torch."),
              "layers": len(spec.layers), "head_chunk": HEAD_CHUNK, "repeats": args.repeats, "rows": rows,
              "probe_flops_per_s": machine.flops, "fresh_page_bps": machine.fresh_page_bps}
    return BE.emit(result, "bench_loader.py", argv, args.record)


if __name__ == "__main__":
    main()
