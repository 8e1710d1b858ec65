"""Pure width alignment: round each layer's kept MLP units to a multiple of N, by score.

Kernels work in blocks: llama.cpp's quantised row types pack 32 or 256 values, GPU matmuls tile by
16-128. A width of 701 runs slower than 704 (measured in llama.cpp, docs/PERFORMANCE.md), so after
the global selection each layer's kept MLP count is rounded to the nearest multiple of N: back in
go the best-scoring dropped units, or out go the worst-scoring kept ones (never a fixed, +inf unit).
Rounding to the nearest multiple keeps the total close to the target (each layer moves < N/2 units).
"""
from __future__ import annotations

import torch

from bonsai_lite.structure import UnitLayout


def align_drop(scores: torch.Tensor, drop: torch.Tensor, layout: UnitLayout, multiple: int) -> torch.Tensor:
    """`drop` with every layer's kept MLP count a multiple of `multiple` (0 allowed); heads untouched."""
    if multiple <= 1:
        return drop
    out = drop.clone()
    for m in layout.mlp:
        idx = torch.arange(m.start, m.stop)
        kept = int((~drop[m]).sum())
        want = int(round(kept / multiple)) * multiple
        finite = torch.isfinite(scores[m])
        droppable = int((~drop[m] & finite).sum())
        if kept - want > droppable:  # cannot drop fixed units: round up instead
            want += multiple
        want = min(want, m.stop - m.start)
        if want > kept:  # un-drop the best-scoring dropped units
            cand = idx[drop[m]]
            order = torch.sort(scores[cand].double(), descending=True, stable=True).indices
            out[cand[order[: want - kept]]] = False
        elif want < kept:  # drop the worst-scoring kept (finite) units
            cand = idx[~drop[m] & finite]
            order = torch.sort(scores[cand].double(), stable=True).indices
            out[cand[order[: kept - want]]] = True
    return out
