"""tools/bench_scale.py and tools/bench_infer.py end to end on the `tiny` shape, CPU, minimal work.

No timing thresholds: the fields the docs tables and the GPU session rely on must exist and be sane.
The docs writers are checked on a copy of the page: only the text between their markers changes.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools"


def _run(tool: str, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(TOOLS / tool), "--threads", "1", *args], capture_output=True,
                         text=True, env=env, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    scale = _run("bench_scale.py", "--shape", "tiny", "--work-dir", str(work), "--budgets", "64MB",
                 "--masks", "4", "--samples", "2", "--seq-len", "16", "--ref-batches", "1", "--export",
                 "--sweep", "--sweep-per-order", "1", "--accelerate", "--keep")
    infer = _run("bench_infer.py", "--shape", "tiny", "--work-dir", str(work), "--sparsities", "0.5",
                 "--trust-remote-code", "--batch", "2", "--prefill-len", "16", "--prompt-len", "8",
                 "--new-tokens", "4", "--repeats", "1")
    return work, scale, infer


def test_bench_scale_fields(results):
    work, r, _ = results
    assert r["tool"] == "bench_scale" and r["commit"] and r["hardware"]["cpu"]
    assert r["settings"]["model"] == "tiny" and r["settings"]["device"] == "cpu"
    index = json.loads((work / "tiny" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    (run,) = r["runs"]
    assert run["budget"] == 64 * 2**20
    assert set(run["stages"]) >= {"priors", "sampling", "evaluate", "regression", "selection"}
    assert all(s["seconds"] > 0 for s in run["stages"].values())
    ev = run["stages"]["evaluate"]
    assert ev["mask_tokens"] == 4 * 2 * 15 and ev["bytes_read"] > 0 and ev["bytes_to_device"] > 0
    assert run["mask_tokens_per_s"] > 0 and 0 < run["mfu"] < 5
    assert run["peak_rss"] >= run["rss_at_start"] > 0 and run["peak_gpu_reserved"] == 0
    assert run["removed_units"] > 0 and run["export"]["bytes"] > 0
    assert run["export"]["config_class"] == "BonsaiLlamaConfig"  # the export's config loads with transformers
    ev_export = run["export_eval"]  # the pruned export through the engine under the same budget
    assert 0 < ev_export["params"] < r["settings"]["params"] and math.isfinite(ev_export["eval_nll"])
    acc = run["accelerate"]  # the offloaded transformers reference on the same rows, same budget
    assert acc["tokens"] == 2 * 15 and acc["tokens_per_s"] > 0 and math.isfinite(acc["loss"])
    sys.path.insert(0, str(TOOLS))
    import scale_extras

    (rec,) = scale_extras.records(r)
    assert rec["kind"] == "scale" and rec["shape"] == "tiny" and rec["budget_bytes"] == 64 * 2**20
    assert rec["accelerate_tokens_per_s"] == acc["tokens_per_s"] and rec["tokens_per_s"] == run["mask_tokens_per_s"]
    assert rec["predicted_seconds"] > 0 and rec["peak_rss_growth_bytes"] == run["peak_rss"] - run["rss_at_start"]
    assert 0 < rec["stages"]["priors"]["scores_seconds"] < rec["stages"]["priors"]["seconds"]  # flap-parent prior
    assert rec["cold_read_bps"] > 0  # measured (tiny shards are below the probe's minimum: the nominal rate)
    # the priors stage is predicted with FLAP's one read of the o/down projections, on the probed CPU rate
    assert rec["stages"]["priors"]["predicted_seconds"] > run["priors_plan"]["predicted_seconds"]
    assert rec["planned_flops_per_s"] > 0 and rec["bf16_factor"] > 0
    import scale_docs  # the ratio at the GEMM peak: mask-tokens/s at the peak over accelerate's tokens/s
    at_peak = r["compute_peak"]["flops"] / (ev["flops"] / ev["mask_tokens"]) / acc["tokens_per_s"]
    assert scale_docs.ceiling(rec) == pytest.approx(at_peak, rel=1e-9)
    out = work / "records"  # a second record of the same settings never replaces the first
    (first,) = scale_extras.write_records([rec], out, extra="idle")
    (second,) = scale_extras.write_records([{**rec, "seconds": -1.0}], out, extra="idle")
    assert first.name == "scale-tiny-cpu-64.0MiB-4x2x16-idle.json" and second.name == first.name[:-5] + "-2.json"
    assert json.loads(first.read_text())["seconds"] == rec["seconds"]
    quick = run["preset_extrapolation"]["presets"]["quick"]
    assert quick["iterations"] == 5 and quick["seconds_8_core_laptop_estimate"] < quick["seconds_here"]
    ex = run["extrapolation"]
    assert ex["iterations"] == 10 and ex["seconds"] > run["seconds"] and ex["regression_measured_at_200"]
    fracs = [row["fraction"] for row in ex["per_iteration"]]
    assert fracs[0] == 1.0 and fracs[-1] == pytest.approx(0.55)
    assert ex["per_iteration"][-1]["evaluate_s"] < ex["per_iteration"][0]["evaluate_s"]
    ref = r["reference"]
    assert ref["engine"]["mask_tokens_per_s"] > 0 and ref["transformers"]["mask_tokens_per_s"] > 0
    assert set(run["vs_reference"]) == {"engine", "transformers"}
    sw = run["sweep"]
    assert {x["plan"]["order"] for x in sw["runs"]} == {"mask-group-major", "layer-major"}
    assert sw["choice_vs_best"] >= 1.0 and isinstance(sw["within_tolerance"], bool)
    same = ("order", "cache", "tile_rows", "group_rows", "dtype", "prefetch")  # it checks the plan the prune made
    assert {k: sw["runs"][0]["plan"][k] for k in same} == {k: run["plan"][k] for k in same}


def test_bench_scale_deletes_only_what_it_wrote(results):
    work, _, _ = results
    kept = work / "tiny"  # written by the fixture's run (--keep): not this run's to delete
    before = sorted(p.name for p in kept.iterdir())
    r = _run("bench_scale.py", "--shape", "tiny", "--work-dir", str(work), "--budgets", "64MB", "--masks", "4",
             "--samples", "1", "--seq-len", "8", "--no-reference", "--no-paper-regression", "--hold-ram", "32MB")
    assert sorted(p.name for p in kept.iterdir()) == before
    assert r["held_ram"]["held_bytes"] == 32 * 2**20 and r["held_ram"]["held_to_the_end"]
    assert all(s["disk_read_bytes"] >= 0 for s in r["runs"][0]["stages"].values())
    fresh = work / "fresh"
    _run("bench_scale.py", "--shape", "tiny", "--work-dir", str(fresh), "--budgets", "64MB", "--masks", "4",
         "--samples", "1", "--seq-len", "8", "--no-reference", "--no-paper-regression", "--export")
    assert not (fresh / "tiny").exists() and not (fresh / "export-tiny").exists()  # its own, without --keep


def test_bench_infer_fields(results):
    work, _, r = results
    assert r["tool"] == "bench_infer" and r["settings"]["dtype"] == "float32"
    names = [m["name"] for m in r["models"]]
    assert names == ["parent", "per-layer-50", "uniform-50"]
    parent, *pruned = r["models"]
    assert parent["prefill_speedup"] == 1.0 and parent["decode_speedup"] == 1.0
    for m in r["models"]:
        assert m["prefill"]["tokens_per_s"] > 0 and m["decode"]["ms_per_token"] > 0
        assert m["decode"]["ttft_seconds"] > 0
    for m in pruned:
        assert 0.4 < m["params_fraction"] < 0.65 and m["params"] < parent["params"]
        assert not (work / f"tiny-{m['name']}").exists()  # variants deleted without --keep


def test_docs_rewrite_only_own_block(results, tmp_path, monkeypatch):
    _, scale, infer = results
    sys.path.insert(0, str(TOOLS))
    import bench_docs

    page = tmp_path / "PERFORMANCE.md"
    page.write_text("# Performance\n\nbefore\n\n<!-- other:begin -->\nkept\n<!-- other:end -->\n")
    monkeypatch.setattr(bench_docs, "DOCS", page)
    monkeypatch.setattr(bench_docs, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(bench_docs, "IMG", tmp_path / "img")
    for _ in range(2):  # a second write replaces the rows, it does not add them again
        bench_docs.write_scale_docs({**scale, "command": "python tools/bench_scale.py X"})
        bench_docs.write_infer_docs({**infer, "command": "python tools/bench_infer.py Y"})
    text = page.read_text()
    assert text.startswith("# Performance\n\nbefore\n\n<!-- other:begin -->\nkept\n<!-- other:end -->")
    assert text.count("<!-- bench_scale:begin -->") == 1 and text.count("<!-- bench_infer:begin -->") == 1
    assert text.count("| tiny | 4 x 2 x 16 | 64.0 MiB |") == 1 and text.count("| tiny | uniform-50 |") == 1
    assert "How to run on a GPU" in text and "tools/gpu_session.sh" in text
    assert ":record" not in text and "{\"" not in text.split("<!-- bench_scale:begin -->")[1]  # no JSON in markdown
    files = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert files[0] == "bench_infer-000.json" and "bench_scale-000.json" in files
    assert len(files) == len(bench_docs.read_records("bench_infer")) + len(bench_docs.read_records("bench_scale"))


def test_docs_regenerate_from_results_alone(tmp_path, monkeypatch):
    """Blocks rebuilt from docs/results/*.json equal the committed page: tables come from the records only."""
    sys.path.insert(0, str(TOOLS))
    import bench_docs

    real = bench_docs.DOCS.read_text()
    page = tmp_path / "PERFORMANCE.md"
    stripped = real
    for tool in ("bench_engine", "bench_scale", "bench_infer", "refit_scale"):  # empty every generated block
        begin, end = f"<!-- {tool}:begin -->", f"<!-- {tool}:end -->"
        stripped = stripped[: stripped.index(begin) + len(begin)] + "\n" + stripped[stripped.index(end):]
    page.write_text(stripped)
    monkeypatch.setattr(bench_docs, "DOCS", page)
    monkeypatch.setattr(bench_docs, "IMG", bench_docs.IMG)  # read-only use: images exist, not redrawn here
    for tool, render in (("bench_engine", bench_docs.render_engine), ("bench_scale", bench_docs.render_scale),
                         ("bench_infer", bench_docs.render_infer)):
        bench_docs.write_block(tool, render(bench_docs.read_records(tool)))
    import bench_refit

    bench_docs.write_block(bench_refit.BLOCK, bench_refit.render(bench_refit.load_records()))
    assert page.read_text() == real


def test_hold_ram_keeps_its_memory_resident():
    """--hold-ram emulates a smaller machine only if the held pages are really resident."""
    sys.path.insert(0, str(TOOLS))
    import scale_extras

    with scale_extras.hold_ram(48 * 2**20) as held:
        status = Path(f"/proc/{held['pid']}/status").read_text()
        rss = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
        assert rss >= 48 * 2**20
    assert held["held_to_the_end"]
    assert not Path(f"/proc/{held['pid']}").exists() or "zombie" in Path(f"/proc/{held['pid']}/status").read_text()


def test_removed_by_depth_counts_every_layer_once():
    sys.path.insert(0, str(TOOLS))
    from removed_by_depth import removed_by_part

    kept_heads, kept_mlp = [4, 3, 2, 4, 1, 0, 4], [10, 9, 2, 7, 10, 0, 5]  # 7 layers: thirds of 2, 3, 2
    layers = [{"heads": list(range(h)), "mlp": list(range(m))} for h, m in zip(kept_heads, kept_mlp)]
    got = removed_by_part(4, 10, layers)
    assert got == {"heads": [1, 5, 4], "mlp": [1, 11, 15]}
    assert sum(got["heads"]) == 7 * 4 - sum(kept_heads) and sum(got["mlp"]) == 7 * 10 - sum(kept_mlp)


def test_pair_signal_maths_against_loops():
    """tools/pair_signal.py: pair rows as sample_masks lays them out, the keep-score prediction
    against a per-pair loop, and the Spearman-Brown length factor against the formula it inverts."""
    import torch

    sys.path.insert(0, str(TOOLS))
    from pair_signal import length_factor, pair_differences, predicted_differences

    from bonsai_lite.search.sampling import sample_masks

    g = torch.Generator().manual_seed(0)
    prior = torch.rand(12, generator=g, dtype=torch.float64)
    s = sample_masks(prior, groups=[slice(0, 6), slice(6, 12)], p_iter=0.25, n_masks=6, generator=g)
    m = s.masks.bool()
    assert torch.equal(m[0::2] ^ m[1::2], s.candidates.expand(3, -1))  # rows 2k, 2k+1: mask and complement
    losses = torch.rand(6, generator=g, dtype=torch.float64)
    assert torch.equal(pair_differences(losses), torch.tensor([losses[2 * k] - losses[2 * k + 1] for k in range(3)]))
    score = torch.randn(12, generator=g, dtype=torch.float64)
    loop = [-sum(float(score[u]) * (float(m[2 * k, u]) - float(m[2 * k + 1, u])) for u in range(12)) for k in range(3)]
    torch.testing.assert_close(predicted_differences(score, s.masks), torch.tensor(loop, dtype=torch.float64))
    def spearman_brown(r: float, k: float) -> float:  # reliability of a k-times longer measurement
        return k * r / (1 + (k - 1) * r)

    for r in (0.3, 0.7, 0.9):
        assert spearman_brown(r, length_factor(r)) == pytest.approx(0.8)
    assert length_factor(0.8) == pytest.approx(1.0)


def test_refit_probe_solves_the_least_squares_refit():
    # The hypothesis tool's maths against numpy-free references: with no ridge, `ls` is the
    # least-squares fit of the dense output on [kept inputs, 1] (torch.linalg.lstsq); `mean` adds
    # the removed inputs' mean contribution to the bias and leaves the kept columns as they were.
    sys.path.insert(0, str(TOOLS))
    import torch
    from refit_probe import refit

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 0.5
    w, b = torch.randn(3, 6, generator=g), torch.randn(3, generator=g)
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    gram, kept = xa.T @ xa, torch.tensor([0, 2, 5])
    new_w, new_b = refit(gram, w, b, kept, mode="ls", damp=0.0)
    sol = torch.linalg.lstsq(xa[:, [0, 2, 5, 6]], xa @ torch.cat([w, b[:, None]], 1).double().T).solution
    assert torch.allclose(new_w[:, kept], sol[:-1].T, atol=1e-8) and torch.allclose(new_b, sol[-1], atol=1e-8)
    assert new_w[:, [1, 3, 4]].abs().max() == 0
    # a ridge shrinks the refit towards the original weights: a huge one gives them back
    far_w, _ = refit(gram, w, b, kept, mode="ls", damp=1e9)
    assert torch.allclose(far_w[:, kept], w[:, kept].double(), atol=1e-4)
    mean_w, mean_b = refit(gram, w, b, kept, mode="mean", damp=0.0)
    assert torch.equal(mean_w[:, kept], w[:, kept].double())
    assert torch.allclose(mean_b, b.double() + w[:, [1, 3, 4]].double() @ x[:, [1, 3, 4]].mean(0), atol=1e-8)


def test_bench_refit_measures_each_layer_and_keeps_only_what_it_was_told(tmp_path):
    # tools/bench_refit.py: the refit of a cut-down shape, per layer, beside the planner's prediction;
    # its checkpoint goes unless --keep-checkpoint, and an existing one is never deleted
    r = _run("bench_refit.py", "--shape", "tiny", "--layers", "2", "--samples", "2", "--seq-len", "16",
             "--work-dir", str(tmp_path), "--keep-checkpoint")
    assert r["kind"] == "refit-scale" and r["layers_measured"] == 2 and len(r["seconds_per_layer"]) == 2
    assert r["tokens"] == 32 and r["predicted_seconds"] > 0 and r["predicted_peak_bytes"] > 0
    assert r["full_depth_seconds_estimate"] == pytest.approx(sum(r["seconds_per_layer"]) / 2 * r["layers_full"])
    kept = tmp_path / "tiny-2l"
    assert json.loads((kept / "config.json").read_text())["num_hidden_layers"] == 2
    before = sorted(p.name for p in kept.iterdir())
    _run("bench_refit.py", "--shape", "tiny", "--layers", "2", "--samples", "2", "--seq-len", "16",
         "--work-dir", str(tmp_path))
    assert sorted(p.name for p in kept.iterdir()) == before  # not this run's to delete
    _run("bench_refit.py", "--shape", "tiny", "--layers", "1", "--samples", "2", "--seq-len", "16",
         "--work-dir", str(tmp_path))
    assert not (tmp_path / "tiny-1l").exists()  # its own, without --keep-checkpoint
    sys.path.insert(0, str(TOOLS))
    import bench_refit

    lines = bench_refit.render([("tag", r)])
    row = next(line for line in lines if line.startswith("| tiny |"))
    assert row.startswith(f"| tiny | 2, 0.5 | 2 x 16 | {r['hardware']['cpu']}, {r['threads']} | tag | {r['commit']} |")
    assert f"({r['seconds'] / r['predicted_seconds']:.2f}x)" in row
    assert any(c.strip().startswith("python tools/bench_refit.py --shape tiny --layers 2") for c in lines)


def test_bench_prune_runs_the_cli_and_checks_the_time_left_against_the_plan(tmp_path):
    # tools/bench_prune.py: a whole CLI prune + eval of a random checkpoint of the shape; the time each
    # iteration said was left is the rest of the run's own plan at its measured pace
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tiny_model, prunable_model

    src, calib = prunable_model(make_tiny_model(tmp_path / "src", "llama-gqa-tied"), tmp_path)
    work = tmp_path / "work"
    r = _run("bench_prune.py", "--shape", "tiny", "--preset", "quick", "--sparsity", "0.3", "--budget", "1GB",
             "--calib", str(calib), "--eval", str(calib), "--eval-seq-len", "16", "--eval-tokens", "256",
             "--tokenizer-from", str(src), "--work-dir", str(work),
             "--", "--seq-len", "16", "--calib-samples", "2", "--prior-samples", "8")
    assert r["kind"] == "prune-scale" and r["iterations"] == 3 and r["params_after"] < r["params_before"]
    plan = r["planned"]
    assert len(plan["iterations"]) == 3 and plan["refit"] > 0
    assert plan["seconds"] == pytest.approx(plan["start"] + sum(plan["iterations"]) + plan["refit"])
    assert [e["after_iteration"] for e in r["seconds_left"]] == [1, 2, 3]
    for e in r["seconds_left"]:
        k = e["after_iteration"]
        # the rest of the search at the run's pace, the refit at its own prediction (presets.seconds_left)
        assert e["predicted"] == pytest.approx(e["pace"] * sum(plan["iterations"][k:]) + plan["refit"])
    assert r["seconds_left"][-1]["measured"] == pytest.approx(r["stages"]["refit"]["seconds"])
    assert {"priors", "refit", "export"} <= set(r["stages"]) and r["stages"]["priors"]["calls"] == 3
    assert r["seconds"] == pytest.approx(sum(s["seconds"] for s in r["stages"].values()))
    assert r["prune_peak_rss_bytes"] > 0 and r["eval"]["peak_rss_bytes"] > 0 and r["export_bytes"] > 0
    # the process's peak, not the last stage's (each stage resets VmHWM, and with it the rusage figure)
    assert r["prune_peak_rss_bytes"] >= max(s["peak_rss_bytes"] for s in r["stages"].values())
    assert math.isfinite(r["eval"]["perplexity"]) and r["eval"]["tokens"] > 0
    assert r["transformers_config"] and r["budget_bytes"] == 2**30
    assert not (work / "parent").exists()  # the checkpoint it wrote, deleted without --keep-checkpoint
    sys.path.insert(0, str(TOOLS))
    import bench_prune

    lines = bench_prune.render([r])
    # the row names the arguments passed on to prune
    assert sum(x.startswith("| tiny | quick, 30% --seq-len 16 --calib-samples 2 --prior-samples 8 | 1.0 GiB |")
               for x in lines) == 1
    assert sum(x.startswith(f"| {k} | ") for x in lines for k in (1, 2, 3)) == 3  # one row per iteration's time left
    assert r["command"].startswith("python tools/bench_prune.py --threads 1 --shape tiny") and r["command"].endswith("8")
    # eval's own peak comes from its JSON (rusage of a child exec'd from a large process inherits that
    # process's RSS); rusage counts only for a run that reports no peak of its own
    assert r["eval"]["peak_rss_bytes"] == json.loads((work / "eval.json").read_text().splitlines()[-1])["peak_rss_bytes"]
    stages = {"refit": {"peak_rss_bytes": 150}}
    assert bench_prune.prune_peak({"peak_rss_bytes": 100}, stages, 10**12) == 150
    assert bench_prune.prune_peak({}, stages, 10**12) == 10**12
    # --parent: a real model folder pruned as it is, named by its folder, only read (never deleted)
    before = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    r2 = _run("bench_prune.py", "--parent", str(src), "--preset", "quick", "--sparsity", "0.3",
              "--calib", str(calib), "--eval", str(calib), "--eval-seq-len", "16", "--eval-tokens", "256",
              "--work-dir", str(tmp_path / "work2"), "--", "--seq-len", "16", "--calib-samples", "2", "--prior-samples", "8")
    assert r2["shape"] == src.name and r2["real_weights"] and r2["iterations"] == 3
    assert r2["params_before"] != r["params_before"] and r2["params_after"] < r2["params_before"]  # src, not "tiny"
    assert {p.name: p.stat().st_mtime_ns for p in src.iterdir()} == before


def test_bench_loader_times_the_parent_and_a_cut_structure(results):
    # tools/bench_loader.py: one loading pass per dtype and structure beside the planner's weight
    # handling, the cut structure from scale_extras.shrunk (the loader builds every block of it)
    work, _, _ = results
    r = _run("bench_loader.py", "--model", str(work / "tiny"), "--dtypes", "bfloat16,float32", "--keep", "0.5",
             "--repeats", "1")
    assert r["kind"] == "loader" and r["fresh_page_bps"] > 0
    rows = {(x["dtype"], x["structure"]): x for x in r["rows"]}
    assert set(rows) == {(d, s) for d in ("bfloat16", "float32") for s in ("parent", "keep 0.5")}
    for d in ("bfloat16", "float32"):
        parent, cut = rows[d, "parent"], rows[d, "keep 0.5"]
        assert 0 < cut["block_params"] < parent["block_params"]
        assert parent["seconds"] > 0 and parent["predicted_seconds"] > 0
    # computing in the checkpoint's dtype reads; float32 also casts every tensor
    assert rows["float32", "parent"]["predicted_seconds"] > rows["bfloat16", "parent"]["predicted_seconds"]


def test_bench_compute_times_one_block_and_one_chunk_per_tile():
    # tools/bench_compute.py: the pass it reports is n_layers block calls and ceil(vocab / chunk) head
    # calls, each as timed, beside the planner's compute_s of the same tile
    sys.path.insert(0, str(TOOLS))
    from random_checkpoint import shape_spec

    r = _run("bench_compute.py", "--shape", "tiny", "--dtypes", "float32,bfloat16", "--tiles", "1x16,4x16",
             "--repeats", "1")
    spec = shape_spec("tiny")
    assert r["kind"] == "compute" and r["layers"] == spec.n_layers and r["probe_flops_per_s"] > 0
    assert {(x["dtype"], x["rows"], x["tokens"]) for x in r["rows"]} == {
        (d, n, 16) for d in ("float32", "bfloat16") for n in (1, 4)}
    for x in r["rows"]:
        chunks = math.ceil(spec.vocab / r["head_chunk"])
        assert x["seconds"] == pytest.approx(spec.n_layers * x["block_seconds"] + chunks * x["chunk_seconds"], abs=1e-3)
        assert x["block_seconds"] > 0 and x["predicted_seconds"] > 0


def test_bench_cold_splits_a_cold_pass_into_its_loads_and_its_forwards(tiny_models):
    # tools/bench_cold.py: every case runs the real engine on the checkpoint; the reads case loads
    # every block and computes nothing; a pass's loads and forwards are parts of its time
    path = tiny_models["llama-gqa-tied"]
    r = _run("bench_cold.py", str(path), "--dtype", "float32", "--tokens", "16", "--repeats", "1")
    assert r["kind"] == "cold_pass" and r["checkpoint_bytes"] == sum(f.stat().st_size for f in path.glob("*.safetensors")) - sum(
        8 + int.from_bytes(f.read_bytes()[:8], "little") for f in path.glob("*.safetensors"))
    rows = {x["case"]: x for x in r["rows"]}
    assert set(rows) == {"reads", "pass", "pass_prefetch", "pass_on_copies", "warm"}
    assert rows["reads"]["forward_seconds"] == 0 and rows["reads"]["load_seconds"] > 0
    for case in ("pass", "pass_on_copies", "warm"):  # no prefetch: loads and forwards run in turn
        x = rows[case]
        assert 0 < x["load_seconds"] and 0 < x["forward_seconds"]
        assert x["load_seconds"] + x["forward_seconds"] <= x["seconds"]


def test_a_gpu_run_is_recorded_against_its_bf16_peak(results, tmp_path, monkeypatch):
    """A run printed on a GPU machine (here: the CPU run relabelled as one that measured its fp32 GEMM
    as the peak, as the H200 runs did) is recorded with MFU against the GPU's bf16 figure, and its
    kind=scale records render in the GPU table with the peak GPU memory and accelerate's beside it."""
    _, scale, _ = results
    sys.path.insert(0, str(TOOLS))
    import bench_docs
    import scale_docs
    import scale_extras

    fp32, bf16 = 40e12, 990e12
    run = dict(scale["runs"][0], peak_gpu_reserved=3 * 2**30, flops_per_s=1e14, mfu=1e14 / fp32,
               accelerate={**scale["runs"][0]["accelerate"], "peak_gpu_bytes": 5 * 2**30})
    gpu = {**scale, "hardware": {**scale["hardware"], "gpu": "NVIDIA H200"},
           "settings": {**scale["settings"], "device": "cuda"}, "runs": [run],
           "peak": {"flops": fp32, "source": "measured fp32 2048^3 GEMM, 16 threads"},
           "compute_peak": {"flops": bf16, "source": "NVIDIA H200 dense bfloat16 datasheet"}}
    page = tmp_path / "PERFORMANCE.md"
    page.write_text("# Performance\n")
    monkeypatch.setattr(bench_docs, "DOCS", page)
    monkeypatch.setattr(bench_docs, "RESULTS", tmp_path / "results")
    bench_docs.write_scale_docs(gpu)
    (rec,) = bench_docs.read_records("bench_scale")
    assert rec["peak"]["flops"] == bf16 and abs(rec["run"]["mfu"] - 1e14 / bf16) < 1e-12
    assert "| NVIDIA H200 |" in page.read_text() and "| 10.1% |" in page.read_text()
    (r,) = scale_extras.records(gpu)
    assert r["device"] == "cuda" and r["peak_rss_growth_bytes"] is None and r["peak_gpu_bytes"] == 3 * 2**30
    assert r["accelerate_peak_gpu_bytes"] == 5 * 2**30
    table = scale_docs.render_gpu([r])
    row = next(line for line in table.splitlines() if line.startswith("| tiny |"))
    assert "| 3.00 |" in row and f"({100 * r['eval_flops_per_s'] / bf16:.0f}%)" in row and "(5.00) |" in row


def test_the_sweep_plans_in_the_runs_dtype_with_the_checkpoints_state(results):
    """The planner check measures the choice the prune made: planned in the run's compute dtype (bf16
    on an AMX CPU, --dtype given) and with the checkpoint's page-cache share and disk rate."""
    work, _, _ = results
    sys.path.insert(0, str(TOOLS))
    import bench_scale

    from bonsai_lite.io.model import StreamedModel
    from bonsai_lite.search.planner import Work

    model = StreamedModel.open(work / "tiny")
    sw = bench_scale.sweep(model, Work(2, 2, 16), "cpu", 64 * 2**20, per_order=1, max_predicted=10.0, seed=0,
                           peak=1e9, deadline=math.inf, checkpoint=work / "tiny", dtype="bfloat16")
    assert len(sw["runs"]) >= 2 and {x["plan"]["dtype"] for x in sw["runs"]} == {"bfloat16"}


def test_decode_ab_times_two_modeling_files_on_one_export(tiny_models, tmp_path):
    """tools/decode_ab.py: one export loaded with the modeling file of a git revision and with the
    current one (here the same revision), both decoding the same tokens."""
    from bonsai_lite.export import export_pruned
    from bonsai_lite.structure import load_spec
    from test_export import per_layer_structure

    parent, out = tiny_models["llama-gqa-tied"], tmp_path / "pruned"
    export_pruned(parent, per_layer_structure(load_spec(parent), seed=0), out)
    r = _run("decode_ab.py", str(out), "--baseline", "HEAD", "--prompts", "8,12", "--new-tokens", "3",
             "--repeats", "1")
    assert r["kind"] == "decode_ab" and set(r["results"]) == {"8", "12"} and r["commit"]
    for row in r["results"].values():
        assert row["same_tokens"] and row["baseline"]["median"] > 0 and row["current"]["median"] > 0
