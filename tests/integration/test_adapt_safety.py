"""`adapt` never deletes what it did not create, never writes over its inputs, locks its run directory,
and turns a full disk into one clear line with nothing half-written left behind (issue 11, items 1-5).

Every case hashes all inputs (and the user's files beside them) before and after.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import bonsai_lite.io.outdir as outdir_mod
from bonsai_lite.cli.main import main
from bonsai_lite.prune.state import RunState
from conftest import observe
from test_adapt import pair  # noqa: F401 (the same parent/pruned/text fixture)

pytestmark = pytest.mark.integration
torch.set_num_threads(1)


def digest(*paths: Path) -> dict[str, str]:
    """SHA-256 of every file under the given files/directories (missing ones are recorded as absent)."""
    out = {}
    for p in paths:
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.exists() else []
        out[str(p)] = "absent" if not p.exists() else {str(f): hashlib.sha256(f.read_bytes()).hexdigest()
                                                       for f in files}
    return out


def adapt_argv(pruned, text, out, *extra, parent=None) -> list[str]:
    dist = ["--parent", str(parent), "--top-k", "8"] if parent else ["--distill-weight", "0"]
    return ["adapt", str(pruned), "--data", str(text), "--out", str(out), "--max-steps", "2", "--seq-len", "32",
            "--batch-size", "2", "--rank", "4", "--save-every", "1", "--device", "cpu", *dist, *extra]


def fails(argv, capsys, *needles) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("bonsai-lite: error: ") == 1 and "Traceback" not in err, err
    line = err[err.index("bonsai-lite: error: "):]
    assert line.count("\n") == 1, line
    for n in needles:
        assert n in line, (n, line)
    observe(line)
    return line


def user_dir(path: Path, content: str = "mine") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "notes.txt").write_text(content)
    return path


def test_fixed_name_siblings_of_the_output_are_left_alone(pair, tmp_path):
    """Item 1: a user's A.tmp/ and A.old/ survive `adapt --out A --overwrite`; the earlier A is replaced."""
    parent, pruned, text = pair
    out = user_dir(tmp_path / "A", "earlier output")
    siblings = [user_dir(tmp_path / "A.tmp"), user_dir(tmp_path / "A.old")]
    before = digest(parent, pruned, text, *siblings)
    assert main(adapt_argv(pruned, text, out, "--overwrite")) == 0
    assert digest(parent, pruned, text, *siblings) == before
    assert (out / "config.json").is_file() and not (out / "notes.txt").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers  # no staging or swapped-out directory remains


def test_input_named_like_the_old_temporary_directory_survives(pair, tmp_path):
    """Item 1: `adapt Q.tmp --out Q` used to delete its own input."""
    parent, pruned, text = pair
    q_tmp = Path(shutil.copytree(pruned, tmp_path / "Q.tmp"))
    before = digest(q_tmp, text)
    assert main(adapt_argv(q_tmp, text, tmp_path / "Q")) == 0
    assert digest(q_tmp, text) == before and (tmp_path / "Q" / "config.json").is_file()


def test_restart_removes_only_the_saved_state(pair, tmp_path):
    """Item 2: `--restart` used to rmtree RUN_DIR/train with whatever the user had put there."""
    parent, pruned, text = pair
    run = tmp_path / "out.run"
    assert main(adapt_argv(pruned, text, tmp_path / "out")) == 0
    mine = run / "train" / "notes.txt"
    mine.write_text("keep me")
    before = digest(pruned, text, mine)
    assert main(adapt_argv(pruned, text, tmp_path / "out2", "--restart", "--run-dir", str(run))) == 0
    assert digest(pruned, text, mine) == before
    assert RunState(run / "train").load().meta["step"] == 2


@pytest.mark.parametrize("where", ["parent", "pruned", "above-pruned"])
def test_output_onto_an_input_is_refused_before_any_work(pair, tmp_path, capsys, where):
    """Item 3: `--overwrite` with --out equal to the parent, or to a folder that contains the pruned input."""
    parent, pruned, text = pair
    root = tmp_path / "models"
    p = Path(shutil.copytree(parent, root / "parent"))
    s = Path(shutil.copytree(pruned, root / "inner" / "pruned"))
    out = {"parent": p, "pruned": s, "above-pruned": root / "inner"}[where]
    before = digest(root, text)
    fails(adapt_argv(s, text, out, "--overwrite", parent=p), capsys, "writing there would replace it")
    assert digest(root, text) == before
    assert not (tmp_path / "models" / "inner.run").exists() and not Path(f"{out}.run").exists()


def test_run_dir_inside_the_output_is_refused(pair, tmp_path, capsys):
    """Item 3: --run-dir inside --out (which the export replaces) is refused before training."""
    parent, pruned, text = pair
    out = user_dir(tmp_path / "out")
    before = digest(out, pruned)
    fails(adapt_argv(pruned, text, out, "--overwrite", "--run-dir", str(out / "run")), capsys,
          "--run-dir", "inside --out")
    assert digest(out, pruned) == before


def test_second_process_on_the_run_directory_is_refused(pair, tmp_path, capsys):
    """Item 4: a second `adapt` used to 'resume' from the first one's live state."""
    parent, pruned, text = pair
    run = tmp_path / "out.run"
    with RunState(run).lock():  # the first process, mid-run (flock is per open file: same process works)
        before = digest(run, pruned)
        fails(adapt_argv(pruned, text, tmp_path / "out", parent=parent), capsys, "in use by another bonsai-lite process")
        assert digest(run, pruned) == before
    assert not (tmp_path / "out").exists()


def test_full_disk_for_the_teacher_cache_is_one_line_not_sigbus(pair, tmp_path, capsys, monkeypatch):
    """Item 5: the cache's memmaps were sparse, so a full disk was a SIGBUS mid-write; now the blocks are
    reserved up front (posix_fallocate) and a failure is a message, with no half-made cache left."""
    parent, pruned, text = pair

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    before = digest(parent, pruned, text)
    fails(adapt_argv(pruned, text, tmp_path / "out", parent=parent), capsys, "cannot create the teacher cache",
          "No space left on device", "--teacher-cache")
    assert digest(parent, pruned, text) == before
    assert not (tmp_path / "out.run" / "teacher").exists() and not (tmp_path / "out").exists()


def test_full_disk_while_merging_leaves_no_partial_output_and_resumes(pair, tmp_path, capsys, monkeypatch, caplog):
    """Item 5: a full disk in the merge was a traceback that left a partial directory."""
    parent, pruned, text = pair
    out = user_dir(tmp_path / "out", "earlier output")
    real, calls = Path.write_bytes, []

    def fills_up(self, data):
        calls.append(self.name)
        if self.suffix == ".safetensors" and self.parent.name.startswith(".out.partial-") and len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", fills_up)
    before = digest(pruned, text, out)
    fails(adapt_argv(pruned, text, out, "--overwrite"), capsys, "could not write", "No space left on device",
          "partial output was removed", "re-run the same command")
    monkeypatch.undo()
    assert digest(pruned, text, out) == before  # the earlier output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.run"]
    assert RunState(tmp_path / "out.run" / "train").load().meta["step"] == 2
    with caplog.at_level("INFO"):
        assert main(adapt_argv(pruned, text, out, "--overwrite")) == 0
    assert "resuming at step 2" in caplog.text and (out / "config.json").is_file()


def test_too_little_free_space_is_refused_before_training(pair, tmp_path, capsys, monkeypatch):
    """Item 5: free space for the output and a new teacher cache is checked first (1 byte free, simulated)."""
    parent, pruned, text = pair
    monkeypatch.setattr(outdir_mod.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**6, 10**6 - 1, 1))
    fails(adapt_argv(pruned, text, tmp_path / "out", parent=parent), capsys, "not enough disk space",
          "the adapted model", "the teacher cache")
    assert not (tmp_path / "out.run" / "train").exists()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 256 KiB filesystem (root only; skipped elsewhere), unmounted afterwards."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_small_filesystem_is_refused_up_front(pair, small_tmpfs, capsys, monkeypatch):
    """Item 5: a real 256 KiB tmpfs (root only); the previous code died there with SIGBUS ("Bus error")."""
    parent, pruned, text = pair
    monkeypatch.setattr(outdir_mod, "DISK_HEADROOM_BYTES", 0)  # judge by the real need alone
    before = digest(parent, pruned, text)
    fails(adapt_argv(pruned, text, small_tmpfs / "out", parent=parent), capsys, "not enough disk space",
          str(small_tmpfs))
    assert digest(parent, pruned, text) == before
    assert not (small_tmpfs / "out").exists()
