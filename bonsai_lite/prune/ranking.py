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

from bonsai_lite.config import MIN_REGRESSION_MASKS, SearchConfig
from bonsai_lite.errors import BonsaiError
from bonsai_lite.prune.select import within_group_order
from bonsai_lite.search.allocation import fit_allocation
from bonsai_lite.search.regression import (RegressionResult, centre_within, complete_pairs, fit_relevance, pair_tau,
                                           tau_null_sd)

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


def regress_and_rank(masks: torch.Tensor, losses: torch.Tensor, *, prior: torch.Tensor, ranked_prior: torch.Tensor,
                     candidates: torch.Tensor, groups, search: SearchConfig, seed: int,
                     costs: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """An iteration's scores from its sub-models' losses: the regression of the finite losses on
    their masks (sample_masks: rows 2k, 2k+1 are a pair), then `rank_candidates`; and what the
    iteration records of it."""
    ok = torch.isfinite(losses)
    if ok.sum() < MIN_REGRESSION_MASKS:  # the config guarantees enough masks: these losses overflowed
        raise BonsaiError(f"only {int(ok.sum())} of {len(losses)} sub-models have a finite loss (at least "
                          f"{MIN_REGRESSION_MASKS} are needed); use --dtype float32")
    pairs = (torch.arange(len(masks)) // 2)[ok]
    # --rank within uses only the order inside each group: --cv-scope within scores that alone, for
    # the betas (their CV) and the prior (the guard), centred over the candidates
    within = group_members(groups, len(prior), candidates) if search.cv_scope == "within" else None
    if search.regression == "allocation":
        reg = fit_allocation(masks[ok], losses[ok], prior=prior, groups=groups, candidates=candidates, pairs=pairs,
                             seed=seed)
    else:
        reg = fit_relevance(masks[ok], losses[ok], penalty=search.penalty, seed=seed, pairs=pairs, within=within)
    per_param = search.rank == "per-param" or search.regression == "allocation"
    r = rank_candidates(reg, ranked_prior, candidates, masks[ok], losses[ok], pairs, groups, rank=search.rank,
                        regression=search.regression, guard=search.guard, within=within,
                        costs=costs if per_param else None)
    return r.scores, dict(prior_pair_tau=r.prior_pair_tau, guard_margin=r.guard_margin, ranked_by=r.ranked_by,
                          cv_kendall_tau=reg.cv_kendall_tau, regression=reg.best_params, masks_used=int(ok.sum()),
                          masks_dropped=int((~ok).sum()), loss_mean=float(losses[ok].mean()),
                          loss_std=float(losses[ok].std()))
