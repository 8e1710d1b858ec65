"""A prune under the real `torchrun` (2 CPU processes, gloo) against a single-process run of the
same settings: same pruned weights, same per-sub-model losses; a rank SIGKILLed mid-evaluation and a
relaunch (with 2 ranks, then with 1) ends identical; a rank with another model file or a budget
too small is refused before any evaluation; a rank that dies or hangs ends the others with a message.
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

from conftest import make_tiny_model, prunable_model  # noqa: E402

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
LAUNCH = Path(__file__).with_name("dist_launch.py")


def run(model, calib, out, *, ranks: int, fault: str | None = None, env_extra: dict | None = None):
    # 2 iterations x 8 sub-models, a commit every 4 sub-models (2 per rank under 2 ranks)
    args = ["prune", str(model), "--sparsity", "0.2", "--p-iter", "0.1", "--masks-per-iter", "8", "--calib-samples",
            "2", "--seq-len", "16", "--calib", str(calib), "--out", str(out), "--device", "cpu", "--seed", "7",
            "--checkpoint-masks", "4", "--dist-timeout", "60", "--json", "--regression", "unit"]
    if ranks == 1:
        argv = [sys.executable, "-m", "bonsai_lite", *args]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                str(LAUNCH), *args]
    env = {k: v for k, v in os.environ.items() if k not in ("BONSAI_LITE_FAULT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO), TQDM_DISABLE="1", **(env_extra or {}))
    if fault:
        env["BONSAI_LITE_FAULT"] = fault
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


def tensors(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


def assert_same_run(out: Path, ref: Path) -> None:
    a, b = tensors(ref), tensors(out)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for name in ("config.json", "model.safetensors.index.json"):
        assert json.loads((out / name).read_text()) == json.loads((ref / name).read_text())
    sa = RunState(ref.with_name(ref.name + ".run")).load()
    sb = RunState(out.with_name(out.name + ".run")).load()
    assert sa.meta["layers"] == sb.meta["layers"]
    losses = sorted(k for k in sa.tensors if k.startswith("losses:"))
    assert losses == ["losses:0", "losses:1"] and losses == sorted(k for k in sb.tensors if k.startswith("losses:"))
    for k in losses:
        assert torch.isfinite(sa.tensors[k]).all()
        torch.testing.assert_close(sb.tensors[k], sa.tensors[k], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model, calib = prunable_model(tiny_models["llama-gqa-tied"], root)
    ref = run(model, calib, root / "ref", ranks=1)
    assert ref.returncode == 0, ref.stderr[-2000:]
    return model, calib, root / "ref"


def test_two_ranks_equal_one(setup, tmp_path):
    model, calib, ref = setup
    p = run(model, calib, tmp_path / "out", ranks=2)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])  # rank 0 alone prints the result
    assert result["world_size"] == 2 and len(p.stdout.strip().splitlines()) == 1
    assert "[rank 1] evaluated 8 sub-models for rank 0" in p.stderr  # half of 2 x 8
    assert_same_run(tmp_path / "out", ref)


def test_rank_killed_mid_evaluation_resumes_identical(setup, tmp_path):
    model, calib, ref = setup
    out = tmp_path / "out"
    # rank 1 dies while evaluating its share of the 2nd chunk: only the 1st chunk is committed
    p = run(model, calib, out, ranks=2, fault="evaluate:2@1")
    assert p.returncode != 0 and not out.exists(), p.stderr[-3000:]
    meta = RunState(tmp_path / "out.run").load().meta
    assert (meta["iteration"], meta["masks_done"]) == (0, 4)
    # relaunched with 2 ranks: resumes at sub-model 4; rank 0 dies after iteration 2's first chunk
    p = run(model, calib, out, ranks=2, fault="evaluate:2@0")
    assert p.returncode != 0 and not out.exists(), p.stderr[-3000:]
    assert "resuming" in p.stderr
    meta = RunState(tmp_path / "out.run").load().meta
    assert (meta["iteration"], meta["masks_done"]) == (1, 4)
    # and finished by a single process
    p = run(model, calib, out, ranks=1)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_run(out, ref)


def test_ranks_with_another_model_or_a_budget_too_small_are_refused_before_work(setup, tmp_path):
    model, calib, _ = setup
    other, _ = prunable_model(make_tiny_model(tmp_path / "tiny2", "llama-gqa-tied", seed=5), tmp_path / "o")
    p = run(model, calib, tmp_path / "out", ranks=3, env_extra={"BONSAI_TEST_OTHER_MODEL": f"1:{other}",
                                                                "BONSAI_TEST_EXTRA_ARGS": "2:--memory-budget 64KB"})
    assert p.returncode != 0
    assert "rank 1 differs from rank 0: model_fingerprint" in p.stderr, p.stderr[-3000:]
    assert "rank 2: memory budget 64.0 KiB is too small" in p.stderr, p.stderr[-3000:]
    assert "plan:" not in p.stderr  # no pass was planned, let alone run
    assert not (tmp_path / "out.run" / "state.json").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["dies", "hangs"])
def test_lost_rank_ends_the_other_with_a_message(setup, tmp_path, how):
    """Ranks started by hand (as srun would; no torchrun agent to stop the survivors): rank 1 is
    SIGKILLed mid-evaluation, or SIGSTOPped once the ranks agreed; rank 0 exits with a one-line
    error instead of hanging: at once when the peer is gone, after --dist-timeout when it hangs."""
    import socket
    import time

    model, calib, _ = setup
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    timeout = "120" if how == "dies" else "5"
    args = ["prune", str(model), "--sparsity", "0.2", "--p-iter", "0.1", "--masks-per-iter", "8", "--calib-samples",
            "2", "--seq-len", "16", "--calib", str(calib), "--out", str(tmp_path / "out"), "--device", "cpu",
            "--checkpoint-masks", "4", "--dist-timeout", timeout, "--regression", "unit"]
    base = {k: v for k, v in os.environ.items() if k != "BONSAI_LITE_FAULT"}
    base.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TQDM_DISABLE="1", WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if how == "dies":
        base["BONSAI_LITE_FAULT"] = "evaluate:1@1"
    logs = [tmp_path / f"rank{r}.err" for r in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "bonsai_lite", *args], cwd=REPO, text=True,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.DEVNULL,
                              stderr=open(logs[r], "w")) for r in range(2)]
    try:
        if how == "hangs":
            deadline = time.monotonic() + 100
            while "agree across ranks" not in logs[1].read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            procs[1].send_signal(signal.SIGSTOP)
        procs[0].wait(timeout=100)  # well under the 120 s timeout when the peer died
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    err0 = logs[0].read_text()
    assert procs[0].returncode == 2, err0[-2000:]
    if how == "dies":
        assert procs[1].returncode == -signal.SIGKILL
    last = err0.strip().splitlines()[-1]
    assert last.startswith("bonsai-lite: error: rank 0: lost contact with the other ranks") and "resume" in last
    assert f"{timeout} s collective timeout" in last


def test_bench_distributed_measures_the_same_losses(setup, tmp_path):
    """tools/bench_distributed.py end to end on the tiny model: fields present, 2 processes == 1 in loss."""
    model, _, _ = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, str(REPO / "tools" / "bench_distributed.py"), "--model", str(model),
                        "--nprocs", "1,2", "--masks", "4", "--samples", "2", "--seq-len", "16",
                        "--out", str(tmp_path / "r.json")], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads(p.stdout)
    assert rec == json.loads((tmp_path / "r.json").read_text())
    assert {"hardware", "commit", "settings", "runs"} <= rec.keys()
    one, two = rec["runs"]
    assert (one["nprocs"], two["nprocs"]) == (1, 2) and len(two["compute_seconds_per_rank"]) == 2
    assert two["max_abs_nll_diff_vs_first"] <= 1e-5 and one["speedup"] == 1.0
    assert two["speedup"] == pytest.approx(two["sub_models_per_s"] / one["sub_models_per_s"])
