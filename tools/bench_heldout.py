"""Held-out check of the quality table: settings chosen on the test tokens the table reports are
re-read on tokens nobody chose anything on.

docs/RESULTS.md reports perplexity on the first 32,768 tokens of WikiText-2 raw test, and defaults
(the prior memory, the refit's windows, ...) were picked by comparing rows there, so those rows are
favoured by the choice. This tool re-evaluates the exported models of given quality records on the
next --eval-tokens tokens (`bonsai-lite eval --skip-tokens`), writes one `heldout-<record>.json`
per model, and renders a table of both slices side by side. A model folder that no longer holds
the record's model (its parameter count differs) is refused, not evaluated.

  python tools/bench_heldout.py --work /work/qwork --eval ../shared/data/wikitext2-raw-test.txt \
      --parent /work/smollm2 docs/results/quality-smollm2-standard-flap-35-s0-....json ...
  python tools/bench_heldout.py --render        # the table -> docs/RESULTS.md
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from bench_quality import RESULTS_DIR, commit, hardware  # noqa: E402
from render_quality import _f, _variant, label, write_docs  # noqa: E402

DOCS = ROOT / "docs" / "RESULTS.md"
BLOCK = "heldout"
PARENT = "parent"  # the `of` of the parent's held-out record


def evaluate(model_dir: Path, source: dict, args) -> dict:
    from bonsai_lite.eval.perplexity import perplexity

    ev = perplexity(model_dir, text=args.eval, seq_len=source["seq_len"], max_tokens=args.eval_tokens,
                    skip_tokens=args.skip_tokens, device="cpu")
    if source.get("params") is not None and ev["params"] != source["params"]:
        raise SystemExit(f"bench_heldout: {model_dir} holds {ev['params']:,} parameters, its record "
                         f"{source['file']} {source['params']:,}: not the record's model; nothing written")
    keep = ("model", "method", "sparsity", "seed", "preset", "variant", "settings", "compensate")
    return {"kind": "heldout", "of": source["file"], **{k: source.get(k) for k in keep},
            "skip_tokens": args.skip_tokens, "eval_tokens": ev["tokens"], "eval_windows": ev["windows"],
            "seq_len": ev["seq_len"], "perplexity": ev["perplexity"], "nll": ev["nll"], "eval_seconds": ev["seconds"],
            "first_eval_tokens": source.get("eval_tokens"), "first_perplexity": source["perplexity"],
            **commit(), "hardware": hardware(), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run(args) -> None:
    results = Path(args.results_dir)
    todo = [(Path(f), json.loads(Path(f).read_text())) for f in args.records]
    for path, rec in todo:  # refuse what is not a quality record before evaluating anything
        if rec.get("kind") != "quality" or rec.get("method") == "parent":
            raise SystemExit(f"bench_heldout: {path} is not a pruned model's quality record")
        if not (Path(args.work) / path.stem).is_dir():
            raise SystemExit(f"bench_heldout: no exported model {Path(args.work) / path.stem} for {path.name}")
    if args.parent:
        out = results / f"heldout-{PARENT}-{Path(args.parent).name}.json"
        if not out.exists():
            src = {"file": PARENT, "seq_len": args.seq_len, "perplexity": None, "params": None, "model": args.parent}
            out.write_text(json.dumps({**evaluate(Path(args.parent), src, args), "method": PARENT}, indent=1) + "\n")
    for path, rec in todo:
        out = results / f"heldout-{path.stem}.json"
        if out.exists():
            continue
        r = evaluate(Path(args.work) / path.stem, {**rec, "file": path.name}, args)
        out.write_text(json.dumps(r, indent=1) + "\n")
        print(f"{path.stem}: {r['first_perplexity']:.2f} -> {r['perplexity']:.2f}", flush=True)


def render(records: list[dict], first_parent: dict | None = None) -> str:
    """Rows (preset, method as the quality table names it, sparsity, variant) with both slices' means;
    `first_parent`: the parent's quality record on the table's slice, for its line."""
    parents = [r for r in records if r["method"] == PARENT]
    groups = defaultdict(list)
    for r in records:
        if r["method"] != PARENT:
            groups[(r["preset"], r["sparsity"], label(r), _variant(r))].append(r)
    lines = []
    for p in parents:
        first = (f" ({first_parent['perplexity']:.2f} on the first {first_parent['eval_tokens']:,})"
                 if first_parent else "")
        lines.append(f"Parent: **{p['perplexity']:.2f}** on tokens {p['skip_tokens']:,}-"
                     f"{p['skip_tokens'] + p['eval_tokens']:,}{first}.")
    hw = sorted({r["hardware"]["cpu"] for r in records})
    lines += ["", f"Records: {len(records)} `heldout-*.json` files in `docs/results/` (commits "
              + ", ".join(sorted({r["commit"] for r in records})) + f"); CPU: {'; '.join(hw)}.", "",
              "| preset | sparsity | method | variant | seeds | table's slice: mean ppl | held-out slice: mean ppl "
              "(std) | change |", "| --- | --- | --- | --- | --- | ---: | ---: | ---: |"]
    for key in sorted(groups, key=lambda k: (k[0], k[1], statistics.fmean(r["perplexity"] for r in groups[k]))):
        rs = sorted(groups[key], key=lambda r: r["seed"])
        first = statistics.fmean(r["first_perplexity"] for r in rs)
        held = [r["perplexity"] for r in rs]
        std = f" ({_f(statistics.stdev(held))})" if len(held) > 1 else ""
        lines.append(f"| {key[0]} | {key[1]:.2f} | {key[2]} | {key[3] or '-'} | "
                     f"{len(rs)} ({','.join(str(r['seed']) for r in rs)}) | {_f(first)} | "
                     f"{_f(statistics.fmean(held))}{std} | {statistics.fmean(held) / first - 1:+.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("records", nargs="*", help="quality records (docs/results/quality-*.json) whose models to re-read")
    ap.add_argument("--work", default="/work/qwork", help="bench_quality's --work: the exported models, by record name")
    ap.add_argument("--eval", help="the test text the records were evaluated on")
    ap.add_argument("--skip-tokens", type=int, default=32768, help="the tokens the table reports (default 32768)")
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=2048, help="the parent's windows (records carry their own)")
    ap.add_argument("--parent", help="the parent model folder: its held-out perplexity as the reference")
    ap.add_argument("--results-dir", default=str(RESULTS_DIR))
    ap.add_argument("--render", action="store_true", help="write the table into docs/RESULTS.md and stop")
    args = ap.parse_args(argv)
    if args.render:
        records = [json.loads(p.read_text()) for p in sorted(Path(args.results_dir).glob("heldout-*.json"))]
        if not records:
            ap.error(f"no held-out records in {args.results_dir}; {DOCS.name} left as it is")
        firsts = [r for r in (json.loads(p.read_text()) for p in Path(args.results_dir).glob("quality-*-parent-*.json"))
                  if r.get("method") == "parent" and r.get("seq_len") == args.seq_len]
        first = max(firsts, key=lambda r: r["eval_tokens"], default=None)
        write_docs(render(records, first), DOCS, tool=BLOCK, heading="Held-out slice (tools/bench_heldout.py)")
        return
    if not args.eval or not (args.records or args.parent):
        ap.error("give --eval and the records (or --parent) to evaluate, or --render")
    run(args)


if __name__ == "__main__":
    main()
