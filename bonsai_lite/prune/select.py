"""Pure selection (eq. 2): drop the lowest-scoring units until a parameter target is met.

Scores are "higher = keep". Units with score +inf (Bonsai's fixed units) are never dropped.
Costs are the parameters a unit's removal frees; a KV head freed by its last query head is
counted by the caller from the resulting structure, so the greedy pass may slightly overshoot.
"""
from __future__ import annotations

import torch

from bonsai_lite.structure import LayerStructure, UnitLayout


def unit_costs(layout: UnitLayout, *, head_params: int, mlp_params: int) -> torch.Tensor:
    costs = torch.empty(layout.total, dtype=torch.float64)
    for h, m in zip(layout.heads, layout.mlp):
        costs[h] = head_params
        costs[m] = mlp_params
    return costs


def normalised_prior(prior: torch.Tensor, groups) -> torch.Tensor:
    """The prior divided by its mean over each (layer, kind) group: raw Wanda scores grow with
    depth and differ between heads and MLP units, so only group-relative values compare globally."""
    out = prior.to(torch.float64).clone()
    for g in groups:
        vals = out[g]
        if vals.numel():
            out[g] = vals / vals.abs().mean().clamp_min(1e-30)
    return out


def comparable_prior(prior: torch.Tensor, groups, kind: str) -> torch.Tensor:
    """A prior on one global scale: FLAP's z-scores already are (standardised per group, the scale
    FLAP ranks on), the others are divided by their group mean (`normalised_prior`)."""
    return prior.to(torch.float64).clone() if kind.startswith("flap") else normalised_prior(prior, groups)


def within_group_order(beta: torch.Tensor, prior: torch.Tensor, groups, candidates: torch.Tensor) -> torch.Tensor:
    """Scores that take each group's candidate *order* from ``beta`` and its *values* from ``prior``.

    Beta is identified only within a (layer, kind) group (every mask keeps the same count per group,
    docs/search-maths.md), so a global ranking of raw betas allocates removals across groups by
    the penalty's arbitrary offsets. Here the candidates of a group receive the group's sorted prior
    values in beta's order: how many units each group loses is what the prior would decide, which
    ones is what the sub-model losses say. Non-candidates keep their prior value (callers fix them).
    Ties in beta go by the prior."""
    out = prior.to(torch.float64).clone()
    for g in groups:
        idx = torch.arange(prior.numel())[g]
        c = idx[candidates[idx]]
        if c.numel() < 2:
            continue
        values = torch.sort(out[c]).values
        out[c[_ascending(beta[c], prior[c])]] = values
    return out


def _ascending(scores: torch.Tensor, tiebreak: torch.Tensor | None) -> torch.Tensor:
    """Indices by ascending score; equal scores by ascending ``tiebreak`` (the prior), then index.

    Ties are common: an L1 fit with a large gamma gives every unit beta = 0. Breaking them by index
    would strip the first layers first."""
    order = torch.arange(scores.numel())
    if tiebreak is not None:
        order = torch.sort(tiebreak.to(torch.float64).flatten(), stable=True).indices
    return order[torch.sort(scores.to(torch.float64)[order], stable=True).indices]


def greedy_drop(scores: torch.Tensor, costs: torch.Tensor, target: float, *,
                tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [U] of units to drop: ascending score (ties by ``tiebreak``, then index) until costs reach target."""
    order = _ascending(scores, tiebreak)
    order = order[torch.isfinite(scores[order]) | (scores[order] < 0)]
    cum = torch.cumsum(costs[order], 0)
    n = int(torch.searchsorted(cum, torch.tensor(target, dtype=cum.dtype)).item()) + 1
    drop = torch.zeros_like(scores, dtype=torch.bool)
    drop[order[: min(n, len(order))]] = True
    return drop


def uniform_drop(scores: torch.Tensor, drop: torch.Tensor, layout: UnitLayout, layers: tuple[LayerStructure, ...], *,
                 tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """Spread a global selection evenly: every layer drops the same number of heads (the same number
    per KV group, so the export is a stock GQA config) and of MLP units, chosen by score in-layer."""
    n_layers = len(layers)
    out = torch.zeros_like(drop)
    per_layer_mlp = round(sum(int(drop[m].sum()) for m in layout.mlp) / n_layers)
    groups = len(layers[0].kv)
    per_group = round(sum(int(drop[h].sum()) for h in layout.heads) / (n_layers * groups))
    for s, h, m in zip(layers, layout.heads, layout.mlp):
        if per_layer_mlp:
            idx = torch.arange(m.start, m.stop)
            out[idx[_ascending(scores[m], None if tiebreak is None else tiebreak[m])[:per_layer_mlp]]] = True
        if per_group:
            kv = torch.tensor(s.kv_of_head)
            for g in s.kv:
                members = torch.arange(h.start, h.stop)[kv == g]
                order = _ascending(scores[members], None if tiebreak is None else tiebreak[members])
                out[members[order[: min(per_group, len(members))]]] = True
    return out


def apply_drop(layers: tuple[LayerStructure, ...], layout: UnitLayout, drop: torch.Tensor) -> tuple[LayerStructure, ...]:
    return tuple(s.keep(heads=~drop[h], mlp=~drop[m]) for s, h, m in zip(layers, layout.heads, layout.mlp))
