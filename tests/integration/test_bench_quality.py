"""tools/bench_quality.py end to end on a tiny sharded model: records with the fields the tables
need, a re-run skips finished runs, and the rendered table's means are the records' means."""
from __future__ import annotations

import json
import os
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


def _bench(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_quality.py"), *args], capture_output=True,
                         text=True, env=env, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


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


def test_render_reads_compute_settings_from_the_record_not_the_variant_name():
    """A preset's definition can change between commits: a row is a variant of today's preset when its
    recorded settings differ from it, whatever its variant name said when it ran."""
    sys.path.insert(0, str(ROOT / "tools"))
    from render_quality import _variant

    from bonsai_lite.config import PRESETS

    now = dict(PRESETS["quick"])
    rec = {"preset": "quick", "method": "bonsai", "variant": "prior=flap-parent+prior_samples=16", "settings": now}
    assert _variant(rec) == ""  # ran with what `quick` is now: a default row
    old = dict(now, prior_samples=now["prior_samples"] + 5)
    assert _variant({**rec, "variant": "prior=flap-parent", "settings": old}) == f"prior_samples={old['prior_samples']}"
    assert _variant({**rec, "variant": "gqa=equal", "settings": dict(now, masks_per_iter=7)}) == "gqa=equal+masks=7"
    # the refit's windows, which no preset sets: a row of its own unless at bench_quality's 32
    assert _variant({**rec, "variant": "refit=ls+refit_samples=128", "settings": dict(now, refit_samples=128)}) \
        == "refit_samples=128"
    assert _variant({**rec, "variant": "refit=ls+refit_samples=32", "settings": dict(now, refit_samples=32)}) == ""


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
