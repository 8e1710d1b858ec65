"""A handle on a checkpoint on disk: its spec, its current structure, and loaders for its parts."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bonsai_lite.io.blocks import BlockLoader
from bonsai_lite.io.checkpoint import Checkpoint
from bonsai_lite.structure import LayerStructure, ModelSpec, load_spec, rope_inv_freq


@dataclass(frozen=True)
class StreamedModel:
    root: Path
    spec: ModelSpec
    ckpt: Checkpoint
    layers: tuple[LayerStructure, ...]

    @classmethod
    def open(cls, model_dir: str | Path) -> "StreamedModel":
        spec = load_spec(model_dir)
        return cls(root=Path(model_dir), spec=spec, ckpt=Checkpoint(model_dir), layers=spec.layers)

    def with_layers(self, layers: tuple[LayerStructure, ...]) -> "StreamedModel":
        return replace(self, layers=layers)

    def loader(self, *, device, dtype) -> BlockLoader:
        return BlockLoader(self.ckpt, self.spec, self.layers, device=device, dtype=dtype)

    def rope(self) -> tuple[torch.Tensor, float]:
        return rope_inv_freq(self.spec)

    def params(self) -> int:
        """Parameters of the current structure, embeddings and head included."""
        return self.spec.non_embedding_params(self.layers) + self.spec.embedding_params()

    def unit_counts(self) -> list[tuple[int, int]]:
        return [(len(s.heads), len(s.mlp)) for s in self.layers]
