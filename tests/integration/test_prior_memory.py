"""--prior-memory: each iteration's prior averaged with the earlier iterations' on the parent's units.

Reference path: the same run without the memory. Its first iteration is the same run (nothing to
remember yet), so both reach iteration 2 with the same structure; killed there, the memory run's
committed prior must be (own + W x iteration 1's) / (1 + W), where `own` is what the run without
memory committed. And a memory run killed and resumed must export what an uninterrupted one does.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bonsai_lite.io.model import StreamedModel
from bonsai_lite.prune.state import RunState, layers_from_json
from bonsai_lite.structure import UnitLayout, positions_in_parent

from conftest import prunable_model  # noqa: E402

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def prune(model, calib, out, *, memory: float, fault: str | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "bonsai_lite.cli.main", "prune", str(model), "--sparsity", "0.3", "--p-iter", "0.1",
            "--first-step", "0", "--calib-samples", "2", "--seq-len", "16", "--prior-samples", "3",
            "--calib", str(calib), "--out", str(out), "--device", "cpu", "--seed", "3", "--regression", "none",
            "--prior", "flap-parent", "--fluctuation", "variance", "--refit", "off", "--prior-memory", str(memory)]
    env = {k: v for k, v in os.environ.items() if k != "BONSAI_LITE_FAULT"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO), TQDM_DISABLE="1")
    if fault:
        env["BONSAI_LITE_FAULT"] = fault
    p = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == (-signal.SIGKILL if fault else 0), (fault, p.returncode, p.stderr[-2000:])
    return p


def test_the_memory_averages_each_prior_with_the_earlier_ones_and_resumes(tiny_models, tmp_path):
    model, calib = prunable_model(tiny_models["llama-gqa-tied"], tmp_path)
    w = 1.5
    prune(model, calib, tmp_path / "own", memory=0, fault="priors:2")
    own = RunState(tmp_path / "own.run").load()
    prune(model, calib, tmp_path / "mem", memory=w, fault="priors:1")
    first = RunState(tmp_path / "mem.run").load().tensors["prior_memory"].clone()
    prune(model, calib, tmp_path / "mem", memory=w, fault="priors:1")  # resumed at iteration 1, killed at 2's priors
    mem = RunState(tmp_path / "mem.run").load()
    assert mem.meta["iteration"] == own.meta["iteration"] == 1
    assert mem.meta["layers"] == own.meta["layers"]  # iteration 1 had nothing to remember
    layers = layers_from_json(mem.meta["layers"])
    parent = StreamedModel.open(model).layers
    at = positions_in_parent(layers, parent)
    assert torch.isfinite(first).all() and len(first) == UnitLayout.of(parent).total
    expect = (own.tensors["prior"].double() + w * first[at]) / (1 + w)
    torch.testing.assert_close(mem.tensors["prior"].double(), expect, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(mem.tensors["prior"].double(), own.tensors["prior"].double())  # it did something
    torch.testing.assert_close(mem.tensors["prior_memory"][at], expect, rtol=1e-6, atol=1e-9)

    prune(model, calib, tmp_path / "mem", memory=w)  # the rest of the run, resumed
    prune(model, calib, tmp_path / "ref", memory=w)  # uninterrupted
    a = {k: v for f in sorted((tmp_path / "ref").glob("*.safetensors")) for k, v in load_file(f).items()}
    b = {k: v for f in sorted((tmp_path / "mem").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert a.keys() == b.keys() and len(a) > 0 and all(torch.equal(a[k], b[k]) for k in a)
