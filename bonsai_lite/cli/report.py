"""`bonsai-lite report RUN_DIR`: per-iteration table, per-layer widths and their picture."""
from __future__ import annotations

from pathlib import Path

from bonsai_lite.cli.main import emit_json


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="what a prune run did, per iteration and per layer, with a widths plot")
    p.add_argument("run_dir", help="the run directory of a prune (OUT.run beside the output, or --run-dir)")
    p.add_argument("--plot", default=None, help="where to write the widths picture (default: RUN_DIR/widths.png)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object (last stdout line)")
    p.set_defaults(run=run)


def run(args) -> int:
    from bonsai_lite.report import PLOT_NAME, load_run, plot_widths, render

    rep = load_run(args.run_dir)
    rep["plot"] = None
    if not args.no_plot:
        drawn = plot_widths(rep, args.plot or Path(args.run_dir) / PLOT_NAME)
        rep["plot"] = str(drawn) if drawn else None
    if args.json:
        emit_json(rep)
    else:
        print(render(rep))
        print(f"\nplot: {rep['plot']}" if rep["plot"] else "\nplot: not drawn")
    return 0
