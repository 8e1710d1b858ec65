"""Allocation model: the prior orders units within a (layer, kind) group, the masks learn the split.

Beta is identified only within a group (docs/search-maths.md), and with tens of sub-models against
thousands of candidates the per-unit regression recovers little of it. What the prior cannot say
is how much a group matters relative to the others (raw Wanda scores grow with depth and differ
between heads and MLP units). This model regresses the standardised utility on one feature per
group, the prior-weighted kept mass of its candidates,

    y_k ~ b0 + sum_g s_g * sum_{u in g} prior~_u * x_ku,      prior~ = prior / mean over the group,

so a unit's relevance is ``s_g * prior~_u``; then, where cross-validation says the data supports
it, per-unit corrections ``delta`` are fitted by ridge on the residual. The features vary across
masks only when the masks vary how much each group loses (``sample_masks(keep_spread > 0)``).

Cross-validation holds out whole (mask, complement) pairs and ranks within-pair differences, as in
``regression.fit_relevance``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from bonsai_lite.search.regression import (
    RegressionResult, _assign_folds, _pair_differences, _pair_ids, _ridge, _tau, fit_relevance,
)

__all__ = ["fit_allocation", "group_features", "ALLOCATION_GAMMAS"]

# Ridge strengths for the groups' deviations from one common scale (a large gamma = the prior
# alone, every group at the common scale): fewer masks than groups need the shrinkage.
ALLOCATION_GAMMAS = (0.0, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
# Per-unit corrections are kept only when their cross-validated tau on the residual beats this:
# below it the correction is noise that would reorder units the prior orders better.
MIN_CORRECTION_TAU = 0.05


def normalised(prior: torch.Tensor, groups: Sequence[torch.Tensor]) -> torch.Tensor:
    out = prior.to(torch.float64).clone()
    for g in groups:
        if len(g):
            out[g] = out[g] / out[g].abs().mean().clamp_min(1e-30)
    return out


def group_features(masks: torch.Tensor, prior_n: torch.Tensor, groups: Sequence[torch.Tensor],
                   candidates: torch.Tensor) -> torch.Tensor:
    """[K, G]: per mask, the normalised prior mass of each group's kept candidates."""
    x = masks.to(torch.float64)
    cols = []
    for g in groups:
        c = g[candidates[g]]
        cols.append(x[:, c] @ prior_n[c] if len(c) else torch.zeros(x.shape[0], dtype=torch.float64))
    return torch.stack(cols, 1)


def _cv_ridge(x: torch.Tensor, y: torch.Tensor, pairs: torch.Tensor | None, masks: torch.Tensor, gammas,
              n_folds: int, seed: int) -> tuple[int, list[float]]:
    """Index of the best gamma by pair-aware out-of-fold tau, and all taus."""
    paired = pairs is not None
    ids = pairs if paired else torch.arange(x.shape[0])
    folds, k = _assign_folds(masks, ids, n_folds, seed)
    pred = torch.zeros(len(gammas), x.shape[0], dtype=torch.float64)
    for f in range(k):
        tr, te = folds != f, folds == f
        beta, b0 = _ridge(x[tr], y[tr], gammas)
        pred[:, te] = b0.unsqueeze(1) + beta @ x[te].T
    if paired:
        pred, y = _pair_differences(pred, ids), _pair_differences(y, ids)
    taus = [_tau(pred[c], y) for c in range(len(gammas))]
    return max(range(len(gammas)), key=lambda c: (taus[c], -c)), taus


def fit_allocation(masks: torch.Tensor, losses: torch.Tensor, *, prior: torch.Tensor,
                   groups: Sequence[torch.Tensor], candidates: torch.Tensor, pairs: torch.Tensor | None = None,
                   n_folds: int = 5, seed: int = 0, corrections: bool = True) -> RegressionResult:
    """Relevance ``s_g * prior~_u (+ delta_u)`` of every candidate; same units as fit_relevance.

    ``estimated`` marks the candidates; ``best_params`` records the group-scale gamma and whether
    per-unit corrections were kept; ``cv_kendall_tau`` is the pair-aware tau of the final model.
    """
    masks = torch.as_tensor(masks).to(torch.bool).cpu()
    losses = torch.as_tensor(losses, dtype=torch.float64).flatten().cpu()
    if masks.dim() != 2 or masks.shape[0] != losses.numel():
        raise ValueError(f"masks {tuple(masks.shape)} and losses {tuple(losses.shape)} disagree")
    if not torch.isfinite(losses).all():
        raise ValueError("non-finite losses; drop those masks")
    n_units = masks.shape[1]
    candidates = candidates.to(torch.bool).cpu()
    prior_n = normalised(torch.as_tensor(prior).cpu().clamp_min(0), groups)
    utility = -losses
    t_mean, t_std = float(utility.mean()), float(utility.std()) if losses.numel() > 1 else 0.0
    y = (utility - t_mean) / (t_std if t_std > 0 else 1.0)
    feats = group_features(masks, prior_n, groups, candidates)
    varying = feats.std(0) > 0
    if pairs is None:
        pairs = _pair_ids(masks[:, candidates].to(torch.float64))
    beta = torch.zeros(n_units, dtype=torch.float64)
    scale = torch.zeros(len(groups), dtype=torch.float64)
    if t_std == 0 or not bool(varying.any()):
        return RegressionResult(beta.float(), candidates, 0.0, "l2", "allocation", {"gamma": None}, 0.0, t_mean, t_std)
    x = feats[:, varying]
    # common scale first (the prior's own cross-group comparison), then shrunk per-group deviations
    total = feats.sum(1, keepdim=True)
    common = float(_ridge(total, y, [0.0])[0][0, 0]) if float(total.std()) > 0 else 0.0
    best, taus = _cv_ridge(x, y - common * total[:, 0], pairs, masks, ALLOCATION_GAMMAS, n_folds, seed)
    s, b0 = _ridge(x, y - common * total[:, 0], [ALLOCATION_GAMMAS[best]])
    s = s + common
    scale[varying] = s[0]
    scale[~varying] = common  # a group whose feature never varied has no measured deviation
    for gi, g in enumerate(groups):
        c = g[candidates[g]]
        beta[c] = scale[gi] * prior_n[c]
    params = {"gamma": ALLOCATION_GAMMAS[best], "common_scale": common, "corrections": False, "group_tau": taus[best]}
    tau = taus[best]
    if corrections:
        resid_loss = -(y - float(b0[0]) - feats @ scale)  # fit_relevance regresses -loss
        res = fit_relevance(masks, resid_loss, penalty="l2", pairs=pairs, seed=seed + 1,
                            grid={"gamma": (1e-3, 1e-2, 1e-1)})
        if res.cv_kendall_tau > MIN_CORRECTION_TAU:
            beta += res.beta.double() * res.target_std  # back to the units of y
            params.update(corrections=True, correction_tau=res.cv_kendall_tau)
    return RegressionResult(beta.float(), candidates, float(b0[0]), "l2", "allocation", params, float(tau),
                            t_mean, t_std)
