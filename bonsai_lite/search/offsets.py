"""Allocation search: how much each kind and depth loses, chosen by sub-model losses (issue 10, item 4).

FLAP's z-scores (the flap* priors) are standardised per (layer, kind) group, so a global threshold
removes about the same *fraction* of every group: the prior orders units inside a group well but says
nothing about how the removal should split between attention heads and MLP units, or between the
edge layers and the middle. A few sub-model evaluations can say it: each candidate allocation adds
an offset (in z units) to the prior of every unit of a kind or depth,

    score_u + a * [u is a head] + e * [u's layer is an edge layer],

the removal is re-selected from the shifted scores (the same target), and the sub-models of all
candidates are evaluated on the step's windows. Two numbers are learned instead of one beta per
unit, which tens of sub-models cannot identify (docs/search-maths.md).

Measured on SmolLM2-135M at 20% (docs/RESULTS.md): FLAP's prior removes 59 of 270 heads; shifting
the heads by +0.5 keeps all but 4 and lowers the refitted perplexity from 29.4 to 28.2 (one seed), and
+0.5 more on the three first and last layers to 27.8; the masked sub-model losses, before any refit,
order these allocations the same way.
"""
from __future__ import annotations

import torch

from bonsai_lite.structure import UnitLayout

# Offsets tried for the heads (positive: heads kept, MLP units removed instead) and for the edge layers
# (positive: the first and last layers kept); z units, so the same grid fits every model.
HEAD_OFFSETS = (0.0, 0.5, 1.0)
EDGE_OFFSETS = (0.0, 0.5, 1.0)
# Share of the layers at each end counted as edge layers (at least one).
EDGE_SHARE = 0.1


def allocation_grid() -> list[tuple[float, float]]:
    """The candidate (head, edge) offsets, the prior's own allocation (0, 0) first: ties go to it."""
    return [(a, e) for a in HEAD_OFFSETS for e in EDGE_OFFSETS]


def edge_layers(n_layers: int) -> set[int]:
    k = max(1, round(EDGE_SHARE * n_layers))
    return set(range(min(k, n_layers))) | set(range(max(0, n_layers - k), n_layers))


def allocation_offsets(layout: UnitLayout, head: float, edge: float) -> torch.Tensor:
    """Per-unit offset of one candidate allocation (float64, one entry per unit of `layout`)."""
    out = torch.zeros(layout.total, dtype=torch.float64)
    edges = edge_layers(len(layout.heads))
    for layer, (h, m) in enumerate(zip(layout.heads, layout.mlp)):
        at_edge = edge if layer in edges else 0.0
        out[h] += head + at_edge
        out[m] += at_edge
    return out


def distinct(drops: list[torch.Tensor]) -> list[int]:
    """Indices of the first occurrence of each distinct removal (the same sub-model is evaluated once)."""
    seen, keep = [], []
    for i, d in enumerate(drops):
        if not any(torch.equal(d, s) for s in seen):
            seen.append(d)
            keep.append(i)
    return keep
