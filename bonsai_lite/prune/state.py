"""Self-describing, atomic run state: JSON metadata + a safetensors file of tensors.

Each commit writes `tensors-<gen>.safetensors` (temp file, fsync, rename), then `state.json`
naming that generation (temp file, fsync, rename), then removes older generations. A kill at any
instant leaves a `state.json` that names a complete tensors file. Nothing here ever unpickles.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bonsai_lite.errors import BonsaiError

STATE = "state.json"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise BonsaiError(f"could not save run state to {path.parent} ({e.strerror}); the previous state is intact, "
                          "free disk space and re-run the same command to resume") from e
    _fsync_dir(path.parent)


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
            tensors_file = self.dir / doc["tensors"]
            self.tensors = load_file(str(tensors_file)) if doc["tensors"] else {}
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
            raise BonsaiError(f"{self.dir}: run state is unreadable ({e.__class__.__name__}); "
                              "pass --restart to start over") from e
        return self

    def commit(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.generation += 1
        name = f"tensors-{self.generation:06d}.safetensors"
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}
        tmp = self.dir / (name + ".tmp")
        try:
            save_file(tensors, str(tmp))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / name)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            self.generation -= 1
            raise BonsaiError(f"could not save run state to {self.dir} ({e.strerror}); the previous state is intact, "
                              "free disk space and re-run the same command to resume") from e
        doc = {"generation": self.generation, "tensors": name, "meta": self.meta}
        atomic_write_bytes(self.dir / STATE, json.dumps(doc, indent=1, default=str).encode())
        for old in self.dir.glob("tensors-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)
