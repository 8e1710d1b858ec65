"""Self-describing, atomic run state: JSON metadata + a safetensors file of tensors.

Each commit writes `tensors-<gen>.safetensors` (temp file, fsync, rename), then `state.json`
naming that generation (temp file, fsync, rename), then removes older generations. A kill at any
instant leaves a `state.json` that names a complete tensors file; a failed write (full disk)
leaves the previous generation in place. Nothing here ever unpickles.

One process at a time: `RunState.lock` holds an exclusive `flock` on `<run dir>/lock`, which the
kernel drops when the process dies, however it dies.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as dump_tensors

from bonsai_lite.errors import BonsaiError
from bonsai_lite.io.outdir import fsync_dir
from bonsai_lite.structure import LayerStructure

STATE = "state.json"
LOCK = "lock"


def _save_error(folder: Path, e: OSError) -> BonsaiError:
    return BonsaiError(f"could not save run state to {folder} ({e.strerror or e}); the previous state is intact: "
                       "free disk space and re-run the same command to resume")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise _save_error(path.parent, e) from e
    fsync_dir(path.parent)


class RunState:
    """`meta` (JSON-able dict) and `tensors` (name -> tensor), committed together."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.meta: dict = {}
        self.tensors: dict[str, torch.Tensor] = {}
        self.generation = 0

    @property
    def exists(self) -> bool:
        return (self.dir / STATE).is_file()

    def load(self) -> "RunState":
        try:
            doc = json.loads((self.dir / STATE).read_text())
            self.meta, self.generation = doc["meta"], int(doc["generation"])
            self.tensors = load_tensors((self.dir / doc["tensors"]).read_bytes()) if doc["tensors"] else {}
        except (OSError, KeyError, TypeError, ValueError, SafetensorError) as e:
            raise BonsaiError(f"{self.dir}: run state is unreadable ({e.__class__.__name__}); "
                              "pass --restart to start over") from e
        return self

    def commit(self) -> None:
        """Write meta and tensors as the next generation; on failure the previous one stays current."""
        name = f"tensors-{self.generation + 1:06d}.safetensors"
        data = dump_tensors({k: v.detach().contiguous().cpu() for k, v in self.tensors.items()})
        doc = json.dumps({"generation": self.generation + 1, "tensors": name, "meta": self.meta}, indent=1,
                         default=str).encode()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _save_error(self.dir, e) from e
        atomic_write_bytes(self.dir / name, data)
        try:
            atomic_write_bytes(self.dir / STATE, doc)
        except BonsaiError:
            (self.dir / name).unlink(missing_ok=True)
            raise
        self.generation += 1
        for old in self.dir.glob("tensors-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def discard(self) -> None:
        """Forget the saved state: remove the files `commit` writes and nothing else (a user's files stay)."""
        ours = [self.dir / STATE, self.dir / f"{STATE}.tmp", *self.dir.glob("tensors-*.safetensors"),
                *self.dir.glob("tensors-*.safetensors.tmp")]
        for path in ours:
            path.unlink(missing_ok=True)
        self.meta, self.tensors, self.generation = {}, {}, 0

    @contextlib.contextmanager
    def lock(self):
        """Exclusive use of the run directory for the duration of the `with` block."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory locks; concurrent runs are the user's to avoid
            yield self
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise BonsaiError(f"cannot use run directory {self.dir} ({e.strerror or e}); choose another --run-dir") from e
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise BonsaiError(f"{self.dir} is in use by another bonsai-lite process; wait for it to finish "
                                  "or choose another --run-dir") from None
            yield self
        finally:
            os.close(fd)


def layers_to_json(layers) -> list[dict]:
    """Per-layer kept units as the run state's JSON holds them."""
    return [{"heads": list(s.heads), "kv_of_head": list(s.kv_of_head), "mlp": list(s.mlp)} for s in layers]


def layers_from_json(data) -> tuple[LayerStructure, ...]:
    """Inverse of `layers_to_json`."""
    return tuple(LayerStructure(tuple(d["heads"]), tuple(d["kv_of_head"]), tuple(d["mlp"])) for d in data)


def group_key(name: str) -> tuple[int, str]:
    """(layer, kind) of a run-state tensor named "<what>:<layer>:<kind>"."""
    _, layer, kind = name.split(":")
    return int(layer), kind


def settings_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'search.sparsity: 0.3 -> 0.5' for every leaf setting that differs."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += settings_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            if k.endswith("sha256"):  # a digest: its first characters tell the two apart
                a, b = (v[:12] if isinstance(v, str) else v for v in (a, b))
            out.append(f"{prefix}{k}: {a} -> {b}")
    return out


def jsonable(x):
    """`x` as it reads back from JSON (tuples as lists, other objects as strings)."""
    return json.loads(json.dumps(x, default=str))
