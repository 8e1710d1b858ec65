"""Tables and plots from the quality records in docs/results/ (written by tools/bench_quality.py).

`render(records)` returns the markdown that goes between `<!-- bench_quality:begin -->` and
`<!-- bench_quality:end -->` in docs/RESULTS.md; `plots(records, out_dir)` draws perplexity vs
sparsity and perplexity vs prune compute (matplotlib, optional: `pip install -e .[plots]`).
Nothing here computes a result: every figure is a mean, spread or count over the records.

  python tools/render_quality.py            # same as tools/bench_quality.py --render
"""
from __future__ import annotations

import json
import math
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "RESULTS.md"
IMG = ROOT / "docs" / "img"
RESULTS_DIR = ROOT / "docs" / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from bench_quality import VARIANTS  # noqa: E402
from bonsai_lite.config import PRESETS, auto_first_step  # noqa: E402

BLOCK = "bench_quality"
BEGIN, END = f"<!-- {BLOCK}:begin -->", f"<!-- {BLOCK}:end -->"
TARGET_SEEDS = 3
# (settings key, variant name) of the settings a preset sets: the ones that set a run's compute
COMPUTE_SETTINGS = tuple((field, name) for name, (field, _, where) in VARIANTS.items() if where == "preset")
# the refit's windows are in the row's label (`+refit(128)`), not a variant: `--refit-samples auto` picks
# them per run from memory and time, so no one count is "the default"
LABELLED = {"refit_samples"}
# records with the refit that do not say its windows ran bench_quality's count before 2026-12-02
LEGACY_REFIT_SAMPLES = 32


def load_records(results_dir: Path = RESULTS_DIR) -> list[dict]:
    out = []
    for path in sorted(Path(results_dir).glob("*.json")):
        rec = json.loads(path.read_text())
        if rec.get("kind") == "quality":
            out.append({**rec, "file": path.name})
    return out


def label(r: dict) -> str:
    """Method as shown: with the prior when a search method ran on a non-default one, and "+comp"
    when the run compensated (defaults changed between commits, so the settings in each record, not
    the variant name, say what ran)."""
    settings = r.get("settings", {})
    parts = []
    if r["method"].startswith("bonsai"):
        parts.append(f"{settings.get('prior', 'wanda')} prior")  # the default changed: always say which
        if settings.get("candidates", "layer") != "layer":
            parts.append(f"{settings['candidates']} candidates")
        if settings.get("regression", "unit") != "unit":
            parts.append(f"regression {settings['regression']}")
        elif settings.get("rank", "relevance") != "relevance":
            parts.append(f"rank {settings['rank']}")
            if settings.get("cv_scope", "all") != "all":
                parts.append(f"cv {settings['cv_scope']}")
        if settings.get("prior_memory"):
            parts.append(f"prior memory {settings['prior_memory']:g}")
        if settings.get("allocation", "prior") != "prior":
            parts.append(f"allocation {settings['allocation']}")
    shown = f" [{', '.join(parts)}]" if parts else ""
    residual = " +residual" if settings.get("fluctuation", "variance") == "residual" else ""
    refit = {"off": "", "ls": " +refit", "loop": " +refit loop"}[settings.get("refit", "off")]
    if refit:
        refit += f"({settings.get('refit_samples', LEGACY_REFIT_SAMPLES)})"
    return r["method"] + shown + (" +comp" if r.get("compensate") else "") + residual + refit


def _variant(r: dict) -> str:
    """The variant beyond what `label` shows (compensation, prior, its memory, regression and rank are in
    the label).

    The compute settings are read from the record against the preset as defined now, not from the
    variant name: a preset's definition may change between commits, and its older rows then show
    as the variant they are (e.g. `prior_samples=0` after `quick` gained its dense pass).

    The first step is likewise read against what `--first-step auto` resolves to for the record's
    settings: a run that set it to that value is the default, a default run from before it resolved
    so is the variant it now is."""
    shown = ("compensate=", "prior=", "rank=", "regression=", "candidates=", "cv_scope=", "refit=", "fluctuation=",
             "prior_memory=", "allocation=")
    named = tuple(f"{name}=" for _, name in COMPUTE_SETTINGS) + ("first_step=",)
    parts = [p for p in r.get("variant", "").split("+") if p and not p.startswith(shown + named)]
    preset, settings = PRESETS.get(r.get("preset"), {}), r.get("settings", {})
    first = settings.get("first_step", 0.0)
    if isinstance(first, (int, float)) and first != _auto_first_step(r):
        parts.append(f"first_step={first:g}")
    parts += [f"{name}={settings[key]:g}" for key, name in COMPUTE_SETTINGS
              if key in settings and key not in LABELLED and key in preset and settings[key] != preset[key]]
    return "+".join(parts)


def _auto_first_step(r: dict) -> float:
    s = r.get("settings", {})
    if "p_iter" not in s:
        return 0.0
    return auto_first_step(r["method"], s.get("regression", "unit"), s.get("prior", "wanda"),
                           s.get("fluctuation", "variance"), s["p_iter"], r["sparsity"])


def aggregate(records: list[dict]) -> dict[tuple, dict]:
    """(model, preset, method, sparsity, variant) -> mean/spread over seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if r["method"] != "parent":
            groups[(r["model"], r["preset"], label(r), r["sparsity"], _variant(r))].append(r)
    out = {}
    for key, rs in groups.items():
        rs = list({r["seed"]: r for r in reversed(rs)}.values())  # one run per seed (a variant may equal the default)
        ppl = [r["perplexity"] for r in rs]
        out[key] = {
            "n": len(rs), "seeds": sorted(r["seed"] for r in rs), "mean": statistics.fmean(ppl),
            "std": statistics.stdev(ppl) if len(ppl) > 1 else float("nan"), "min": min(ppl), "max": max(ppl),
            "prune_seconds": statistics.fmean(r["prune_seconds"] for r in rs),
            "resumed": any(r.get("prune_resumed") for r in rs),
            "forward_tokens": statistics.fmean(r["forward_tokens"] for r in rs),
            "eval_tokens": sorted({r["eval_tokens"] for r in rs}), "seq_len": sorted({r["seq_len"] for r in rs}),
            "commits": sorted({r["commit"] for r in rs}), "compensate": sorted({bool(r.get("compensate")) for r in rs}),
        }
    return out



def method_of(key: tuple) -> str:
    """The method a row belongs to (`bonsai`, `flap`, `wanda-sp`), whatever its configuration."""
    return key[2].split(" ")[0]


def seeds_needed(agg: dict) -> int:
    """Seeds a row needs to count on the frontier: the target, or fewer while no row has that many."""
    return min(TARGET_SEEDS, max((v["n"] for v in agg.values()), default=TARGET_SEEDS))


def frontier(agg: dict, sparsity: float, method: str, seeds: int = TARGET_SEEDS) -> list[tuple[float, dict, tuple]]:
    """The method's quality-per-compute frontier at one sparsity: its rows with `seeds` seeds or more
    (either preset, any variant) that are lower than every row of it spending no more forward
    tokens, cheapest first, as (forward tokens, aggregate, key)."""
    rows = sorted(((v["forward_tokens"], v["mean"], k) for k, v in agg.items()
                   if k[3] == sparsity and method_of(k) == method and v["n"] >= seeds))
    out, best = [], math.inf
    for tokens, mean, k in rows:
        if mean < best:
            out.append((tokens, agg[k], k))
            best = mean
    return out


def _at(points: list, tokens: float) -> dict | None:
    """The frontier's row at a compute: the lowest row spending no more than `tokens`."""
    below = [v for t, v, _ in points if t <= tokens]
    return below[-1] if below else None


def _lowest_at(fronts: dict[str, list], method: str, tokens: float) -> bool:
    """Whether `method`'s frontier is at or below every other method's at this compute."""
    mine = _at(fronts[method], tokens)
    if mine is None:
        return False
    others = (_at(pts, tokens) for m, pts in fronts.items() if m != method)
    return all(o is None or mine["mean"] <= o["mean"] for o in others)


def crossover(fronts: dict[str, list], method: str = "bonsai") -> float | None:
    """The fewest forward tokens from which `method`'s frontier is at or below every other method's
    at every larger compute measured (None when it never is)."""
    if not fronts.get(method):
        return None
    start = None
    for tokens in sorted({t for pts in fronts.values() for t, _, _ in pts}, reverse=True):
        if not _lowest_at(fronts, method, tokens):
            break
        start = tokens
    return start


def _f(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def _spread(a: dict) -> str:
    return f"{_f(a['std'])} ({_f(a['min'])}-{_f(a['max'])})" if a["n"] > 1 else "one seed"


def render(records: list[dict]) -> str:
    agg = aggregate(records)
    parents = [r for r in records if r["method"] == "parent"]
    lines = []
    hw = sorted({(r["hardware"]["cpu"], r["hardware"]["cores"], r["hardware"].get("gpu")) for r in records})
    lines.append("Hardware: " + "; ".join(f"{c} ({n} cores{', GPU ' + g if g else ''})" for c, n, g in hw)
                 + f". Records: {len(records)} files in `docs/results/` (commits "
                 + ", ".join(sorted({r['commit'] for r in records})) + ").")
    lines.append("")
    for p in parents:
        lines.append(f"Parent ({p['model']}): perplexity **{p['perplexity']:.2f}** on the first {p['eval_tokens']:,} "
                     f"test tokens at seq {p['seq_len']} ({p['eval_windows']} windows; the full-file figure is 21.97).")
    lines.append("")
    presets = sorted({k[1] for k in agg})
    for preset in presets:
        main = {k: v for k, v in agg.items() if k[1] == preset and not k[4]}
        if not main:
            continue
        lines += [f"### Preset `{preset}`: mean perplexity over seeds", "",
                  "| sparsity | method | seeds | mean ppl | std (min-max) | gap to next / larger std | prune s | forward tokens |",
                  "| --- | --- | --- | ---: | --- | --- | ---: | ---: |"]
        for sp in sorted({k[3] for k in main}):
            rows = sorted(((k, v) for k, v in main.items() if k[3] == sp), key=lambda kv: kv[1]["mean"])
            # bold: the lowest mean among rows with the full seed count (a lucky single seed is no winner)
            best = next((k for k, v in rows if v["n"] >= TARGET_SEEDS), None)
            for i, (k, v) in enumerate(rows):
                gap = "-"
                if i + 1 < len(rows):
                    nxt = rows[i + 1][1]
                    spread = max((x for x in (v["std"], nxt["std"]) if not math.isnan(x)), default=float("nan"))
                    gap = f"{_f(nxt['mean'] - v['mean'])} / {_f(spread)}"
                name = f"**{k[2]}**" if k == best else k[2]
                lines.append(f"| {sp:.2f} | {name} | {v['n']} ({','.join(map(str, v['seeds']))}) | {_f(v['mean'])} | "
                             f"{_spread(v)} | {gap} | {_seconds(v)} | {v['forward_tokens']:,.0f} |")
        lines.append("")
        if any(v["resumed"] for v in main.values()):
            lines += [RESUMED_NOTE, ""]
        ab = {k: v for k, v in agg.items() if k[1] == preset and k[4]}
        if ab:
            lines += [f"Ablations, preset `{preset}`: each against its reference, the same method and settings "
                      "without the variant's first setting (the default row when that is its only one, or when "
                      "no run has the rest of its settings alone: marked), on the same seeds:", "",
                      "| sparsity | method | variant | seeds | mean ppl (variant) | std (min-max) | "
                      "mean ppl (reference, same seeds) | prune s | forward tokens |",
                      "| --- | --- | --- | --- | ---: | --- | ---: | ---: | ---: |"]
            for k, v in sorted(ab.items(), key=lambda kv: (kv[0][4], kv[0][3], kv[0][2])):
                base, fallback = reference_seeds(records, k, v["seeds"])
                seen = "" if len(base) == v["n"] else f" ({len(base)} of {v['n']} seeds)"
                seen += " (default row)" if fallback and base else ""
                lines.append(f"| {k[3]:.2f} | {k[2]} | {k[4]} | {v['n']} ({','.join(map(str, v['seeds']))}) | "
                             f"{_f(v['mean'])} | {_spread(v)} | "
                             f"{_f(statistics.fmean(base.values())) + seen if base else '-'} | "
                             f"{_seconds(v)} | {v['forward_tokens']:,.0f} |")
            lines.append("")
            if any(v["resumed"] for v in ab.values()):
                lines += [RESUMED_NOTE, ""]
        short = [f"{k[2]} @ {k[3]:.2f}{' ' + k[4] if k[4] else ''} ({v['n']}/{TARGET_SEEDS})"
                 for k, v in sorted(agg.items()) if k[1] == preset and v["n"] < TARGET_SEEDS]
        if short:
            lines += [f"Fewer than {TARGET_SEEDS} seeds so far: " + ", ".join(short) + ".", ""]
    lines += frontier_section(agg)
    if (IMG / "quality-sparsity.png").exists() or _have_matplotlib():
        lines += ["![perplexity vs sparsity](img/quality-sparsity.png)",
                  "![perplexity vs prune compute](img/quality-compute.png)"]
    return "\n".join(lines).rstrip()


def frontier_section(agg: dict) -> list[str]:
    """Each method's quality-per-compute frontier (both presets, rows with the full seed count) and
    where Bonsai's is at or below every baseline's."""
    methods = sorted({method_of(k) for k in agg if method_of(k) != "parent"})
    need = seeds_needed(agg)
    configs = {m: sum(1 for k, v in agg.items() if method_of(k) == m and v["n"] >= need) for m in methods}
    lines = ["### Quality per compute: each method's frontier", "",
             f"Every row of a method with {need} seeds, either preset, any variant, that is lower than each "
             "of its rows spending no more forward tokens (perplexity vs forward tokens, the plot below). "
             "Configurations with the full seed count: "
             + ", ".join(f"{m} {configs[m]}" for m in methods) + ". A frontier drawn from more configurations "
             "is picked from more tries on the same evaluation tokens, which favours it by about the seeds' "
             "spread; the gaps that matter are the ones larger than that.", "",
             "| sparsity | method | forward tokens | mean ppl | std (min-max) | row |",
             "| --- | --- | ---: | ---: | --- | --- |"]
    notes = []
    for sp in sorted({k[3] for k in agg}):
        fronts = {m: frontier(agg, sp, m, need) for m in methods}
        for m in methods:
            for tokens, v, k in fronts[m]:
                lines.append(f"| {sp:.2f} | {m} | {tokens:,.0f} | {_f(v['mean'])} | {_spread(v)} | "
                             f"{k[2]} ({k[1]}{', ' + k[4] if k[4] else ''}) |")
        start = crossover(fronts)
        if start is None:
            notes.append(f"- {sp:.2f}: Bonsai's frontier is not at or below every baseline's at the largest "
                         "compute measured.")
            continue
        mine = _at(fronts["bonsai"], start)
        rivals = [(o["mean"], m) for m in methods if m != "bonsai" for o in [_at(fronts[m], start)] if o]
        best = min(rivals) if rivals else None
        notes.append(f"- {sp:.2f}: from {start:,.0f} forward tokens on, Bonsai's frontier is at or below every "
                     f"baseline's ({_f(mine['mean'])} there" + (f" against {best[1]}'s {_f(best[0])}" if best else "")
                     + ").")
    return lines + ["", "Where Bonsai's frontier is at or below every baseline's at that compute and beyond:", "",
                    *notes, ""]


def reference_seeds(records: list[dict], key: tuple, seeds) -> tuple[dict, bool]:
    """{seed: perplexity} of an ablation row's reference, and whether it is the default row in place of
    the variant without its first setting (a joint change such as p_iter=0.025+prior_samples=8, whose
    second setting alone never ran)."""
    rest = "+".join(key[4].split("+")[1:])
    for variant, fallback in ((rest, False), ("", True)):
        base = {r["seed"]: r["perplexity"] for r in records if (r["model"], r["preset"], label(r), r["sparsity"])
                == key[:4] and _variant(r) == variant and r["seed"] in seeds}
        if base or not rest:
            return base, fallback and bool(rest)
    return {}, False


RESUMED_NOTE = ("`*` prune s: at least one seed resumed its run directory, and its seconds count only what ran "
                "then (for the `+refit` rows, which re-exported a finished search with the refit: the refit and "
                "the export); forward tokens count the whole run.")


def _seconds(v: dict) -> str:
    return f"{v['prune_seconds']:.0f}{'*' if v['resumed'] else ''}"


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plots(records: list[dict], out_dir: Path = IMG) -> list[Path]:
    """perplexity vs sparsity (each method's lowest row per preset, min-max over seeds) and perplexity
    vs forward tokens spent by the prune (each method's frontier over all its rows, the rows faint)."""
    if not _have_matplotlib():
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(records)
    out_dir.mkdir(parents=True, exist_ok=True)
    parent = next((r["perplexity"] for r in records if r["method"] == "parent"), None)
    methods = sorted({method_of(k) for k in agg})
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(methods)}
    markers = {m: "osD^v<>"[i % 7] for i, m in enumerate(methods)}
    need = seeds_needed(agg)
    full = {k: v for k, v in agg.items() if v["n"] >= need}
    written = []

    # perplexity vs sparsity: each method's lowest row per preset (any variant), min-max over seeds
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for m in methods:
        for preset in sorted({k[1] for k in full if method_of(k) == m}):
            best = {}
            for k, v in full.items():
                if method_of(k) == m and k[1] == preset and (k[3] not in best or v["mean"] < best[k[3]]["mean"]):
                    best[k[3]] = v
            xs = sorted(best)
            ys = [best[x]["mean"] for x in xs]
            err = [[y - best[x]["min"] for x, y in zip(xs, ys)], [best[x]["max"] - y for x, y in zip(xs, ys)]]
            ax.errorbar(xs, ys, yerr=err, marker=markers[m], capsize=3, color=colors[m], label=f"{m} ({preset})",
                        ls="-" if preset == "standard" else "--")
    if parent:
        ax.axhline(parent, color="grey", ls=":", label="parent")
    ax.set(xlabel="sparsity (non-embedding parameters removed)", ylabel="perplexity (WikiText-2 test)", yscale="log",
           title=f"each method's lowest row per preset ({need} seeds, min-max)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out_dir / "quality-sparsity.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    # perplexity vs forward tokens: every row with the full seed count (faint) and each method's frontier
    sparsities = sorted({k[3] for k in agg})
    fig, axes = plt.subplots(1, max(1, len(sparsities)), figsize=(4.4 * max(1, len(sparsities)), 4.2), squeeze=False)
    for ax, sp in zip(axes[0], sparsities):
        for m in methods:
            rows = [v for k, v in full.items() if k[3] == sp and method_of(k) == m]
            ax.scatter([v["forward_tokens"] for v in rows], [v["mean"] for v in rows], s=12, alpha=0.3,
                       color=colors[m], marker=markers[m])
            pts = frontier(agg, sp, m, need)
            if pts:
                xs, ys = [t for t, _, _ in pts], [v["mean"] for _, v, _ in pts]
                ax.errorbar(xs, ys, yerr=[[y - v["min"] for y, (_, v, _) in zip(ys, pts)],
                                          [v["max"] - y for y, (_, v, _) in zip(ys, pts)]],
                            marker=markers[m], color=colors[m], capsize=2, ls="none")
                ax.step(xs + [max(t for t, _, _ in pts) * 1.5], ys + ys[-1:], where="post", color=colors[m],
                        label=m if sp == sparsities[0] else None)
        if parent:
            ax.axhline(parent, color="grey", ls=":", label="parent" if sp == sparsities[0] else None)
        ax.set(title=f"sparsity {sp:.2f}", xlabel="forward tokens spent pruning", ylabel="mean perplexity over seeds",
               xscale="log", yscale="log")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"quality per compute: each method's frontier (lines, min-max over {need} seeds) "
                 "and its other rows (faint)", fontsize=9)
    fig.tight_layout()
    written.append(out_dir / "quality-compute.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def write_docs(text: str, doc_path: Path = DOCS, *, tool: str = BLOCK,
               heading: str = "Method comparison (tools/bench_quality.py)") -> None:
    """`text` between the tool's markers on the page (`bench_docs.write_block`: a new `heading` section
    at its end when the markers are not there yet); the rest of the page is left as it is."""
    import bench_docs

    bench_docs.write_block(tool, text.split("\n"), doc_path, heading=heading, intro="# Results\n")


def render_docs(records: list[dict], doc_path: Path = DOCS, img_dir: Path = IMG) -> None:
    plots(records, img_dir)
    write_docs(render(records), doc_path)


def main(argv: list[str] | None = None, *, doc_path: Path = DOCS, img_dir: Path = IMG) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="render docs/RESULTS.md's quality tables and plots from the records")
    ap.add_argument("results_dir", nargs="?", type=Path, default=RESULTS_DIR,
                    help="folder of quality JSON records (default: docs/results)")
    args = ap.parse_args(argv)
    records = load_records(args.results_dir) if args.results_dir.is_dir() else []
    if not records:  # an empty table would replace the real one
        ap.error(f"no quality records in {args.results_dir}; nothing rendered, {doc_path.name} left as it is")
    render_docs(records, doc_path, img_dir)


if __name__ == "__main__":
    main()
