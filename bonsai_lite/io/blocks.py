"""Materialise one decoder block (or the embedding rows, final norm, LM-head chunks) at a time.

Every tensor comes from the lazy `Checkpoint` (mapped, not copied: `Checkpoint.map`), is cut to the
current `Structure` and cast to the compute dtype on its way to the device; the caller drops the
block when done, so at most the blocks the memory plan allows (one, or two with prefetch) are ever
alive. A weight that needs neither cut nor cast is the mapping itself.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from bonsai_lite.io.checkpoint import Checkpoint
from bonsai_lite.ops import BlockWeights, equal_kv_groups
from bonsai_lite.prune.slicing import slice_param
from bonsai_lite.structure import LayerStructure, ModelSpec


class BlockLoader:
    """``biases`` maps full bias names to tensors that replace the checkpoint's (compensation biases
    folded in by earlier pruning iterations: without them a later iteration would search a model
    that lost its compensation). ``fills`` maps a layer to the calibration means that replace
    masked units' outputs (``(head_fill, mlp_fill)``, in the layer's current structure)."""

    def __init__(self, ckpt: Checkpoint, spec: ModelSpec, layers: tuple[LayerStructure, ...], *, device, dtype,
                 biases: Mapping[str, torch.Tensor] | None = None,
                 fills: Mapping[int, tuple[torch.Tensor | None, torch.Tensor | None]] | None = None):
        self.ckpt, self.spec, self.layers = ckpt, spec, layers
        self.biases, self.fills = dict(biases or {}), dict(fills or {})
        self.device, self.dtype = torch.device(device), dtype
        self.bytes_to_device = 0

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.dtype)
        if self.device.type == "cuda":
            t = t.pin_memory().to(self.device, non_blocking=True)
        self.bytes_to_device += t.numel() * t.element_size()
        return t

    def block(self, layer: int) -> BlockWeights:
        names = self.spec.adapter.block_tensor_names(layer)
        structure = self.layers[layer]
        kw: dict[str, torch.Tensor | None] = {}
        for key, name in names.items():
            is_bias = key.endswith("_b")
            if is_bias and name in self.biases:  # output biases (o/down): hidden-sized, never sliced
                kw[key] = self._to_device(self.biases[name])
                continue
            if name not in self.ckpt.infos:
                if not is_bias:
                    self.ckpt.info(name)  # raises a clear "tensor missing" error
                kw[key] = None
                continue
            role = key.rsplit("_", 1)[0] if key not in ("attn_norm", "mlp_norm") else key
            t = slice_param(self.ckpt.map(name), role, is_bias=is_bias, layer=structure, head_dim=self.spec.head_dim)
            kw[key] = self._to_device(t)
        head_fill, mlp_fill = self.fills.get(layer, (None, None))
        for key, fill in (("head_fill", head_fill), ("mlp_fill", mlp_fill)):
            kw[key] = None if fill is None else self._to_device(fill)
        kv_map = structure.kv_map
        return BlockWeights(kv_map=kv_map.to(self.device), head_dim=self.spec.head_dim,
                            kv_equal=equal_kv_groups(kv_map.tolist(), len(structure.kv)), **kw)

    def block_bytes(self, layer: int) -> int:
        """Bytes of the block in the compute dtype after slicing (what lands on the device)."""
        return self.spec.block_params(self.layers[layer]) * torch.empty(0, dtype=self.dtype).element_size()

    def final_norm(self) -> torch.Tensor:
        return self._to_device(self.ckpt.read(self.spec.adapter.final_norm))

    def embedding_rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows for the given token ids (host memory, compute dtype)."""
        return self.ckpt.read_rows(self.spec.adapter.embed, token_ids).to(self.dtype)

    def head_name(self) -> str:
        a = self.spec.adapter
        return a.embed if self.spec.tie_embeddings or a.lm_head not in self.ckpt.infos else a.lm_head

    def head_chunks(self, chunk_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        name = self.head_name()
        vocab = self.ckpt.info(name).shape[0]
        for v0 in range(0, vocab, chunk_rows):
            yield v0, self._to_device(self.ckpt.map(name, slice(v0, min(vocab, v0 + chunk_rows))))
