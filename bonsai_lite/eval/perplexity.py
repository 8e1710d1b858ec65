"""Streamed perplexity: exp(mean token NLL) over non-overlapping windows of a text file."""
from __future__ import annotations

import math
from pathlib import Path

from bonsai_lite.calib.data import check_window_args, load_tokenizer, read_text, tokenize, windows
from bonsai_lite.io.model import StreamedModel
from bonsai_lite.search.engine import evaluate
from bonsai_lite.search.machine import detect_machine
from bonsai_lite.search.planner import Work, make_plan


def perplexity(model_dir: str | Path, *, text: str | Path, seq_len: int, max_tokens: int | None = None,
               skip_tokens: int = 0, budget: int | None = None, device: str | None = None, dtype: str | None = None,
               spill_dir=None, log=None) -> dict:
    """`max_tokens` tokens of `text` from token `skip_tokens` on: `skip_tokens` = the tokens a
    setting was chosen on gives a held-out slice of the same file."""
    check_window_args(seq_len, max_tokens, skip_tokens)  # before any work
    model = StreamedModel.open(model_dir)
    ids = tokenize(load_tokenizer(model_dir), read_text(text))
    win = windows(ids, seq_len, max_tokens=max_tokens, skip_tokens=skip_tokens)
    machine = detect_machine(device=device, budget=budget, spill_dir=spill_dir, checkpoint=model_dir)
    plan = make_plan(model.spec, model.layers, Work(1, win.shape[0], seq_len), machine, dtype=dtype)
    if log:
        log(plan.describe())
    res = evaluate(model, win, None, plan, spill_dir=spill_dir)
    nll = res.row_nll[0].mean().item()  # every window predicts seq_len - 1 tokens: equal weights
    return {
        "perplexity": math.exp(nll),
        "nll": nll,
        "tokens": int(win.numel()),
        "windows": int(win.shape[0]),
        "seq_len": seq_len,
        "skip_tokens": skip_tokens,
        "params": model.params(),
        "seconds": res.stats.seconds,
        "plan": plan.to_json(),
    }
