"""Decode speed of a per-layer export under two versions of its modeling file, on the same weights.

A change to `bonsai_lite/export_assets/modeling_bonsai.py` only reaches users through the file each
export ships. This copies one export twice, ships the file as it was at --baseline (a git revision)
in one copy and as it is now in the other, loads both with `trust_remote_code` (what a user runs)
and times greedy `generate` at batch 1 for each --prompts length, the two alternating so drift hits
both. ms per token is (time of N new tokens - time of 1) / (N - 1); the median of --repeats is the
figure, min and max beside it. Both must produce the same tokens. One JSON object on stdout
(kind "decode_ab"); --record writes it to docs/results/.

  python tools/decode_ab.py /tmp/inf/smollm2-135m-per-layer-50 --baseline d7e651c --prompts 256,1024,2048 \
      --record decode-ab-smollm2-s33.json
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from bench_engine import emit  # noqa: E402

MODELING = "bonsai_lite/export_assets/modeling_bonsai.py"


def greedy(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Exactly `new_tokens` greedy tokens after `ids` (a random model's EOS must not end it early)."""
    return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0, attention_mask=torch.ones_like(ids))


def ms_per_token(model, ids: torch.Tensor, new_tokens: int) -> float:
    t = time.perf_counter()
    greedy(model, ids, new_tokens)
    many = time.perf_counter() - t
    t = time.perf_counter()
    greedy(model, ids, 1)
    return (many - (time.perf_counter() - t)) / (new_tokens - 1) * 1e3


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a per-layer export (config.json with auto_map, safetensors)")
    ap.add_argument("--baseline", required=True, help="git revision whose modeling file is the reference")
    ap.add_argument("--prompts", default="256,1024,2048")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--record", default=None, help="file name under docs/results/")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    files = {"baseline": subprocess.run(["git", "show", f"{args.baseline}:{MODELING}"], cwd=ROOT, check=True,
                                        capture_output=True, text=True).stdout,
             "current": (ROOT / MODELING).read_text()}
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        for name, text in files.items():
            d = shutil.copytree(args.model, Path(tmp) / name, ignore=shutil.ignore_patterns("*.gguf"))
            (d / "modeling_bonsai.py").write_text(text)
            models[name] = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, dtype=torch.float32).eval()
        vocab = models["current"].config.vocab_size
        g = torch.Generator().manual_seed(0)
        results = {}
        with torch.no_grad():
            for p in [int(x) for x in args.prompts.split(",")]:
                ids = torch.randint(0, vocab, (1, p), generator=g)
                tokens = {k: greedy(m, ids, args.new_tokens) for k, m in models.items()}  # also the warm-up
                times = {k: [] for k in models}
                for _ in range(args.repeats):
                    for k, m in models.items():
                        times[k].append(ms_per_token(m, ids, args.new_tokens))
                row = {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v}
                       for k, v in times.items()}
                row["same_tokens"] = bool(torch.equal(tokens["baseline"], tokens["current"]))
                row["speedup"] = row["baseline"]["median"] / row["current"]["median"]
                results[str(p)] = row
                print(f"prompt {p}: baseline {row['baseline']['median']:.1f} ms/token, current "
                      f"{row['current']['median']:.1f} ({row['speedup']:.2f}x), same tokens {row['same_tokens']}",
                      file=sys.stderr)
    return emit({"kind": "decode_ab", "model": str(args.model), "baseline": args.baseline,
                 "settings": {"prompts": args.prompts, "new_tokens": args.new_tokens, "repeats": args.repeats,
                              "threads": args.threads, "dtype": "float32", "batch": 1},
                 "results": results}, "decode_ab.py", argv, args.record)


if __name__ == "__main__":
    main()
