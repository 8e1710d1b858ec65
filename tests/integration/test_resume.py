"""SIGKILL `bonsai-lite prune` at points spread over priors, evaluation, regression and export; resume
each time; the final weights must be bit-identical to an uninterrupted run with the same seed.

The kills come from the `BONSAI_LITE_FAULT` test hook (bonsai_lite/prune/faults.py): the process
SIGKILLs itself the count-th time it reaches the named point, with no cleanup, as an OOM kill would.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bonsai_lite.prune.state import RunState

from conftest import prunable_model  # noqa: E402

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]

# (fault, what the killed run must have left behind: iteration committed, sub-models evaluated in it)
KILLS = [
    ("priors:1", 0, 0),  # iteration 1's priors and masks committed, nothing evaluated
    ("evaluate:3", 0, 6),  # resumed: priors from the state; killed after 3 of 4 chunks
    ("regression:2", 1, 8),  # finishes iteration 1, killed before iteration 2's regression
    ("regressed:2", 2, 8),  # regression of iteration 2 redone, iteration 3 killed after its regression
    ("export:5", 3, 0),  # search done; killed with 5 of 16 shards written
]


def run_cli(model, calib, out, *, fault: str | None = None) -> subprocess.CompletedProcess:
    # 3 iterations x 8 sub-models in chunks of 2 (4 commits per iteration)
    argv = [sys.executable, "-m", "bonsai_lite.cli.main", "prune", str(model), "--sparsity", "0.3", "--p-iter", "0.1",
            "--masks-per-iter", "8", "--calib-samples", "2", "--seq-len", "16", "--calib", str(calib), "--out", str(out),
            "--device", "cpu", "--seed", "7", "--checkpoint-masks", "2", "--regression", "unit"]
    env = {k: v for k, v in os.environ.items() if k != "BONSAI_LITE_FAULT"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO), TQDM_DISABLE="1")
    if fault:
        env["BONSAI_LITE_FAULT"] = fault
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def tensors(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_killed_and_resumed_equals_uninterrupted(tiny_models, tmp_path):
    model, calib = prunable_model(tiny_models["llama-gqa-tied"], tmp_path)
    ref = run_cli(model, calib, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]

    out, run = tmp_path / "out", tmp_path / "out.run"
    for fault, iteration, evaluated in KILLS:
        p = run_cli(model, calib, out, fault=fault)
        assert p.returncode == -signal.SIGKILL, (fault, p.returncode, p.stderr[-2000:])
        meta = RunState(run).load().meta
        assert (meta["iteration"], meta.get("masks_done", 0)) == (iteration, evaluated), fault
        assert not out.exists(), f"{fault}: a killed run left something at the output path"
        if fault.startswith("export"):
            partial = list(tmp_path.glob(".out.partial-*"))
            assert len(partial) == 1 and len(list(partial[0].glob("*.safetensors"))) == 5
            assert not (partial[0] / "config.json").exists()  # never looks like a finished model
    final = run_cli(model, calib, out)
    assert final.returncode == 0, final.stderr[-2000:]
    assert "resuming" in final.stderr and "interrupted export" in final.stderr
    assert not list(tmp_path.glob(".out.partial-*"))

    a, b = tensors(tmp_path / "ref"), tensors(out)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name
    for name in ("config.json", "model.safetensors.index.json"):
        assert json.loads((out / name).read_text()) == json.loads((tmp_path / "ref" / name).read_text())
    hist_ref = RunState(tmp_path / "ref.run").load().meta["history"]
    hist = RunState(run).load().meta["history"]
    drop = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert drop(hist) == drop(hist_ref)


def test_text_sampled_from_the_model_is_not_sampled_again(tiny_models, tmp_path, monkeypatch):
    """Without --calib the text is sampled from the parent (hours on a streamed 7B): a resume reuses it."""
    import bonsai_lite.calib.self_text as self_text
    from bonsai_lite.config import CalibConfig, RunConfig, SearchConfig
    from bonsai_lite.prune.api import SELF_TEXT, calibration_ids

    model, _ = prunable_model(tiny_models["llama-gqa-tied"], tmp_path)
    cfg = RunConfig(model=str(model), out=str(tmp_path / "out"), calib=CalibConfig(text=None, samples=2, seq_len=8),
                    search=SearchConfig(seed=3), device="cpu")
    first = calibration_ids(cfg, model, cache_dir=tmp_path)
    assert (tmp_path / SELF_TEXT).is_file() and first.numel() == 16

    def never(*a, **kw):
        raise AssertionError("sampled again")

    monkeypatch.setattr(self_text, "sample_text_ids", never)
    assert torch.equal(calibration_ids(cfg, model, cache_dir=tmp_path), first)
    other = RunConfig(**{**cfg.__dict__, "search": SearchConfig(seed=4)})  # another seed: not the same text
    with pytest.raises(AssertionError, match="sampled again"):
        calibration_ids(other, model, cache_dir=tmp_path)
