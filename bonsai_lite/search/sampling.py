"""Prior-guided sub-model sampling with complements (Algorithm 1 lines 3-6, section 3.2).

Units live in one global vector of length U, organised in groups (one per (layer, kind)). In every
group the top ``1 - 2 p_iter`` fraction by prior is fixed on; the rest are candidates. Each sampled
mask keeps half of a group's candidates, drawn with probability proportional to the prior, and is
followed by its complement, which keeps exactly the candidates the mask dropped (Covert & Lee
2020: antithetic pairs reduce the variance of the regression estimate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["MaskSample", "sample_masks", "group_indices"]

# Candidates whose prior is zero (dead units) or negative (standardised scores) must still be kept
# sometimes: torch.multinomial refuses to draw more items than there are positive weights, and a
# unit that is always dropped in masks and always kept in complements has a column identical to
# every other such unit, so the regression could not tell them apart. The floor is relative to the
# group's mean positive prior so that it does not depend on the prior's units.
PRIOR_FLOOR_FRACTION = 1e-2
MIN_CANDIDATES = 2  # per group of two or more units; see _n_fixed


@dataclass(frozen=True)
class MaskSample:
    """Sampled sub-models. ``masks[2k]`` and ``masks[2k + 1]`` are a (mask, complement) pair.

    masks: bool [n_masks, U], True = unit kept. fixed: bool [U], kept in every mask (includes
    units in no group). candidates: bool [U], perturbed units (``fixed`` xor ``candidates`` is all
    True).
    """

    masks: torch.Tensor
    fixed: torch.Tensor
    candidates: torch.Tensor


def group_indices(group: torch.Tensor | slice, n_units: int) -> torch.Tensor:
    """A group given as index tensor, bool mask or slice -> 1-D int64 indices."""
    if isinstance(group, slice):
        return torch.arange(n_units)[group]
    group = torch.as_tensor(group)
    if group.dtype == torch.bool:
        return group.nonzero().flatten()
    return group.to(torch.int64).flatten()


def global_candidates(scores: torch.Tensor, costs: torch.Tensor, budget: float, groups) -> torch.Tensor:
    """Bool [U]: the units with the lowest ``scores`` (one global scale) until their ``costs`` reach
    ``budget``, the units an iteration will choose among when the prior ranks across groups.
    A group with exactly one such unit gets its next-lowest unit too: a lone candidate's column
    would equal the mask-vs-complement indicator (the identical-columns defect of ``_n_fixed``)."""
    scores = scores.to(torch.float64).flatten()
    order = torch.sort(scores, stable=True).indices
    cum = torch.cumsum(costs.to(torch.float64)[order], 0)
    n = int(torch.searchsorted(cum, torch.tensor(float(budget), dtype=cum.dtype)).item()) + 1
    out = torch.zeros(scores.numel(), dtype=torch.bool)
    out[order[: min(n, scores.numel())]] = True
    for group in groups:
        idx = group_indices(group, scores.numel())
        if idx.numel() >= MIN_CANDIDATES and int(out[idx].sum()) == 1:
            rest = idx[~out[idx]]
            out[rest[torch.argmin(scores[rest])]] = True
    return out


def _n_fixed(n: int, p_iter: float) -> int:
    if n < 2:
        return n  # a lone unit (e.g. a layer's last head) is never perturbed
    # floor(x + 0.5): round half up, unlike Python's banker's round(), so 2.5 -> 3 everywhere.
    # At least two candidates: a lone candidate is dropped by every mask and kept by every
    # complement, so its column equals the mask-vs-complement indicator and every other lone
    # candidate's column (9 heads at p_iter 0.05 gave 30 identical head columns, one shared beta).
    return min(n - MIN_CANDIDATES, max(0, math.floor((1.0 - 2.0 * p_iter) * n + 0.5)))


def _floored(prior: torch.Tensor) -> torch.Tensor:
    positive = prior[prior > 0]
    if positive.numel() == 0:
        return torch.ones_like(prior)  # no information at all: sample uniformly
    return prior.clamp_min(PRIOR_FLOOR_FRACTION * positive.mean())


def sample_masks(
    prior: torch.Tensor,
    *,
    groups: Sequence[torch.Tensor | slice],
    p_iter: float,
    n_masks: int,
    generator: torch.Generator,
    keep_spread: float = 0.0,
    candidates: torch.Tensor | None = None,
) -> MaskSample:
    """Draw ``n_masks`` masks in (mask, complement) pairs; an odd ``n_masks`` is rounded up.

    Per group of n units: the top ``min(n - 2, floor((1 - 2 p_iter) n + 0.5))`` by prior are fixed
    (ties go to the lower index); of the c >= 2 remaining candidates a mask keeps ``c // 2`` (odd c:
    ``c // 2`` or ``c - c // 2``, a coin flip per pair) drawn without replacement with probability
    proportional to the (floored) prior, and its complement keeps the others. Groups of one unit
    are never perturbed; units in no group are fixed. ``candidates`` (bool [U]), when given, replaces
    the per-group rule: those units are perturbed (``global_candidates`` picks them on one scale).
    ``generator`` is a CPU ``torch.Generator``; the same state gives the same output.
    """
    prior = prior.detach().to(torch.float64).flatten().cpu()
    n_units = prior.numel()
    if not torch.isfinite(prior).all():
        raise ValueError(f"prior has {int((~torch.isfinite(prior)).sum())} non-finite entries")
    if not 0.0 < p_iter < 1.0:
        raise ValueError(f"p_iter must be in (0, 1), got {p_iter}")
    if n_masks < 1:
        raise ValueError(f"n_masks must be positive, got {n_masks}")
    n_pairs = (n_masks + 1) // 2
    given = None if candidates is None else torch.as_tensor(candidates, dtype=torch.bool).flatten().cpu()
    if given is not None and given.numel() != n_units:
        raise ValueError(f"candidates has {given.numel()} entries for {n_units} units")

    candidates = torch.zeros(n_units, dtype=torch.bool)
    seen = torch.zeros(n_units, dtype=torch.bool)
    kept = torch.zeros(n_pairs, n_units, dtype=torch.bool)  # candidate bits of the first mask
    for group in groups:
        idx = group_indices(group, n_units)
        if idx.numel() and (idx.min() < 0 or idx.max() >= n_units):
            raise ValueError(f"group indices out of range [0, {n_units})")
        if seen[idx].any() or idx.unique().numel() != idx.numel():
            raise ValueError("groups must not overlap")
        seen[idx] = True
        order = torch.sort(prior[idx], descending=True, stable=True).indices
        if given is None:
            cand = idx[order[_n_fixed(idx.numel(), p_iter):]]
        elif idx.numel() >= MIN_CANDIDATES:  # the caller chose them (global_candidates)
            cand = idx[order][given[idx[order]]]
        else:
            cand = idx[:0]
        if cand.numel() == 0:
            continue
        candidates[cand] = True
        c = cand.numel()
        n_keep = c // 2
        if keep_spread > 0 and c > 1:
            half = keep_spread * c / 2
            lo, hi = max(0, math.ceil(c / 2 - half)), min(c, math.floor(c / 2 + half))
            counts = torch.randint(lo, hi + 1, (n_pairs,), generator=generator)
            weights = _floored(prior[cand]).expand(n_pairs, -1)
            order_w = torch.multinomial(weights, c, replacement=False, generator=generator)  # weighted order
            take = torch.arange(c).unsqueeze(0) < counts.unsqueeze(1)
            rows = torch.arange(n_pairs).unsqueeze(1).expand(-1, c)
            kept[rows[take], cand[order_w][take]] = True
            continue
        weights = _floored(prior[cand]).expand(n_pairs, -1)
        order_w = torch.multinomial(weights, c, replacement=False, generator=generator)  # weighted order
        counts = torch.full((n_pairs,), n_keep, dtype=torch.int64)
        if c % 2:
            # An odd group: which member of the pair keeps the extra unit is a coin flip, so the
            # group's kept count does not line up with the mask-vs-complement indicator of every
            # other odd group (identical aggregate columns across groups).
            counts += torch.randint(0, 2, (n_pairs,), generator=generator)
        take = torch.arange(c).unsqueeze(0) < counts.unsqueeze(1)
        rows = torch.arange(n_pairs).unsqueeze(1).expand(-1, c)
        kept[rows[take], cand[order_w][take]] = True

    fixed = ~candidates
    mask = fixed | kept
    complement = fixed | (candidates & ~kept)
    masks = torch.stack([mask, complement], dim=1).reshape(2 * n_pairs, n_units)
    return MaskSample(masks=masks, fixed=fixed, candidates=candidates)
