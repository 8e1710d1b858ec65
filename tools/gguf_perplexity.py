"""llama.cpp's perplexity on a GGUF export against `bonsai-lite eval` on the safetensors export.

Both score the same token windows: the model directory's tokenizer over the text file, the first
--max-tokens tokens cut into non-overlapping --seq-len windows (bonsai_lite.calib.data.windows),
every window scored from an empty KV cache, each predicting its last seq_len - 1 tokens. Prints
one JSON object (hardware, commit, settings, both perplexities, their relative difference).

  python tools/gguf_perplexity.py PRUNED_DIR PRUNED.gguf --data wikitext2-raw-test.txt \\
      --max-tokens 16384 --seq-len 512 --out docs/results/gguf_perplexity_smollm2_35.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bonsai_lite.calib.data import load_tokenizer, read_text, tokenize, windows  # noqa: E402
from bonsai_lite.eval.perplexity import perplexity  # noqa: E402

GGML_TYPE_F32 = 0


def llama_cpp_nll(gguf: Path, win: torch.Tensor, *, threads: int, f32_cache: bool) -> float:
    import llama_cpp

    seq = win.shape[1]
    kw = dict(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32) if f32_cache else {}
    llm = llama_cpp.Llama(str(gguf), n_ctx=seq, n_batch=seq, n_ubatch=seq, logits_all=True, verbose=False,
                          n_threads=threads, n_threads_batch=threads, **kw)
    total = 0.0
    try:
        for row in win.tolist():
            llm.reset()
            llm.eval(row)
            logits = np.asarray(llm.scores[: seq - 1], dtype=np.float64)
            m = logits.max(-1, keepdims=True)
            logz = (m[:, 0] + np.log(np.exp(logits - m).sum(-1)))
            total += float((logz - logits[np.arange(seq - 1), row[1:]]).mean())
    finally:
        llm.close()
    return total / win.shape[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("gguf")
    p.add_argument("--data", required=True)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--f16-cache", action="store_true", help="llama.cpp's default f16 KV cache (default: f32)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    win = windows(tokenize(load_tokenizer(args.model_dir), read_text(args.data)), args.seq_len,
                  max_tokens=args.max_tokens)
    t0 = time.perf_counter()
    ours = perplexity(args.model_dir, text=args.data, seq_len=args.seq_len, max_tokens=args.max_tokens, device="cpu")
    t1 = time.perf_counter()
    nll = llama_cpp_nll(Path(args.gguf), win, threads=args.threads, f32_cache=not args.f16_cache)
    t2 = time.perf_counter()
    ppl = math.exp(nll)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    out = {
        "hardware": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                     "threads": args.threads},
        "commit": commit,
        "settings": {"model_dir": args.model_dir, "gguf": args.gguf, "gguf_bytes": Path(args.gguf).stat().st_size,
                     "data": Path(args.data).name, "seq_len": args.seq_len, "max_tokens": args.max_tokens,
                     "windows": int(win.shape[0]), "kv_cache": "f16" if args.f16_cache else "f32"},
        "bonsai_lite_eval": {"perplexity": ours["perplexity"], "seconds": t1 - t0},
        "llama_cpp": {"perplexity": ppl, "seconds": t2 - t1},
        "relative_difference": ppl / ours["perplexity"] - 1,
    }
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
