"""Bad input and faults of `bonsai-lite prune`: one clear line each, nothing destroyed, resumable.

Every case runs the CLI entry point in-process on a tiny sharded model and checks the message and
that an earlier output and run state are byte-for-byte untouched (docs/RELIABILITY.md).
"""
from __future__ import annotations

import builtins
import errno
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import bonsai_lite.export.safetensors as export_mod
import bonsai_lite.prune.loop as loop_mod
import bonsai_lite.prune.ranking as ranking
import bonsai_lite.prune.state as state_mod
from bonsai_lite.adapters import SUPPORTED_ARCHITECTURES
from bonsai_lite.cli.main import main
from bonsai_lite.errors import CheckpointError
from bonsai_lite.io.checkpoint import Checkpoint
from bonsai_lite.io.model import StreamedModel
from bonsai_lite.prune.state import RunState
from bonsai_lite.search.cache import ActivationCache
from bonsai_lite.search.machine import detect_machine
from bonsai_lite.search.planner import Work, make_plan

from conftest import observe, prunable_model  # noqa: E402

pytestmark = pytest.mark.integration


def prune_args(model, calib, out, *extra) -> list[str]:
    return ["prune", str(model), "--sparsity", "0.3", "--p-iter", "0.1", "--masks-per-iter", "8",
            "--calib-samples", "2", "--seq-len", "16", "--calib", str(calib), "--out", str(out), "--device", "cpu",
            "--checkpoint-masks", "4", "--regression", "unit", *extra]


def snapshot(*dirs: Path) -> dict:
    return {str(p): p.read_bytes() for d in dirs if d.exists() for p in sorted(d.rglob("*")) if p.is_file()}


def weights(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(wa[k].dtype == wb[k].dtype and torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def done(tiny_models, tmp_path_factory):
    """A finished run: its output and run state are the 'earlier results' every case must leave alone."""
    root = tmp_path_factory.mktemp("bad")
    model, calib = prunable_model(tiny_models["llama-gqa-tied"], root)
    out = root / "out"
    assert main(prune_args(model, calib, out)) == 0
    return root, model, calib, out


def fails(argv, capsys, *needles) -> str:
    """Runs the CLI, expects exit 2 and one line on stderr containing every needle."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("bonsai-lite: error: ") == 1 and "Traceback" not in err, err
    line = err[err.index("bonsai-lite: error: "):]  # after any progress bar's closing escape codes
    assert line.count("\n") == 1 and line.endswith("\n"), line
    for n in needles:
        assert n in line, (n, line)
    observe(line)
    return line


@pytest.fixture
def untouched(done, tmp_path):
    """Checks after the test that the earlier output and run state did not change and that the
    output the failing command was given (`tmp_path / "new"`) was not created."""
    root, _, _, out = done
    before = snapshot(out, Path(str(out) + ".run"))
    yield tmp_path / "new"
    assert snapshot(out, Path(str(out) + ".run")) == before
    assert not (tmp_path / "new").exists() and not (tmp_path / "new.run").exists()
    assert not list(tmp_path.glob(".new.partial-*"))


def copy_model(model: Path, dest: Path) -> Path:
    shutil.copytree(model, dest)
    return dest


# ---- model directory ------------------------------------------------------------------------------

def test_missing_model_dir(done, untouched, capsys, tmp_path):
    _, _, calib, _ = done
    fails(prune_args(tmp_path / "nope", calib, untouched), capsys, "nope", "model directory not found")


def test_empty_model_dir(done, untouched, capsys, tmp_path):
    _, _, calib, _ = done
    (tmp_path / "empty").mkdir()
    fails(prune_args(tmp_path / "empty", calib, untouched), capsys, "no config.json")


def test_unsupported_architecture(done, untouched, capsys, tmp_path):
    _, model, calib, _ = done
    bad = copy_model(model, tmp_path / "gpt2")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    line = fails(prune_args(bad, calib, untouched), capsys, "unsupported architecture", "GPT2LMHeadModel")
    assert all(a in line for a in SUPPORTED_ARCHITECTURES)


class _Payload:
    """Unpickling this creates a file: proof that a pickle was (or was not) loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_only_checkpoint_is_refused_never_unpickled(done, untouched, capsys, tmp_path):
    _, model, calib, _ = done
    bad = tmp_path / "pickled"
    bad.mkdir()
    shutil.copy(model / "config.json", bad / "config.json")
    marker = tmp_path / "unpickled"
    (bad / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    fails(prune_args(bad, calib, untouched), capsys, "only pickle weights", "pytorch_model.bin", "never unpickles",
          "weights_only=True")
    assert not marker.exists()


def test_corrupt_safetensors_header(done, untouched, capsys, tmp_path):
    _, model, calib, _ = done
    bad = copy_model(model, tmp_path / "corrupt")
    shard = sorted(bad.glob("*.safetensors"))[3]
    raw = bytearray(shard.read_bytes())
    raw[8:40] = b"{garbage" + b"#" * 24
    shard.write_bytes(bytes(raw))
    fails(prune_args(bad, calib, untouched), capsys, shard.name, "corrupt safetensors header", "re-download")
    shard.write_bytes(b"\xff" * 8 + bytes(raw[8:]))  # a header length beyond the file
    fails(prune_args(bad, calib, untouched), capsys, shard.name, "corrupt safetensors header")


def test_truncated_shard(done, untouched, capsys, tmp_path):
    _, model, calib, _ = done
    bad = copy_model(model, tmp_path / "truncated")
    shard = sorted(bad.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    fails(prune_args(bad, calib, untouched), capsys, shard.name, "truncated or corrupt shard", "re-download")


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/outside.safetensors", "sub/../../x.safetensors"])
def test_index_naming_a_file_outside_the_model(done, untouched, capsys, tmp_path, name):
    _, model, calib, _ = done
    bad = copy_model(model, tmp_path / "escape")
    shutil.copy(sorted(bad.glob("*.safetensors"))[0], tmp_path / "outside.safetensors")
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = name
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    fails(prune_args(bad, calib, untouched), capsys, repr(name), "outside the model directory")


def test_hub_cache_symlinks_are_not_outside(done, tmp_path):
    """A Hugging Face cache snapshot links each file to ../../blobs: that layout must load."""
    _, model, _, _ = done
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for f in model.iterdir():
        shutil.copy(f, blobs / f.name)
        (snap / f.name).symlink_to(Path("../..") / "blobs" / f.name)
    assert Checkpoint(snap).infos.keys() == Checkpoint(model).infos.keys()


# ---- settings ------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, needle", [
    (["--sparsity", "1.2"], "--sparsity must be in (0, 1), got 1.2"),
    (["--sparsity", "0"], "--sparsity must be in (0, 1), got 0.0"),
    (["--sparsity", "0.1", "--p-iter", "0.2"], "--p-iter must be in (0, sparsity=0.1], got 0.2"),
    (["--checkpoint-masks", "0"], "--checkpoint-masks must be at least 1"),
])
def test_bad_settings(done, untouched, capsys, flags, needle):
    _, model, calib, _ = done
    fails(prune_args(model, calib, untouched) + flags, capsys, needle)


def test_budget_below_minimum_states_the_minimum(done, untouched, capsys):
    _, model, calib, _ = done
    line = fails(prune_args(model, calib, untouched) + ["--memory-budget", "64KB"], capsys,
                 "too small", "--memory-budget")
    need_mib = int(re.search(r"--memory-budget (\d+)MiB", line).group(1))
    m = StreamedModel.open(model)  # the minimum stated is enough for the first pass of every iteration
    make_plan(m.spec, m.layers, Work(1, 2, 16), detect_machine(device="cpu", budget=need_mib * 2**20))


def test_calibration_text_too_short_states_the_need(done, untouched, capsys, tmp_path):
    _, model, _, _ = done
    short = tmp_path / "short.txt"
    short.write_text("the cat sat on the mat")
    fails(prune_args(model, short, untouched), capsys, "calibration text too short", "need 32 tokens",
          "the text has 6")
    short.write_text("  \n")
    fails(prune_args(model, short, untouched), capsys, "the text file is empty")
    fails(prune_args(model, tmp_path / "missing.txt", untouched), capsys, "missing.txt", "text file not found")


def test_existing_output_is_refused(done, untouched, capsys):
    _, model, calib, out = done
    fails(prune_args(model, calib, out), capsys, str(out), "already exists", "--overwrite")


def test_changed_settings_name_the_keys(done, untouched, capsys):
    _, model, calib, out = done
    run = str(out) + ".run"
    fails(prune_args(model, calib, untouched) + ["--run-dir", run, "--sparsity", "0.4", "--seed", "3"], capsys,
          "different settings", "search.sparsity: 0.3 -> 0.4", "search.seed: 0 -> 3", "--restart")


def test_a_setting_added_since_the_run_started_names_the_flag_that_resumes_it(done, untouched, capsys):
    # the finished run's state has no prior_memory (off, as runs from before the setting): asking for
    # the memory must not resume it silently, and the error says how to resume it as it ran
    _, model, calib, out = done
    fails(prune_args(model, calib, untouched) + ["--run-dir", str(out) + ".run", "--prior-memory", "1"], capsys,
          "different settings", "search.prior_memory: None -> 1.0", "--prior-memory 0 to resume it as it ran",
          "--restart")


def test_changed_calibration_text_is_refused(done, untouched, capsys, tmp_path):
    _, model, calib, out = done
    other = tmp_path / "calib.txt"
    other.write_text(calib.read_text()[::-1])
    fails(prune_args(model, other, untouched) + ["--run-dir", str(out) + ".run"], capsys,
          "different settings", "calib.text", "calib_tokens_sha256")


def test_restart_discards_the_saved_run(done, tmp_path, caplog):
    _, model, calib, out = done
    run = Path(shutil.copytree(str(out) + ".run", tmp_path / "run"))
    old_lines = (run / "metrics.jsonl").read_text().splitlines()
    assert sum('"stage": "iteration"' in x for x in old_lines) >= 2
    with caplog.at_level("INFO"):
        assert main(prune_args(model, calib, tmp_path / "o") + ["--run-dir", str(run), "--sparsity", "0.2",
                                                                 "--restart"]) == 0
    assert "--restart: discarding the run state" in caplog.text
    meta = RunState(run).load().meta
    assert meta["config"]["search"]["sparsity"] == 0.2 and meta["iteration"] == 2
    # the discarded run's metrics went with it: `report` and bench_prune read this run's stages only
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in lines if m["stage"] == "iteration"] == [0, 1]


def test_unreadable_run_state(done, capsys, tmp_path):
    _, model, calib, _ = done
    run = tmp_path / "run"
    run.mkdir()
    (run / "state.json").write_text('{"generation": 3, "tens')
    fails(prune_args(model, calib, tmp_path / "o") + ["--run-dir", str(run)], capsys, "run state is unreadable",
          "--restart")
    assert (run / "state.json").read_text() == '{"generation": 3, "tens'


def test_run_dir_in_use(done, untouched, capsys):
    _, model, calib, out = done
    run = str(out) + ".run"
    with RunState(run).lock():
        fails(prune_args(model, calib, untouched) + ["--run-dir", run], capsys, "in use by another bonsai-lite process")


def test_debug_shows_the_traceback(done, tmp_path):
    _, _, calib, _ = done
    with pytest.raises(CheckpointError, match="model directory not found"):
        main(["--debug"] + prune_args(tmp_path / "nope", calib, tmp_path / "o"))


# ---- full disk -----------------------------------------------------------------------------------

class _FullAfter:
    """`open` whose files refuse writes (ENOSPC) once `budget` files have been written."""

    def __init__(self, budget: int):
        self.budget = budget

    def __call__(self, path, mode="r", *args, **kw):
        f = builtins.open(path, mode, *args, **kw)
        if "w" not in mode and "+" not in mode:
            return f
        self.budget -= 1
        if self.budget >= 0:
            return f

        class Full:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def write(self, data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            def __getattr__(self, name):
                return getattr(f, name)

        return Full()


def test_full_disk_while_saving_run_state(done, capsys, monkeypatch, tmp_path, caplog):
    root, model, calib, out = done
    new = tmp_path / "new"
    monkeypatch.setattr(state_mod, "open", _FullAfter(9), raising=False)  # dies in the 5th commit
    fails(prune_args(model, calib, new), capsys, "could not save run state", "No space left on device",
          "the previous state is intact", "re-run the same command to resume")
    run = tmp_path / "new.run"
    st = RunState(run).load()
    assert st.generation == 4 and not list(run.glob("*.tmp")) and len(list(run.glob("tensors-*"))) == 1
    assert not new.exists()
    assert st.meta["iteration"] == 1 and st.meta["pending"] is None
    monkeypatch.undo()
    with caplog.at_level("INFO"):
        assert main(prune_args(model, calib, new)) == 0
    assert "resuming" in caplog.text and "at iteration 2/3" in caplog.text
    assert RunState(run).load().meta["iteration"] == 3
    assert same_weights(new, out)


def test_full_disk_while_exporting(done, capsys, monkeypatch, tmp_path, caplog):
    root, model, calib, out = done
    new = tmp_path / "new"
    real, calls = export_mod.write_shard, []

    def fills_up(job, *args, **kw):
        calls.append(job.file)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(job, *args, **kw)

    monkeypatch.setattr(export_mod, "write_shard", fills_up)
    fails(prune_args(model, calib, new), capsys, "disk full while exporting", "partial export was removed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.run"]  # no output, no partial directory
    assert RunState(tmp_path / "new.run").load().meta["iteration"] == 3  # the search is safe
    monkeypatch.undo()
    with caplog.at_level("INFO"):
        assert main(prune_args(model, calib, new)) == 0
    assert "the search finished before" in caplog.text
    assert same_weights(new, out)


def test_full_disk_while_spilling_activations(done, capsys, monkeypatch, tmp_path, caplog):
    """Hidden states spilled to disk (forced); the disk fills up in the middle of an evaluation."""
    root, model, calib, out = done
    new = tmp_path / "new"
    real_plan, real_init, writes = loop_mod.Pruner._plan, ActivationCache.__init__, [0]

    def disk_plan(self, *a, **kw):
        import dataclasses

        return dataclasses.replace(real_plan(self, *a, **kw), cache="disk")

    def failing_init(self, *a, **kw):
        real_init(self, *a, **kw)
        f = self._file

        class Filling:
            def write(self, data):
                writes[0] += 1
                if writes[0] > 10:  # dense pass 5 (embeddings + 3 blocks + final norm), first chunk 5
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return f.write(data)

            def __getattr__(self, name):
                return getattr(f, name)

        self._file = Filling()

    monkeypatch.setattr(loop_mod.Pruner, "_plan", disk_plan)
    monkeypatch.setattr(ActivationCache, "__init__", failing_init)
    fails(prune_args(model, calib, new) + ["--spill-dir", str(tmp_path / "spill")], capsys,
          "could not spill activations to disk", "No space left on device", "re-run the same command to resume")
    st = RunState(tmp_path / "new.run").load()
    assert st.meta["iteration"] == 0 and st.meta["masks_done"] == 4  # dense pass and a chunk got through
    monkeypatch.undo()
    with caplog.at_level("INFO"):
        assert main(prune_args(model, calib, new) + ["--spill-dir", str(tmp_path / "spill")]) == 0
    assert "resuming" in caplog.text and "already evaluated" in caplog.text
    assert same_weights(new, out)


def test_short_spill_writes_are_completed(tmp_path):
    """A raw write may write less than asked when the disk is nearly full; the rest must follow."""
    cache = ActivationCache(rows=3, tokens=4, hidden=5, dtype=torch.float32, location="disk", device="cpu",
                            spill_dir=tmp_path)
    f = cache._file

    class Short:
        def write(self, data):
            return f.write(data[: max(1, len(data) // 3)])

        def __getattr__(self, name):
            return getattr(f, name)

    cache._file = Short()
    x = torch.randn(2, 4, 5)
    cache.put(slice(1, 3), x)
    assert torch.equal(cache.get(slice(1, 3)), x)
    cache.close()


# ---- numerical faults ----------------------------------------------------------------------------

def _spy_regression(monkeypatch):
    seen = []
    real = ranking.fit_relevance

    def spy(masks, losses, **kw):
        seen.append((masks.clone(), losses.clone()))
        return real(masks, losses, **kw)

    monkeypatch.setattr(ranking, "fit_relevance", spy)
    return seen


def _poison(monkeypatch, bad: dict[int, float], *, dtypes=("float32",)):
    """Sub-model k of every chunk evaluated in one of `dtypes` gets loss bad[k] (NaN or inf)."""
    real, calls = loop_mod.evaluate, []

    def evaluate(model, tokens, masks, plan, **kw):
        res = real(model, tokens, masks, plan, **kw)
        calls.append((plan.dtype, None if masks is None else len(masks)))
        if masks is not None and plan.dtype in dtypes:
            for k, v in bad.items():
                if k < len(res.nll):
                    res.nll[k] = v
        return res

    monkeypatch.setattr(loop_mod, "evaluate", evaluate)
    return calls


def test_nan_losses_never_reach_the_regression(done, monkeypatch, tmp_path, caplog):
    _, model, calib, _ = done
    seen = _spy_regression(monkeypatch)
    _poison(monkeypatch, {1: float("nan"), 2: float("inf")})
    with caplog.at_level("WARNING"):
        assert main(prune_args(model, calib, tmp_path / "o", "--checkpoint-masks", "8")) == 0
    assert len(seen) == 3 and all(len(m) == 6 and torch.isfinite(l).all() for m, l in seen)
    assert "left out of the regression" in caplog.text and "[1, 2]" in caplog.text
    history = RunState(tmp_path / "o.run").load().meta["history"]
    assert [h["masks_dropped"] for h in history] == [2, 2, 2]


def test_overflow_in_half_precision_is_reevaluated_in_float32(done, monkeypatch, tmp_path, caplog):
    _, model, calib, _ = done
    seen = _spy_regression(monkeypatch)
    calls = _poison(monkeypatch, {0: float("inf")}, dtypes=("float16",))
    with caplog.at_level("WARNING"):
        assert main(prune_args(model, calib, tmp_path / "o", "--dtype", "float16", "--checkpoint-masks", "8")) == 0
    assert ("float32", 1) in calls  # the overflowed sub-model, again in float32
    assert len(seen) == 3 and all(len(m) == 8 and torch.isfinite(l).all() for m, l in seen)
    assert "re-evaluating them in float32" in caplog.text


def test_too_few_finite_losses(done, monkeypatch, capsys, tmp_path):
    _, model, calib, _ = done
    _poison(monkeypatch, {k: float("nan") for k in range(5)})
    fails(prune_args(model, calib, tmp_path / "o", "--checkpoint-masks", "8"), capsys,
          "only 3 of 8 sub-models have a finite loss", "--dtype float32")
