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


# Default alignment (docs/PERFORMANCE.md, "llama.cpp"): a multiple of 32 is the block of llama.cpp's
# q8_0/q4_0 rows and a multiple of most GPU tiles. Applied only when the parent's MLP is at least
# AUTO_MIN_UNITS_PER_BLOCK blocks wide, so rounding moves a layer's width by at most ~1.5%; tiny
# models (tests, 96 units) stay unaligned.
AUTO_MULTIPLE = 32
AUTO_MIN_UNITS_PER_BLOCK = 32


def auto_multiple_of(intermediate: int) -> int:
    """The default --multiple-of for a parent with this MLP width."""
    return AUTO_MULTIPLE if intermediate >= AUTO_MULTIPLE * AUTO_MIN_UNITS_PER_BLOCK else 1


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
