"""What a pruning run did, read back from its run directory: per iteration and per layer.

Reads `state.json` (the run state: settings, per-iteration history, final widths) and, when
present, `metrics.jsonl` (stage timings); needs neither the model nor the calibration text. The
parent's widths are the final widths plus everything the iterations removed, so a run directory is
enough on its own. Runs made before per-layer removals were recorded report totals only.
"""
from __future__ import annotations

import json
from pathlib import Path

from bonsai_lite.errors import BonsaiError
from bonsai_lite.progress import METRICS_NAME, read_metrics

STATE = "state.json"
PLOT_NAME = "widths.png"


def load_run(run_dir: str | Path) -> dict:
    """The run's settings, history, widths before/after and stage metrics as one JSON-able dict."""
    run_dir = Path(run_dir)
    try:
        meta = json.loads((run_dir / STATE).read_text())["meta"]
    except FileNotFoundError:
        raise BonsaiError(f"{run_dir}: no {STATE} here; pass the run directory of a prune "
                          "(OUT.run or --run-dir)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BonsaiError(f"{run_dir}/{STATE} is unreadable ({e.__class__.__name__})") from e
    history = meta.get("history") or []
    layers = meta.get("layers")
    after = before = None
    if layers:
        after = {"heads": [len(s["heads"]) for s in layers], "mlp": [len(s["mlp"]) for s in layers]}
        if all("removed_heads" in h for h in history):
            before = {k: [a + sum(h[f"removed_{k}"][l] for h in history) for l, a in enumerate(after[k])]
                      for k in ("heads", "mlp")}
    metrics = read_metrics(run_dir / METRICS_NAME)
    cfg = meta.get("config", {})
    return {"run_dir": str(run_dir), "model": cfg.get("model"), "search": cfg.get("search", {}),
            "calib": cfg.get("calib", {}), "iterations_done": meta.get("iteration", 0), "history": history,
            "widths_before": before, "widths_after": after, "stage_seconds": _stage_seconds(metrics)}


def _stage_seconds(metrics: list[dict]) -> dict:
    """{iteration: {stage: seconds}} summed over the metrics lines (a resumed stage appears twice)."""
    out: dict = {}
    for m in metrics:
        if m.get("stage") in (None, "iteration"):
            continue
        it = str(m.get("iteration", "-"))
        out.setdefault(it, {})
        out[it][m["stage"]] = out[it].get(m["stage"], 0.0) + float(m.get("seconds") or 0.0)
    return out


def render(run: dict) -> str:
    """Plain-text tables: settings, one row per iteration, one row per layer."""
    s, hist = run["search"], run["history"]
    lines = [f"run {run['run_dir']}: {s.get('method')} to {s.get('sparsity')} sparsity of {run['model']}, "
             f"{run['iterations_done']} iteration(s) done"]
    lines += ["", f"{'iter':>4} {'removed':>8} {'heads':>6} {'mlp':>6} {'dense loss':>11} {'sub-model loss':>16} "
              f"{'tau':>6} {'params left':>12} {'seconds':>8}  stages"]
    for h in hist:
        it = h.get("iteration", 0)
        sub = f"{h['loss_mean']:.3f}+-{h['loss_std']:.3f}" if h.get("loss_mean") is not None else "-"
        tau = f"{h['cv_kendall_tau']:.2f}" if h.get("cv_kendall_tau") is not None else "-"
        heads = sum(h["removed_heads"]) if "removed_heads" in h else "-"
        mlp = sum(h["removed_mlp"]) if "removed_mlp" in h else "-"
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in run["stage_seconds"].get(str(it), {}).items())
        lines.append(f"{it + 1:>4} {h['removed_units']:>8} {heads:>6} {mlp:>6} {h['dense_nll']:>11.3f} {sub:>16} "
                     f"{tau:>6} {h['params_non_embedding'] / 1e6:>11.2f}M {h['seconds']:>8.0f}  {stages}")
    b, a = run["widths_before"], run["widths_after"]
    if a:
        lines += ["", "per layer, heads and MLP units " + ("parent -> pruned" if b else "kept (parent unknown)")]
        lines.append(f"{'layer':>5} {'heads':>9} {'mlp':>13}")
        per_it = len(hist) > 1 and b is not None
        if per_it:
            lines[-1] += "   removed per iteration (heads / mlp)"
        for l in range(len(a["heads"])):
            if b:
                steps = "   " + "  ".join(f"{h['removed_heads'][l]}/{h['removed_mlp'][l]}" for h in hist) if per_it else ""
                lines.append(f"{l:>5} {b['heads'][l]:>3} -> {a['heads'][l]:<3} {b['mlp'][l]:>5} -> {a['mlp'][l]:<5}{steps}")
            else:
                lines.append(f"{l:>5} {a['heads'][l]:>9} {a['mlp'][l]:>13}")
    other = run["stage_seconds"].get("-")
    if other:
        lines += ["", "after the search: " + ", ".join(f"{k} {v:.0f} s" for k, v in other.items())]
    return "\n".join(lines)


def plot_widths(run: dict, path: str | Path) -> Path | None:
    """The per-layer widths before and after (None when matplotlib or the parent widths are missing)."""
    from bonsai_lite.plots import layer_widths

    if not run["widths_before"] or not run["widths_after"]:
        return None
    s = run["search"]
    title = f"{Path(run['model'] or '').name}: {s.get('method')} at {s.get('sparsity')}"
    return layer_widths(run["widths_before"], run["widths_after"], path, title=title)
