"""tools/bench_quality.py end to end on a tiny sharded model: records with the fields the tables
need, a re-run skips finished runs, and the rendered table's means are the records' means."""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import prunable_model  # noqa: E402

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
FIELDS = {"kind", "model", "method", "sparsity", "seed", "preset", "eval_tokens", "seq_len", "perplexity",
          "prune_seconds", "forward_tokens", "commit", "hardware"}


def _tool(script, *args, ok=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "tools" / script), *args], capture_output=True,
                         text=True, env=env, timeout=600, cwd=ROOT)
    assert (out.returncode == 0) is ok, out.stderr[-3000:]
    return out.stdout if ok else out.stderr


def _bench(*args):
    return _tool("bench_quality.py", *args)


def test_bench_quality_records_resume_and_render(tiny_models, tmp_path):
    model, calib = prunable_model(tiny_models["llama-gqa-tied"], tmp_path)
    results = tmp_path / "results"
    common = ["--model", str(model), "--model-name", "tiny", "--calib", str(calib), "--eval", str(calib),
              "--methods", "bonsai,flap", "--sparsities", "0.2", "--seeds", "0,1", "--variants", "compensate=off",
              "--variant-seeds", "0,1",
              "--preset", "quick", "--seq-len", "32", "--eval-tokens", "256", "--work", str(tmp_path / "work"),
              "--results-dir", str(results), "--threads", "1"]
    _bench(*common)
    records = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
    runs = [r for r in records if r["method"] != "parent"]
    # 2 methods x 2 seeds, plus the compensate=off variant of each (both compensate by default: flap by
    # definition, bonsai with its default flap prior)
    assert len(runs) == 2 * 2 + 2 * 2 and len(records) == len(runs) + 1
    for r in records:
        assert FIELDS <= set(r) and r["kind"] == "quality" and r["eval_tokens"] == 256 and r["seq_len"] == 32
    for r in runs:
        assert r["perplexity"] > 1 and r["forward_tokens"] > 0 and r["prune_seconds"] > 0
        assert r["compensate"] is (r["variant"] != "compensate=off")
        assert r["settings"]["fluctuation"] in ("variance", "residual")  # what ran, not "auto"
    bonsai = [r for r in runs if r["method"] == "bonsai" and not r["variant"]]
    flap = [r for r in runs if r["method"] == "flap" and not r["variant"]]
    assert all(b["forward_tokens"] > f["forward_tokens"] for b in bonsai for f in flap)
    # resumable: a second invocation has nothing left to do and rewrites nothing
    stamps = {p.name: p.stat().st_mtime_ns for p in results.glob("*.json")}
    assert json.loads(_bench(*common, "--dry-run"))["todo"] == []
    _bench(*common)
    assert {p.name: p.stat().st_mtime_ns for p in results.glob("*.json")} == stamps
    # --variants-only lists only the variant rows (another process runs the defaults), for the methods
    # the variant applies to (FLAP and the other one-pass methods have no regression)
    todo = json.loads(_bench(*common, "--variants", "regression=none", "--variants-only",
                             "--dry-run"))["todo"]
    assert todo == [f"quality-tiny-quick-bonsai-20-s{s}-regression_none" for s in (0, 1)]
    # a refit variant records the windows `--refit-samples auto` resolved, and counts their tokens
    _bench(*common[:common.index("--methods")], "--methods", "flap", "--sparsities", "0.2", "--seeds", "0",
           "--variant-seeds", "0", "--variants", "refit=ls", "--variants-only",
           *common[common.index("--preset"):])
    refit = json.loads((results / "quality-tiny-quick-flap-20-s0-refit_ls.json").read_text())
    plain_flap = next(r for r in flap if r["seed"] == 0)
    n = refit["settings"]["refit_samples"]
    assert refit["settings"]["refit"] == "ls" and n >= 1
    assert refit["forward_tokens"] == plain_flap["forward_tokens"] + n * refit["settings"]["seq_len"]
    # render on a copy of a page: only the block between the markers changes; means come from the records
    sys.path.insert(0, str(ROOT / "tools"))
    from render_quality import BEGIN, END, load_records, render_docs

    page = tmp_path / "RESULTS.md"
    page.write_text(f"# Results\n\nbefore\n\n{BEGIN}\nold\n{END}\n\nafter\n")
    render_docs(load_records(results), page, tmp_path / "img")
    text = page.read_text()
    assert text.startswith("# Results\n\nbefore\n") and text.endswith("\n\nafter\n") and "old" not in text
    mean = statistics.fmean(r["perplexity"] for r in bonsai)
    row = next(line for line in text.splitlines() if line.startswith("| 0.20 |") and "bonsai" in line and "+comp" in line)
    assert f"{mean:.2f}" in row or f"{mean:.1f}" in row or f"{mean:,.0f}" in row
    plain = text.replace("**", "")
    assert "| flap +comp |" in plain and "| flap |" in plain
    # the held-out slice (tools/bench_heldout.py): the same exported models on the next 256 tokens
    from bench_heldout import render as render_heldout

    from bonsai_lite.eval.perplexity import perplexity

    names = [f"quality-tiny-quick-bonsai-20-s{s}" for s in (0, 1)]
    held = ["--work", str(tmp_path / "work"), "--eval", str(calib), "--skip-tokens", "256", "--eval-tokens", "256",
            "--results-dir", str(results)]
    _tool("bench_heldout.py", *held, *[str(results / f"{n}.json") for n in names])
    out = [json.loads((results / f"heldout-{n}.json").read_text()) for n in names]
    for n, r in zip(names, out):
        direct = perplexity(tmp_path / "work" / n, text=calib, seq_len=32, max_tokens=256, skip_tokens=256)
        first = json.loads((results / f"{n}.json").read_text())["perplexity"]
        assert r["kind"] == "heldout" and r["perplexity"] == direct["perplexity"] and r["first_perplexity"] == first
        assert r["perplexity"] != first  # other tokens, or the table would show the first slice twice
    mean = statistics.fmean(r["perplexity"] for r in out)
    assert any(f"{mean:.1f}" in line or f"{mean:,.0f}" in line for line in render_heldout(out).splitlines()
               if line.startswith("| quick | 0.20 |"))
    # a folder that no longer holds the record's model is refused before anything is written
    fake = {**json.loads((results / f"{names[0]}.json").read_text())}
    fake["params"] += 1
    (results / "quality-tiny-quick-bonsai-20-s9.json").write_text(json.dumps(fake))
    shutil.copytree(tmp_path / "work" / names[0], tmp_path / "work" / "quality-tiny-quick-bonsai-20-s9")
    err = _tool("bench_heldout.py", *held, str(results / "quality-tiny-quick-bonsai-20-s9.json"), ok=False)
    assert "not the record's model" in err and not (results / "heldout-quality-tiny-quick-bonsai-20-s9.json").exists()


def test_render_reads_compute_settings_from_the_record_not_the_variant_name():
    """A preset's definition can change between commits: a row is a variant of today's preset when its
    recorded settings differ from it, whatever its variant name said when it ran."""
    sys.path.insert(0, str(ROOT / "tools"))
    from render_quality import _variant, label

    from bonsai_lite.config import PRESETS

    now = dict(PRESETS["quick"])
    rec = {"preset": "quick", "method": "bonsai", "sparsity": 0.35, "variant": "prior=flap-parent+prior_samples=16",
           "settings": now}
    assert _variant(rec) == ""  # ran with what `quick` is now: a default row
    old = dict(now, prior_samples=now["prior_samples"] + 5)
    assert _variant({**rec, "variant": "prior=flap-parent", "settings": old}) == f"prior_samples={old['prior_samples']}"
    assert _variant({**rec, "variant": "gqa=equal", "settings": dict(now, masks_per_iter=7)}) == "gqa=equal+masks=7"
    # the refit's windows are in the label (auto picks them per run), 32 where an older record does not say
    for windows in (128, 32):
        r = {**rec, "variant": f"refit=ls+refit_samples={windows}", "settings": dict(now, refit="ls", refit_samples=windows)}
        assert _variant(r) == "" and label(r).endswith(f"+refit({windows})")
    assert label({**rec, "settings": dict(now, refit="ls")}).endswith("+refit(32)")
    assert "refit" not in label({**rec, "settings": dict(now, refit="off", refit_samples=0)})


def test_render_reads_the_first_step_against_what_auto_resolves():
    """`--first-step auto` is one step up to 20% for the prior-only frame with the residual metric: a run
    that set that step is a default row, a run with equal steps where auto now takes one is a variant."""
    sys.path.insert(0, str(ROOT / "tools"))
    from render_quality import _variant

    from bonsai_lite.config import PRESETS

    frame = dict(PRESETS["standard"], prior="flap-parent", regression="none", fluctuation="residual")
    rec = {"preset": "standard", "method": "bonsai", "sparsity": 0.2}
    assert _variant({**rec, "variant": "first_step=0.2", "settings": dict(frame, first_step=0.2)}) == ""
    assert _variant({**rec, "variant": "", "settings": dict(frame, first_step=0.0)}) == "first_step=0"
    assert _variant({**rec, "sparsity": 0.35, "variant": "first_step=0.2",
                     "settings": dict(frame, first_step=0.2)}) == "first_step=0.2"
    assert _variant({**rec, "variant": "", "settings": dict(frame, first_step=0.2, fluctuation="variance")}) \
        == "first_step=0.2"  # auto takes equal steps with FLAP's variance


def test_render_refuses_a_folder_without_records_and_leaves_the_page(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    from render_quality import BEGIN, END, main

    page = tmp_path / "RESULTS.md"
    page.write_text(f"{BEGIN}\nthe real table\n{END}\n")
    for argv in ([str(tmp_path / "missing")], ["--no-such-option"], [str(tmp_path)]):
        with pytest.raises(SystemExit) as e:
            main(argv, doc_path=page, img_dir=tmp_path / "img")
        assert e.value.code == 2
    assert page.read_text() == f"{BEGIN}\nthe real table\n{END}\n" and not (tmp_path / "img").exists()
    assert "no quality records" in capsys.readouterr().err


def test_ablation_reference_falls_back_to_the_default_row_and_says_so():
    """A joint change (p_iter=0.025+prior_samples=8: half the steps' windows for twice the steps) has no
    run of its second setting alone; its reference is then the default row, marked as such."""
    sys.path.insert(0, str(ROOT / "tools"))
    from render_quality import _variant, label, reference_seeds

    from bonsai_lite.config import PRESETS

    now = dict(PRESETS["standard"])
    rec = {"model": "m", "preset": "standard", "method": "flap", "sparsity": 0.35, "variant": ""}
    default = [{**rec, "seed": s, "perplexity": 40.0 + s, "settings": now} for s in (0, 1, 2)]
    alone = [{**rec, "seed": s, "perplexity": 50.0 + s, "settings": dict(now, prior_samples=8)} for s in (0, 1)]
    joint = {**rec, "settings": dict(now, p_iter=0.025, prior_samples=8)}
    key = (rec["model"], rec["preset"], label(joint), rec["sparsity"], _variant(joint))
    assert key[4] == "p_iter=0.025+prior_samples=8"
    assert reference_seeds(default + alone, key, {0, 1, 2}) == ({0: 50.0, 1: 51.0}, False)  # the rest alone ran
    assert reference_seeds(default, key, {0, 1, 2}) == ({0: 40.0, 1: 41.0, 2: 42.0}, True)  # it did not
    single = key[:4] + ("prior_samples=8",)
    assert reference_seeds(alone, single, {0, 1}) == ({}, False)  # a one-setting variant's reference is the default
    assert reference_seeds(default, single, {1}) == ({1: 41.0}, False)


def _row(tokens: float, mean: float, n: int = 3) -> dict:
    return {"forward_tokens": tokens, "mean": mean, "n": n, "std": 1.0, "min": mean - 1, "max": mean + 1}


def test_frontier_keeps_only_rows_no_cheaper_row_beats_and_crossover_is_where_bonsai_stays_lowest():
    """The frontier against a brute-force reading of its definition, and the crossover on a case where
    Bonsai is behind at small compute, ahead in the middle, behind once, then ahead for good."""
    sys.path.insert(0, str(ROOT / "tools"))
    from render_quality import crossover, frontier

    def key(method, i, sp=0.35):
        return ("m", "standard", f"{method} [v{i}]", sp, "")

    bonsai = [(1e3, 90.0), (4e3, 95.0), (8e3, 50.0), (3e4, 45.0), (6e4, 41.0), (9e4, 60.0)]
    flap = [(5e2, 80.0), (8e3, 55.0), (2e4, 44.0), (5e4, 43.0)]
    agg = {key("bonsai", i): _row(t, m) for i, (t, m) in enumerate(bonsai)}
    agg |= {key("flap", i): _row(t, m) for i, (t, m) in enumerate(flap)}
    agg[key("flap", 99)] = _row(1e5, 1.0, n=2)  # too few seeds: not on any frontier
    agg[key("bonsai", 0, sp=0.5)] = _row(1.0, 1.0)  # another sparsity
    for method, rows in (("bonsai", bonsai), ("flap", flap)):
        got = [(t, v["mean"]) for t, v, _ in frontier(agg, 0.35, method)]
        brute = [(t, m) for t, m in sorted(rows) if all(m < m2 for t2, m2 in rows if t2 <= t and (t2, m2) != (t, m))]
        assert got == brute
    fronts = {m: frontier(agg, 0.35, m) for m in ("bonsai", "flap")}
    # at 2e4 flap's 44 beats bonsai's 50; from 3e4 on bonsai (45 > 44 at 3e4!) ... only from 6e4 (41 < 43)
    assert crossover(fronts) == 6e4
    fronts["flap"] = frontier(agg, 0.35, "flap")[:2]  # flap stops at 8e3 (55): bonsai lower from 8e3 on
    assert crossover(fronts) == 8e3
    assert crossover({"bonsai": [], "flap": fronts["flap"]}) is None
