"""`bonsai-lite adapt`: LoRA (or full) fine-tuning of a pruned model with cached-teacher distillation."""
from __future__ import annotations

import logging
from pathlib import Path

from bonsai_lite.cli.common import add_budget_args, show_progress
from bonsai_lite.cli.main import emit_json
from bonsai_lite.progress import step_bar
from bonsai_lite.search.machine import parse_bytes

log = logging.getLogger("bonsai_lite.adapt")


def add_parser(sub) -> None:
    p = sub.add_parser("adapt", help="fine-tune a pruned model (LoRA + distillation from cached parent logits), "
                                     "merge and export it")
    p.add_argument("pruned_dir")
    p.add_argument("--parent", default=None, help="the parent model directory (the teacher; needed when distilling)")
    p.add_argument("--data", required=True, help="adaptation text file (read whole, tokenised once, cut into windows)")
    p.add_argument("--out", required=True, help="output model directory (written atomically)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: one pass over the data)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=None, help="only the first T tokens of --data")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (paper Table 10: 1e-4)")
    p.add_argument("--rank", type=int, default=128, help="LoRA rank (paper Table 10: 128)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 4 x rank, paper Table 10)")
    p.add_argument("--distill-weight", type=float, default=0.01,
                   help="lambda of the KL(pruned || parent) term (paper Table 10: 0.01; 0 = plain fine-tuning)")
    p.add_argument("--top-k", type=int, default=64, help="teacher logits cached per token")
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA (when it fits)")
    p.add_argument("--save-every", type=int, default=100, help="commit the resumable run state every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow loading a modeling file shipped in the directory that is not the one this version of "
                        "bonsai-lite writes (its own per-layer exports load without this flag)")
    p.add_argument("--teacher-cache", default=None, help="teacher cache directory (default: OUT.run/teacher)")
    p.add_argument("--run-dir", default=None, help="resumable run state (default: OUT.run beside the output)")
    p.add_argument("--restart", action="store_true", help="discard an existing training state and start over")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    add_budget_args(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from bonsai_lite.adapt.train import AdaptConfig, adapt

    cfg = AdaptConfig(
        pruned=str(Path(args.pruned_dir).resolve()), out=str(Path(args.out).resolve()), data=args.data,
        parent=str(Path(args.parent).resolve()) if args.parent else None, seq_len=args.seq_len,
        max_tokens=args.max_tokens, batch_size=args.batch_size, max_steps=args.max_steps, lr=args.lr, rank=args.rank,
        alpha=args.alpha, distill_weight=args.distill_weight, top_k=args.top_k, full=args.full,
        save_every=args.save_every, seed=args.seed,
        budget=parse_bytes(args.memory_budget) if args.memory_budget else None, device=args.device, dtype=args.dtype,
        trust_remote_code=args.trust_remote_code, teacher_cache=args.teacher_cache, spill_dir=args.spill_dir)
    bar = step_bar("adapt") if show_progress(args) else None
    try:
        result = adapt(cfg, run_dir=args.run_dir, restart=args.restart, overwrite=args.overwrite, progress=bar)
    finally:
        if bar:
            bar(close=True)
    log.info("adapted %s -> %s: %d steps, train loss %.4f in %.0f s", cfg.pruned, result["out"], result["steps"],
             result["train_loss"] if result["train_loss"] is not None else float("nan"), result["seconds"])
    if args.json:
        emit_json(result)
    return 0
