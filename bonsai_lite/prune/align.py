"""Pure width alignment: round each layer's kept MLP units to a multiple of N, by score; and,
optionally, keep every layer's GQA groups equal (`equal_groups_drop`).

Kernels work in blocks: llama.cpp's quantised row types pack 32 or 256 values, GPU matmuls tile by
16-128. A width of 701 runs slower than 704 (measured in llama.cpp, docs/PERFORMANCE.md), so after
the global selection each layer's kept MLP count is rounded to the nearest multiple of N: back in
go the best-scoring dropped units, or out go the worst-scoring kept ones (never a fixed, +inf unit).
Rounding to the nearest multiple keeps the total close to the target (each layer moves < N/2 units).
"""
from __future__ import annotations

import torch

from bonsai_lite.structure import LayerStructure, UnitLayout


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


def equal_groups_drop(scores: torch.Tensor, drop: torch.Tensor, layout: UnitLayout,
                      layers: tuple[LayerStructure, ...], tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """`drop` with every layer's query heads split equally over its key/value heads (GQA groups of
    one size), so llama.cpp and stock GQA kernels need no repeated K/V heads (docs/PERFORMANCE.md).

    Per layer, the kept count per group is the nearest to the selection's kept heads / groups, and
    each group keeps its best heads by (score, tiebreak). A head Bonsai fixed (+inf: not perturbed,
    high prior) goes only after every scored head of its group: fixed heads must be droppable here,
    or a layer whose fixed heads fill one group (SmolLM2 at p_iter 0.1: 7 of 9 heads fixed) could
    never lose a head. A group kept at 0 drops its K/V head; all at 0 drop the layer's attention.
    MLP units are untouched.
    """
    out = drop.clone()
    for s, h in zip(layers, layout.heads):
        kv = torch.tensor(s.kv_of_head, dtype=torch.long)
        slots = s.kv
        if len(slots) < 2 or h.stop == h.start:
            continue
        idx = torch.arange(h.start, h.stop)
        members = [idx[kv == g] for g in slots]
        size = min(len(m) for m in members)
        per_group = min(size, round(int((~drop[h]).sum()) / len(slots)))
        for m in members:
            # best first: larger score, then larger tiebreak (the prior), then lower index
            tb = torch.zeros(len(m), dtype=torch.float64) if tiebreak is None else tiebreak[m].double()
            order = sorted(range(len(m)), key=lambda i: (-scores[m[i]].double().item(), -tb[i].item(), i))
            out[m] = True
            out[m[order[:per_group]]] = False
    return out
