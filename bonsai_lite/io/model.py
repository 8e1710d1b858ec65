"""A handle on a checkpoint on disk: its spec, its current structure, and loaders for its parts."""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from bonsai_lite.io.blocks import BlockLoader
from bonsai_lite.io.checkpoint import Checkpoint
from bonsai_lite.io.validate import check_model
from bonsai_lite.structure import LayerStructure, ModelSpec, load_spec, rope_inv_freq


@dataclass(frozen=True)
class StreamedModel:
    root: Path
    spec: ModelSpec
    ckpt: Checkpoint
    layers: tuple[LayerStructure, ...]
    biases: Mapping[str, torch.Tensor] = field(default_factory=dict)  # compensation biases (BlockLoader)
    fills: Mapping[int, tuple] = field(default_factory=dict)  # masked-unit calibration means (BlockLoader)

    @classmethod
    def open(cls, model_dir: str | Path) -> "StreamedModel":
        spec = load_spec(model_dir)
        ckpt = Checkpoint(model_dir)
        check_model(spec, ckpt, spec.layers)  # config.json against the tensors, before any work
        return cls(root=Path(model_dir), spec=spec, ckpt=ckpt, layers=spec.layers)

    def with_layers(self, layers: tuple[LayerStructure, ...]) -> "StreamedModel":
        return replace(self, layers=layers)

    def with_biases(self, biases: Mapping[str, torch.Tensor]) -> "StreamedModel":
        return replace(self, biases=dict(biases))

    def with_fills(self, fills: Mapping[int, tuple]) -> "StreamedModel":
        return replace(self, fills=dict(fills))

    def loader(self, *, device, dtype) -> BlockLoader:
        return BlockLoader(self.ckpt, self.spec, self.layers, device=device, dtype=dtype, biases=self.biases,
                           fills=self.fills)

    def rope(self, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
        return rope_inv_freq(self.spec, seq_len)

    def fingerprint(self) -> str:
        """SHA-256 of config.json and every tensor's name, dtype, shape and size: cheap (no weights are
        read), and it changes when the model at a path is replaced by one of another shape."""
        h = hashlib.sha256((self.root / "config.json").read_bytes())
        for name in sorted(self.ckpt.infos):
            info = self.ckpt.infos[name]
            h.update(f"{name}:{info.dtype}:{info.shape}:{info.nbytes}".encode())
        return h.hexdigest()

    def params(self) -> int:
        """Parameters of the current structure, embeddings and head included."""
        return self.spec.non_embedding_params(self.layers) + self.spec.embedding_params()

    def unit_counts(self) -> list[tuple[int, int]]:
        return [(len(s.heads), len(s.mlp)) for s in self.layers]
