"""Arguments shared by subcommands."""
from __future__ import annotations

import argparse


def add_budget_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory-budget", default=None,
                   help="memory the run may use, e.g. 8GB: the GPU's memory on CUDA, RAM on a CPU run "
                        "(default: all free device memory / 70%% of free RAM)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute precision (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--spill-dir", default=None, help="where to spill hidden states when they do not fit in memory")
    add_output_args(p)


def add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line (no bars)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings and errors only")


def show_progress(args) -> bool:
    """Bars only for a person watching: never with --json or --quiet (stdout stays machine-readable)."""
    return not (getattr(args, "json", False) or getattr(args, "quiet", False))
