"""Pictures: the demo's quality/speed vs size, a run's per-layer widths before and after, docs plots.

matplotlib is an optional extra (`pip install bonsai-lite[plots]`), never needed to prune: every
function here returns None and logs one line when it is missing. The Agg backend is used so no
display is needed and no window opens.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

MISSING = "matplotlib is not installed, so no plot was drawn (pip install 'bonsai-lite[plots]')"


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (logged) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        log.warning(MISSING)
        return None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


LEGEND_INSIDE = 5  # series a legend inside the axes can hold without covering the data


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def size_tradeoff(rows: list[dict], path: str | Path, *, title: str = "") -> Path | None:
    """Perplexity and decode tokens/s against file size; rows: name, bytes, perplexity, decode_tokens_per_s."""
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in ((axes[0], "perplexity", "perplexity (lower is better)"),
                           (axes[1], "decode_tokens_per_s", "decode tokens/s (higher is better)")):
        xs = [r["bytes"] / 1e6 for r in rows]
        ys = [r[key] for r in rows]
        ax.plot(xs, ys, color="0.75", zorder=1)
        for r, x, y in zip(rows, xs, ys):
            ax.scatter([x], [y], s=40, zorder=2)
            ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
        ax.set_xlabel("size on disk (MB)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, plt, path)


def layer_widths(before: dict, after: dict, path: str | Path, *, title: str = "") -> Path | None:
    """Heads and MLP units per layer, parent outline against the pruned bars; dicts of `heads`, `mlp` lists."""
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
    layers = list(range(len(before["heads"])))
    for ax, kind, label in ((axes[0], "heads", "query heads"), (axes[1], "mlp", "MLP units")):
        ax.bar(layers, before[kind], color="none", edgecolor="0.5", label="parent")
        ax.bar(layers, after[kind], color="tab:green", alpha=0.8, label="pruned")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    axes[1].set_xlabel("layer")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, plt, path)


def lines(series: dict[str, list[tuple[float, float]]], path: str | Path, *, xlabel: str, ylabel: str,
          title: str = "", logx: bool = False) -> Path | None:
    """One line per named series of (x, y) points (docs plots)."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name, pts in series.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if logx:
        ax.set_xscale("log")
    return _finish(fig, ax, plt, path, xlabel=xlabel, ylabel=ylabel, title=title)


def scatter(series: dict[str, list[tuple[float, float]]], path: str | Path, *, xlabel: str, ylabel: str,
            title: str = "") -> Path | None:
    """Named point clouds on log-log axes with the y = x diagonal (predicted against measured)."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    allv = [v for pts in series.values() for p in pts for v in p if v > 0]
    for name, pts in series.items():
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=18, label=name)
    if allv:
        lo, hi = min(allv) / 1.5, max(allv) * 1.5
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    return _finish(fig, ax, plt, path, xlabel=xlabel, ylabel=ylabel, title=title)


def _finish(fig, ax, plt, path, *, xlabel: str, ylabel: str, title: str) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    n = len(ax.get_legend_handles_labels()[1])
    if n > LEGEND_INSIDE:  # below the axes, two columns, where it hides no point
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
        fig.set_figheight(fig.get_figheight() + 0.22 * -(-n // 2))
    else:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, plt, path)


def is_png(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"
