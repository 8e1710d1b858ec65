"""Inference speed of pruned models against their parent: prefill throughput and decode latency.

Each model directory is loaded with transformers' `AutoModelForCausalLM.from_pretrained` (bf16 on
CUDA, fp32 on CPU) and measured after warm-up: prefill tokens/s of a [batch, T] forward that keeps
only the last position's logits (what generation's prefill computes), the time to first token of a
[1, prompt] prompt, and decode latency of `generate` for N new tokens at batch 1 (greedy, KV cache;
ms per token after the first). The first model is the reference for the speed-up columns.

Models come from --models NAME=DIR ..., or --shape: random weights of that shape (the parent, from
tools/bench_scale.py) and pruned variants at --sparsities made through the library (`run_pruning`
with --method random or magnitude on a few random calibration tokens, then `export_pruned`,
per-layer widths and/or --uniform). Speed depends on the widths kept, not on which units went, so
cheap selection is enough. Variants are deleted after measuring unless --keep (8B ones take 10+ GB).

Per-layer exports ship their own modeling file (`auto_map`); bonsai-lite's own (byte-identical to
the one this version writes, or to an earlier version's: io/hf.py) load through bonsai-lite's
classes, any other only with --trust-remote-code, and only when the auto_map names a file inside
the directory.

  python tools/bench_infer.py --shape tiny --sparsities 0.5 --batch 2 --prefill-len 64 --new-tokens 16 \\
      --trust-remote-code
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_engine as BE  # noqa: E402
from bench_docs import write_infer_docs  # noqa: E402
from random_checkpoint import SHAPES, write_random_model  # noqa: E402
from bonsai_lite.io.hf import load_causal_lm  # noqa: E402
from bonsai_lite.config import CalibConfig, RunConfig, SearchConfig  # noqa: E402
from bonsai_lite.io.model import StreamedModel  # noqa: E402
from bonsai_lite.prune.align import auto_multiple_of  # noqa: E402

FORMATS = ("per-layer", "per-layer-gqa-equal", "uniform")  # the last: a stock config
CALIB_TOKENS = 32  # priors pass of the random / magnitude methods: one window, speed only
MAX_P_ITER = 0.45  # SearchConfig requires p_iter < 0.5


# ---- pruned variants ---------------------------------------------------------------------------
def make_variant(parent: Path, out: Path, *, sparsity: float, uniform: bool, method: str, device: str,
                 seed: int, multiple_of: int, gqa: str = "any") -> dict:
    """Prune `parent` to `sparsity` with a cheap selection method through the library (MLP widths a
    multiple of `multiple_of`), export to `out`."""
    from bonsai_lite.export import export_pruned
    from bonsai_lite.prune.run import run_pruning

    p_iter = sparsity / math.ceil(sparsity / MAX_P_ITER)  # one iteration, two above 45%
    cfg = RunConfig(model=str(parent), out=str(out), calib=CalibConfig(text=None, samples=1, seq_len=CALIB_TOKENS),
                    search=SearchConfig(method=method, sparsity=sparsity, p_iter=p_iter, masks_per_iter=2,
                                        uniform=uniform, seed=seed, multiple_of=multiple_of, gqa=gqa),
                    device=device)
    vocab = StreamedModel.open(parent).spec.vocab
    ids = torch.randint(0, vocab, (2 * CALIB_TOKENS,), generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-infer-run-") as run_dir:
        outcome = run_pruning(cfg, ids=ids, run_dir=run_dir, restart=True)
    search_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    export_pruned(parent, outcome.layers, out, uniform=uniform, overwrite=True,
                  metadata={"method": method, "sparsity": sparsity, "purpose": "bench_infer (speed only)"})
    return {"search_seconds": search_s, "export_seconds": time.perf_counter() - t0, "multiple_of": multiple_of,
            "gqa": gqa}


# ---- measurement ---------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def load_model(model_dir: Path, *, device: str, dtype: torch.dtype, trust_remote_code: bool):
    # bonsai-lite's own per-layer exports load through its own classes; other shipped code needs the flag.
    kw = {"device_map": device} if device.startswith("cuda") else {}
    return load_causal_lm(model_dir, trust_remote_code=trust_remote_code, dtype=dtype, **kw).eval()


@torch.no_grad()
def measure(model, *, device: str, vocab: int, batch: int, prefill_len: int, prompt_len: int, new_tokens: int,
            warmup: int, repeats: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, prefill_len), generator=g).to(device)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=g).to(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    prefill = lambda: model(ids, use_cache=False, logits_to_keep=1)  # noqa: E731
    first = lambda: model(prompt, use_cache=True, logits_to_keep=1)  # noqa: E731
    # min_new_tokens = max_new_tokens: a random model's EOS must not end the run early.
    gen_kw = dict(do_sample=False, use_cache=True, pad_token_id=0, max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens)
    out = {}
    _timed(prefill, device, warmup)
    _timed(lambda: model.generate(prompt, **{**gen_kw, "max_new_tokens": 4, "min_new_tokens": 4}), device, warmup)
    pre = _timed(prefill, device, repeats)
    ttft = _timed(first, device, repeats)
    produced = []

    def gen():
        produced.append(model.generate(prompt, **gen_kw).shape[1] - prompt_len)
    total = _timed(gen, device, repeats)
    if any(n != new_tokens for n in produced):
        raise RuntimeError(f"generate produced {produced} tokens, asked for {new_tokens}")
    p, f, t = statistics.median(pre), statistics.median(ttft), statistics.median(total)
    out["prefill"] = {"seconds": p, "tokens_per_s": batch * prefill_len / p, "times": pre}
    out["decode"] = {"seconds": t, "ttft_seconds": f, "ms_per_token": 1e3 * max(t - f, 0.0) / max(1, new_tokens - 1),
                     "tokens_per_s": new_tokens / t, "times": total}
    out["peak_gpu_allocated"] = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    return out


def bench_model(name: str, model_dir: Path, args, *, device: str, dtype: torch.dtype) -> dict:
    sm = StreamedModel.open(model_dir)
    if args.runtime == "llama.cpp":
        return bench_gguf(name, model_dir, sm, args)
    t0 = time.perf_counter()
    model = load_model(model_dir, device=device, dtype=dtype, trust_remote_code=args.trust_remote_code)
    load_s = time.perf_counter() - t0
    try:
        res = measure(model, device=device, vocab=sm.spec.vocab, batch=args.batch, prefill_len=args.prefill_len,
                      prompt_len=args.prompt_len, new_tokens=args.new_tokens, warmup=args.warmup,
                      repeats=args.repeats, seed=args.seed)
    finally:
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return {"name": name, "dir": str(model_dir), "params": sm.params(),
            "non_embedding_params": sm.spec.non_embedding_params(sm.layers), "load_seconds": load_s, **res}


def bench_gguf(name: str, model_dir: Path, sm, args) -> dict:
    """The model as GGUF files (f16 and llama.cpp quantisations), each timed in llama.cpp."""
    import llamacpp_runtime as LR

    with tempfile.TemporaryDirectory(prefix="bench-gguf-", dir=args.work_dir) as tmp:
        files = LR.make_ggufs(model_dir, Path(tmp), [q for q in args.quants.split(",") if q])
        runs = {q: LR.measure_gguf(f, vocab=sm.spec.vocab, prefill_len=args.prefill_len, prompt_len=args.prompt_len,
                                   new_tokens=args.new_tokens, threads=args.threads or 2, warmup=args.warmup,
                                   repeats=args.repeats, seed=args.seed, extra_bufts=not args.no_extra_bufts)
                for q, f in files.items()}
    widths = [len(s.mlp) for s in sm.layers]
    return {"name": name, "dir": str(model_dir), "params": sm.params(),
            "non_embedding_params": sm.spec.non_embedding_params(sm.layers), "mlp_widths": widths, "gguf": runs}


# ---- main ----------------------------------------------------------------------------------------
def _pairs(items: list[str]) -> list[tuple[str, Path]]:
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--models takes NAME=DIR, got {item!r}")
        out.append((name, Path(path)))
    return out


def run(args) -> dict:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    formats = [f for f in args.formats.split(",") if f]
    if any(f not in FORMATS for f in formats):
        raise SystemExit(f"--formats takes {', '.join(FORMATS)}, got {args.formats!r}")
    deadline = time.perf_counter() + (args.deadline or math.inf)
    tmp = tempfile.TemporaryDirectory(prefix="bench-infer-") if args.shape and args.work_dir is None else None
    results = []
    if args.models:
        for name, path in _pairs(args.models):
            print(f"[model] {name}: {path}", file=sys.stderr)
            results.append(bench_model(name, path, args, device=device, dtype=dtype))
    else:
        work = Path(args.work_dir or tmp.name)
        parent = write_random_model(args.shape, work / args.shape, device=device, seed=args.seed)
        print(f"[model] parent: {parent}", file=sys.stderr)
        results.append({**bench_model("parent", parent, args, device=device, dtype=dtype), "sparsity": 0.0})
        default = auto_multiple_of(StreamedModel.open(parent).spec.intermediate)
        # a width alignment other than the CLI's is named in the variant (its speed differs: 0.59x against
        # 1.66x on the H200), so its rows never replace the default's
        multiple_of = default if args.multiple_of is None else args.multiple_of
        tag = f"-m{multiple_of}" if multiple_of != default else ""
        for s in [float(x) for x in args.sparsities.split(",") if x]:
            for fmt in formats:
                name = f"{fmt}-{round(100 * s)}{tag}"
                if time.perf_counter() > deadline:
                    print(f"[model] {name}: skipped, --deadline passed", file=sys.stderr)
                    continue
                out = work / f"{args.shape}-{name}"
                print(f"[model] {name}: pruning ({args.method}) and exporting to {out}", file=sys.stderr)
                made = make_variant(parent, out, sparsity=s, uniform=fmt == "uniform", method=args.method,
                                    device=device, seed=args.seed, multiple_of=multiple_of,
                                    gqa="equal" if fmt.endswith("gqa-equal") else "any")
                try:
                    results.append({**bench_model(name, out, args, device=device, dtype=dtype), "sparsity": s,
                                    "format": fmt, "method": args.method, **made})
                finally:
                    if not args.keep:
                        shutil.rmtree(out, ignore_errors=True)
    ref = results[0]
    for r in results:
        if args.runtime == "llama.cpp":
            r["params_fraction"] = r["non_embedding_params"] / ref["non_embedding_params"]
            for q, m in r["gguf"].items():
                m["prompt_speedup"] = m["prompt"]["tokens_per_s"] / ref["gguf"][q]["prompt"]["tokens_per_s"]
                m["generation_speedup"] = m["generation"]["tokens_per_s"] / ref["gguf"][q]["generation"]["tokens_per_s"]
                m["size_fraction"] = m["bytes"] / ref["gguf"][q]["bytes"]
            continue
        r["prefill_speedup"] = r["prefill"]["tokens_per_s"] / ref["prefill"]["tokens_per_s"]
        r["decode_speedup"] = ref["decode"]["ms_per_token"] / r["decode"]["ms_per_token"] \
            if r["decode"]["ms_per_token"] > 0 else None
        r["params_fraction"] = r["non_embedding_params"] / ref["non_embedding_params"]
    if tmp is not None:
        tmp.cleanup()
    return {
        "tool": "bench_infer", "hardware": BE.hardware(), "commit": BE.commit(),
        "settings": {"runtime": args.runtime, "quants": args.quants if args.runtime == "llama.cpp" else None,
                     "extra_bufts": not args.no_extra_bufts if args.runtime == "llama.cpp" else None,
                     "model": args.shape or "custom", "device": device, "dtype": str(dtype).replace("torch.", ""),
                     "batch": args.batch, "prefill_len": args.prefill_len, "prompt_len": args.prompt_len,
                     "new_tokens": args.new_tokens, "warmup": args.warmup, "repeats": args.repeats,
                     "method": args.method if args.shape else None, "seed": args.seed,
                     "multiple_of": args.multiple_of},
        "models": results,
    }


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--models", nargs="+", metavar="NAME=DIR", help="model directories; the first is the reference")
    src.add_argument("--shape", choices=sorted(SHAPES), help="random parent of this shape plus pruned variants")
    src.add_argument("--from-json", nargs="+", metavar="FILE", help="record earlier results (e.g. from a GPU machine)")
    ap.add_argument("--runtime", default="transformers", choices=["transformers", "llama.cpp"],
                    help="llama.cpp: export each model to GGUF (f16 + --quants) and time it in llama.cpp")
    ap.add_argument("--quants", default="f16,q8_0", help="--runtime llama.cpp: f16 and llama.cpp quantisations")
    ap.add_argument("--no-extra-bufts", action="store_true",
                    help="--runtime llama.cpp: load without llama.cpp's extra CPU buffer types (AMX, repacked "
                         "weights); for CPUs whose AMX kernels die with SIGILL (llamacpp_runtime.model_params)")
    ap.add_argument("--work-dir", default=None, help="where --shape writes the parent and variants (default: temp)")
    ap.add_argument("--sparsities", default="0.2,0.35,0.5")
    ap.add_argument("--formats", default="per-layer,uniform",
                    help="per-layer (free GQA groups), per-layer-gqa-equal (prune --gqa equal) and/or uniform exports")
    ap.add_argument("--method", default="random", choices=["random", "magnitude"])
    ap.add_argument("--multiple-of", type=int, default=None, metavar="N",
                    help="MLP widths a multiple of N (default: what `bonsai-lite prune` uses, prune/align.py)")
    ap.add_argument("--keep", action="store_true", help="keep the pruned variants on disk")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt of the decode measurement")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--trust-remote-code", action="store_true",
                    help="load per-layer exports' own modeling file (only a file inside the model directory)")
    ap.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                    help="make no new variant after this long (fits a device time limit)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    if not (args.models or args.shape or args.from_json):
        ap.error("give --models, --shape or --from-json")
    return args


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    if args.from_json:
        results = [json.loads(Path(f).read_text()) for f in args.from_json]
        if args.write_docs:
            for res in results:
                if res["settings"].get("runtime", "transformers") == "transformers":
                    write_infer_docs(res)
        return results
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    result["command"] = "python tools/bench_infer.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(json.dumps(result, indent=1))
    if args.write_docs and args.runtime == "transformers":
        write_infer_docs(result)
    return result


if __name__ == "__main__":
    main()
