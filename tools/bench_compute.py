"""The engine's compute per pass, measured against the planner's `compute_s` (no loading, no disk).

One engine pass computes every decoder block on each tile of rows, then the LM head chunk by chunk.
This times exactly those calls (`ops.block_forward` with per-row masks, `ops.ChunkedNLL.update`) on
random weights of a shape held in memory, one block and one head chunk standing for all of them
(every block of a shape is the same size), and prints the planner's `compute_s` for the same pass
beside it (`planner.candidate_cost`, layer-major, cache on the device, no prefetch). With
bench_loader.py (the weight handling) it splits a pass's prediction into parts that can each be
checked. One JSON object on stdout (kind "compute"); --record writes it to docs/results/.

  python tools/bench_compute.py --shape llama3-8b --threads 2 --record compute-llama3-8b-s28.json
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

import bench_engine as BE  # noqa: E402
from random_checkpoint import shape_spec  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402

from bonsai_lite.ops import BlockWeights, ChunkedNLL, block_forward, rotary_cos_sin  # noqa: E402
from bonsai_lite.search.machine import detect_machine  # noqa: E402
from bonsai_lite.search.planner import Work, candidate_cost  # noqa: E402

HEAD_CHUNK = 4096


def random_block(spec, dtype: torch.dtype, seed: int = 0) -> BlockWeights:
    g = torch.Generator().manual_seed(seed)
    h, d, layer = spec.hidden, spec.head_dim, spec.layers[0]
    nh, nkv, width = len(layer.heads), len(layer.kv), len(layer.mlp)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(dtype)

    return BlockWeights(attn_norm=torch.ones(h, dtype=dtype), mlp_norm=torch.ones(h, dtype=dtype),
                        q_w=w(nh * d, h), k_w=w(nkv * d, h), v_w=w(nkv * d, h), o_w=w(h, nh * d),
                        gate_w=w(width, h), up_w=w(width, h), down_w=w(h, width),
                        kv_map=layer.kv_map, head_dim=d)


def time_pass(spec, block: BlockWeights, head: torch.Tensor, rows: int, tokens: int, dtype, repeats: int) -> dict:
    """Seconds of one block call and one head-chunk call on a tile of `rows` x `tokens` (fastest of
    `repeats`), and the pass they stand for: n_layers blocks and ceil(vocab / chunk) chunks."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, tokens, spec.hidden, generator=g).to(dtype)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, spec.head_dim, 2).float() / spec.head_dim))  # values do not matter here
    cos, sin = rotary_cos_sin(inv_freq, 1.0, torch.arange(tokens), dtype)
    act = ACT2FN[spec.act]
    # rows > 1 are sub-models: each keeps ~95% of its heads and units, as a sampled mask does
    hm = torch.rand(rows, block.n_heads, generator=g) > 0.05 if rows > 1 else None
    mm = torch.rand(rows, block.width, generator=g) > 0.05 if rows > 1 else None
    targets = torch.randint(0, HEAD_CHUNK, (rows * (tokens - 1),), generator=g)
    h = x[:, :-1].reshape(-1, spec.hidden)

    def best(fn) -> float:
        fn()  # oneDNN builds its kernels on the first calls
        out = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            out = min(out, time.perf_counter() - t0)
        return out

    with torch.no_grad():
        block_s = best(lambda: block_forward(block, x, cos, sin, eps=spec.eps, act=act, head_mask=hm, mlp_mask=mm))
        chunk_s = best(lambda: ChunkedNLL(len(targets), "cpu").update(slice(None), h, targets, head, 0))
    chunks = math.ceil(spec.vocab / HEAD_CHUNK)
    return {"block_seconds": block_s, "chunk_seconds": chunk_s,
            "seconds": spec.n_layers * block_s + chunks * chunk_s}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", help="a tools/random_checkpoint.py shape")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--tiles", default="1x128,8x128", help="rows x tokens per tile, comma separated")
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per case (the fastest is reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--record", help="also write the JSON to docs/results/<name>")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = shape_spec(args.shape)
    machine = detect_machine(device="cpu", budget=None)  # probes the GEMM rate the planner plans with
    rows_out = []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        block = random_block(spec, dtype)
        head = (torch.randn(HEAD_CHUNK, spec.hidden, generator=torch.Generator().manual_seed(2)) * 0.02).to(dtype)
        for tile in args.tiles.split(","):
            rows, tokens = (int(v) for v in tile.split("x"))
            measured = time_pass(spec, block, head, rows, tokens, dtype, args.repeats)
            _, _, bd, _ = candidate_cost(spec, spec.layers, Work(rows, 1, tokens), machine, dtype=name,
                                         order="layer-major", cache="device", group_rows=rows, tile_rows=rows,
                                         head_chunk=HEAD_CHUNK, prefetch=False, weights_8bit=False,
                                         src_bytes=spec.dtype.itemsize)
            row = {"dtype": name, "rows": rows, "tokens": tokens, **{k: round(v, 4) for k, v in measured.items()},
                   "predicted_seconds": bd["compute_s"],
                   "predicted_over_measured": round(bd["compute_s"] / measured["seconds"], 3)}
            rows_out.append(row)
            print(f"[compute] {name} {rows}x{tokens}: {measured['seconds']:.1f} s measured, "
                  f"{bd['compute_s']:.1f} s predicted", file=sys.stderr)
        del block, head
    result = {"kind": "compute", "shape": args.shape, "layers": spec.n_layers, "head_chunk": HEAD_CHUNK,
              "repeats": args.repeats, "threads": args.threads, "rows": rows_out,
              "probe_flops_per_s": machine.flops, "bf16_factor": machine.bf16_factor,
              "fresh_page_bps": machine.fresh_page_bps}
    return BE.emit(result, "bench_compute.py", argv, args.record)


if __name__ == "__main__":
    main()
