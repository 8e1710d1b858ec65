"""How an iteration of Bonsai ranks its candidates: the regression's betas or the prior (pure).

The betas rank only when their held-out pair tau beats the prior's on the same pairs by GUARD_SDS
null standard deviations of Kendall's tau (the guard); with ``rank="within"`` they order units only
inside each (layer, kind) group and the prior's values decide how many each group loses
(docs/search-maths.md, "Ranking within groups and the guard").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bonsai_lite.prune.select import within_group_order
from bonsai_lite.search.regression import RegressionResult, centre_within, complete_pairs, pair_tau, tau_null_sd

# The betas must beat the prior's pair tau by this many null standard deviations of Kendall's tau
# (regression.tau_null_sd): 0.37 at 16 pairs, 0.13 at the paper's 100 pairs.
GUARD_SDS = 2.0


@dataclass(frozen=True)
class Ranking:
    scores: torch.Tensor  # float64 [U], higher = keep, +inf = not removable this iteration
    ranked_by: str  # "regression" | "prior"
    prior_pair_tau: float
    guard_margin: float


def group_members(groups, total: int, candidates: torch.Tensor) -> list[torch.Tensor]:
    """Bool [U] per (layer, kind) group: its candidate units."""
    out = []
    for g in groups:
        m = torch.zeros(total, dtype=torch.bool)
        m[g] = True
        out.append(m & candidates)
    return out


def rank_candidates(reg: RegressionResult, ranked_prior: torch.Tensor, candidates: torch.Tensor, masks: torch.Tensor,
                    losses: torch.Tensor, pairs: torch.Tensor, groups, *, rank: str, regression: str, guard: bool,
                    within: list[torch.Tensor] | None, costs: torch.Tensor | None) -> Ranking:
    """Scores of one iteration. ``ranked_prior`` is the prior on one global scale (+inf off the
    candidates); ``costs`` divides the betas (per-parameter ranking) when given; ``within`` (from
    `group_members`) centres the prior's pair predictions as the CV centred the betas'."""
    beta = reg.beta.double()
    if costs is not None:
        beta = beta / costs
    inf = torch.full_like(beta, math.inf)
    scores = torch.where(reg.estimated, beta, inf)
    if rank == "within" and regression == "unit":
        values = within_group_order(beta, ranked_prior.where(candidates, 0.0), groups, reg.estimated)
        scores = torch.where(reg.estimated, values, inf)
    # The prior predicts the same held-out pairs with nothing fitted; the betas replace it only
    # where they predict better by the margin (issue 10: at 16 pairs a held-out tau of 0.2 is noise).
    prior_pred = torch.where(candidates, ranked_prior, torch.zeros_like(ranked_prior))
    prior_tau = pair_tau(prior_pred if within is None else centre_within(prior_pred, within), masks, losses, pairs)
    margin = GUARD_SDS * tau_null_sd(complete_pairs(pairs))
    ranked_by = "regression" if not guard or reg.cv_kendall_tau > prior_tau + margin else "prior"
    return Ranking(ranked_prior if ranked_by == "prior" else scores, ranked_by, prior_tau, margin)
