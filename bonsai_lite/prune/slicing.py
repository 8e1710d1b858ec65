"""Pure slicing rules: which rows/columns of each projection a layer structure keeps.

Shared by the block loader (pruned units are physically removed between Bonsai iterations, so
later iterations are cheaper) and by export; both read parent-checkpoint tensors.
"""
from __future__ import annotations

import torch

from bonsai_lite.adapters import SLICE_RULES
from bonsai_lite.structure import LayerStructure


def kept_index(layer: LayerStructure, kind: str, head_dim: int) -> torch.Tensor:
    """Indices into the checkpoint tensor's sliced dimension for a unit kind ('heads', 'kv', 'mlp')."""
    if kind == "mlp":
        return torch.tensor(layer.mlp, dtype=torch.long)
    slots = layer.heads if kind == "heads" else layer.kv
    if not slots:
        return torch.zeros(0, dtype=torch.long)
    base = torch.tensor(slots, dtype=torch.long)[:, None] * head_dim
    return (base + torch.arange(head_dim)[None, :]).reshape(-1)


def slice_param(tensor: torch.Tensor, role: str, *, is_bias: bool, layer: LayerStructure, head_dim: int) -> torch.Tensor:
    """Cut one projection's weight or bias to the kept units (norms pass through unchanged)."""
    if role not in SLICE_RULES:
        return tensor
    axis, kind = SLICE_RULES[role]
    idx = kept_index(layer, kind, head_dim)
    dim = 0 if axis == "rows" or is_bias else 1
    if is_identity(tensor.shape[dim], idx):  # nothing pruned: avoid a full copy of a dense weight
        return tensor
    if axis == "rows":
        return tensor.index_select(0, idx)
    if is_bias:  # a bias is per output feature; column slicing leaves it intact
        return tensor
    # the same contiguous copy as index_select(1, idx), faster: half the columns of an 8B down_proj
    # took 46 ms against 86 in bf16 and 68 against 78 in fp32 on 2 threads of the EPYC VM
    return tensor[:, idx]


def is_identity(tensor_len: int, idx: torch.Tensor) -> bool:
    return len(idx) == tensor_len and bool(torch.equal(idx, torch.arange(tensor_len)))
