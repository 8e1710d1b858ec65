"""`bonsai-lite eval`: streamed perplexity of a model directory on a text file."""
from __future__ import annotations

import logging

from bonsai_lite.cli.common import add_budget_args
from bonsai_lite.cli.main import emit_json
from bonsai_lite.eval.perplexity import perplexity
from bonsai_lite.progress import process_peak_rss_bytes
from bonsai_lite.search.machine import parse_bytes

log = logging.getLogger("bonsai_lite.eval")


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity over non-overlapping windows of a text file, streamed block by block")
    p.add_argument("model_dir")
    p.add_argument("--data", required=True, help="text file (read whole, tokenised once)")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--max-tokens", type=int, default=None,
                   help="only the first T tokens of the file (of what follows --skip-tokens)")
    p.add_argument("--skip-tokens", type=int, default=0,
                   help="start after the first S tokens: e.g. a held-out slice, past the tokens a setting was chosen on")
    add_budget_args(p)
    p.set_defaults(run=run)


def run(args) -> int:
    budget = parse_bytes(args.memory_budget) if args.memory_budget else None
    out = perplexity(args.model_dir, text=args.data, seq_len=args.seq_len, max_tokens=args.max_tokens,
                     skip_tokens=args.skip_tokens, budget=budget, device=args.device, dtype=args.dtype,
                     spill_dir=args.spill_dir, log=log.info)
    log.info("perplexity %.4f over %d tokens (seq %d) in %.1f s", out["perplexity"], out["tokens"], out["seq_len"],
             out["seconds"])
    if args.json:  # the process's own peak: rusage of a child exec'd from a large process inherits its RSS
        emit_json({**out, "peak_rss_bytes": process_peak_rss_bytes()})
    return 0
