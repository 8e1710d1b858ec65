"""Module relevances beta from (mask, loss) pairs: eq. 3 with Kendall-tau cross-validation.

Objective, on the standardised utility y = -loss (zero mean, unit variance over all masks):

    min_{b0, beta}  (1/n) sum_k (y_k - b0 - beta . x_k)^2  +  gamma * P(beta)

with P = ||beta||_1 ("l1", the paper's default) or ||beta||_2^2 ("l2", its Phi-2 choice). Only
columns that vary across masks are regressed; the others (fixed units) are absorbed by b0 and
reported as not ``estimated``. Hyper-parameters are picked by the mean over K folds of Kendall's
tau between held-out predictions and held-out utilities (appendix A.1), made pair-aware: whole
(mask, complement) pairs are held out and the tau ranks within-pair differences (see fit_relevance).

Solvers: "adam" (the paper's: mini-batch Adam, Table 8 grid), "closed" (ridge through one thin
SVD per fold, L2 only) and "fista" (accelerated proximal gradient with adaptive restart, L1).
"auto" picks by penalty from the measurement recorded in docs/search-maths.md.

Identifiability: when every mask keeps the same number of candidates in a group (as
``sample_masks`` does), adding a constant to all of a group's betas changes no prediction, so
only within-group differences are determined by the data; the penalty picks the offset (gamma=0
and ridge give each group's estimated betas zero sum).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from scipy.stats import kendalltau

__all__ = ["RegressionResult", "fit_relevance", "pair_tau", "tau_null_sd", "TABLE8_GRID", "AUTO_SOLVER"]

TABLE8_GRID: dict[str, tuple] = {
    "gamma": (100.0, 0.0, 1e-4),
    "lr": (100.0, 10.0, 1.0, 0.1),
    "batch": (32, 64, 128),
    "epochs": (50,),
}
# Chosen by the planted-problem measurement in docs/search-maths.md: same or better held-out tau
# than Adam over the Table 8 grid at a fraction of the time.
AUTO_SOLVER = {"l1": "fista", "l2": "closed"}

_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8
_FISTA_MAX_ITER = 3000
_FISTA_TOL = 1e-6  # relative max-abs change of beta between iterations


@dataclass(frozen=True)
class RegressionResult:
    """Fitted relevances. Rank only units with ``estimated`` True; the others get beta = 0.

    ``beta`` (float32 [U]) and ``intercept`` are in standardised-utility units:
    ``(-loss - target_mean) / target_std ~= intercept + mask @ beta``; higher beta = more useful.
    """

    beta: torch.Tensor
    estimated: torch.Tensor
    intercept: float
    penalty: str
    solver: str
    best_params: dict
    cv_kendall_tau: float
    target_mean: float = 0.0
    target_std: float = 1.0
    cv_table: list[tuple[dict, float]] = field(default_factory=list, repr=False)


def _param_list(grid: Mapping[str, Sequence]) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _pair_ids(x: torch.Tensor) -> torch.Tensor | None:
    """Rows 2k and 2k+1 as (mask, complement) pairs when every such pair is complementary on the
    varying columns (what ``sample_masks`` produces); otherwise None."""
    k = x.shape[0]
    if k < 4 or k % 2 or x.shape[1] == 0:
        return None
    if not bool(((x[0::2] + x[1::2]) == 1).all()):
        return None
    return torch.arange(k) // 2


def _assign_folds(masks: torch.Tensor, pairs: torch.Tensor, n_folds: int, seed: int) -> tuple[torch.Tensor, int]:
    """Fold per row. Both members of a pair share a fold, and so do duplicate masks: otherwise a
    held-out mask's complement (or twin) sits in the training folds and predicts it (with a
    linear truth, loss(m) + loss(complement) is a constant), inflating the held-out tau."""
    _, row_uid = torch.unique(masks, dim=0, return_inverse=True)
    _, pair_idx = torch.unique(pairs, return_inverse=True)
    # a pair's key is the smallest mask id among its members: duplicated pairs share a key
    key = torch.full((int(pair_idx.max()) + 1,), row_uid.numel(), dtype=torch.int64)
    key = key.scatter_reduce(0, pair_idx, row_uid, reduce="amin")
    _, key_inverse = torch.unique(key, return_inverse=True)
    n_keys = int(key_inverse.max()) + 1
    if int(row_uid.max()) + 1 < 2:
        raise ValueError("need at least two distinct masks to cross-validate")
    if n_keys < 2:
        raise ValueError("need at least two distinct (mask, complement) pairs to cross-validate")
    k = min(n_folds, n_keys)
    perm = torch.randperm(n_keys, generator=torch.Generator().manual_seed(seed))
    fold_of_key = torch.empty(n_keys, dtype=torch.int64)
    fold_of_key[perm] = torch.arange(n_keys) % k
    return fold_of_key[key_inverse[pair_idx]], k


def _pair_differences(v: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """v [..., K] -> first-minus-second member of every complete pair [..., P]."""
    ids, counts = torch.unique(pairs, return_counts=True)
    first, second = [], []
    for pid in ids[counts == 2].tolist():
        rows = (pairs == pid).nonzero().flatten()
        first.append(int(rows[0]))
        second.append(int(rows[1]))
    return v[..., first] - v[..., second]


def centre_within(scores: torch.Tensor, groups: Sequence[torch.Tensor]) -> torch.Tensor:
    """``scores`` [..., U] with each group's mean subtracted over its members (bool [U] masks).

    A (mask, complement) pair can differ by one unit in a group with an odd number of candidates;
    uncentred, a predictor then also scores "one more unit kept" with the group's mean score,
    which for z-scored priors is negative: the FLAP prior anti-predicted the pairs (tau -0.1 to
    -0.37) for that reason alone. Centred, only the order inside each group counts."""
    out = scores.clone()
    for g in groups:
        g = torch.as_tensor(g, dtype=torch.bool)
        if bool(g.any()):
            out[..., g] = out[..., g] - out[..., g].mean(-1, keepdim=True)
    return out


def tau_null_sd(n: int) -> float:
    """Standard deviation of Kendall's tau between n independent rankings (no ties):
    sqrt(2 (2n + 5) / (9 n (n - 1))). With 16 pairs it is 0.19: a held-out tau of 0.2 is noise."""
    return math.sqrt(2.0 * (2 * n + 5) / (9.0 * n * (n - 1))) if n > 1 else math.inf


def complete_pairs(pairs: torch.Tensor) -> int:
    """How many pair ids occur exactly twice (the pairs a pair tau is computed over)."""
    _, counts = torch.unique(torch.as_tensor(pairs), return_counts=True)
    return int((counts == 2).sum())


def pair_tau(scores: torch.Tensor, masks: torch.Tensor, losses: torch.Tensor, pairs: torch.Tensor) -> float:
    """Kendall's tau of a fixed per-unit score as a predictor of (mask, complement) pairs: the
    predicted utility difference ``scores . (mask - complement)`` against the observed
    ``loss(complement) - loss(mask)`` over every complete pair. Nothing is fitted, so it compares
    with fit_relevance's held-out ``cv_kendall_tau`` on the same pairs (a prior versus the betas)."""
    x = torch.as_tensor(masks).to(torch.float64).cpu()
    pred = x @ torch.as_tensor(scores, dtype=torch.float64).flatten().cpu()
    utility = -torch.as_tensor(losses, dtype=torch.float64).flatten().cpu()
    pairs = torch.as_tensor(pairs, dtype=torch.int64).flatten()
    return _tau(_pair_differences(pred, pairs), _pair_differences(utility, pairs))


def _tau(pred: torch.Tensor, target: torch.Tensor) -> float:
    tau = kendalltau(pred.numpy(), target.numpy()).statistic
    # Constant predictions (e.g. gamma large enough to zero beta) carry no ranking: score 0.
    return 0.0 if tau is None or math.isnan(tau) else float(tau)


def _center(x: torch.Tensor, y: torch.Tensor):
    x_mean, y_mean = x.mean(0), y.mean()
    return x - x_mean, y - y_mean, x_mean, y_mean


def _svd(xc: torch.Tensor):
    u, s, vh = torch.linalg.svd(xc, full_matrices=False)
    # Same cut-off as numpy's lstsq/pinv: singular values below it are numerically zero, which
    # turns gamma = 0 into the minimum-norm least-squares solution.
    cutoff = s.max() * max(xc.shape) * torch.finfo(xc.dtype).eps if s.numel() else 0.0
    return u, s, vh, s > cutoff


def _ridge(x: torch.Tensor, y: torch.Tensor, gammas: Sequence[float]):
    """Closed-form ridge per gamma: beta = V diag(s / (s^2 + n gamma)) U^T yc. -> [C, p], [C]."""
    xc, yc, x_mean, y_mean = _center(x, y)
    u, s, vh, ok = _svd(xc)
    uty = u.T @ yc
    n = x.shape[0]
    betas = []
    for gamma in gammas:
        denom = s.square() + n * gamma
        coef = torch.where(ok & (denom > 0), s / denom.clamp_min(1e-300), torch.zeros_like(s))
        betas.append(vh.T @ (coef * uty))
    beta = torch.stack(betas)
    return beta, y_mean - beta @ x_mean


def _soft(z: torch.Tensor, thresh: torch.Tensor) -> torch.Tensor:
    return z.sign() * (z.abs() - thresh).clamp_min(0.0)


def _lasso_fista(x: torch.Tensor, y: torch.Tensor, gammas: Sequence[float]):
    """L1 objective for all gammas at once (one row each); gamma = 0 -> min-norm least squares,
    the limit FISTA itself would reach from beta = 0 since its iterates stay in X's row space."""
    xc, yc, x_mean, y_mean = _center(x, y)
    n, p = xc.shape
    _, s, _, _ = _svd(xc)
    gam = torch.tensor(gammas, dtype=xc.dtype)
    beta = torch.zeros(len(gammas), p, dtype=xc.dtype)
    lip = 2.0 * float(s.max()) ** 2 / n if s.numel() else 0.0
    active = gam > 0
    if lip > 0 and bool(active.any()):
        rows = active.nonzero().flatten()
        thresh = (gam[rows] / lip).unsqueeze(1)
        b = torch.zeros(len(rows), p, dtype=xc.dtype)
        z, t = b.clone(), torch.ones(len(rows), 1, dtype=xc.dtype)
        live = torch.ones(len(rows), dtype=torch.bool)  # rows still iterating
        for _ in range(_FISTA_MAX_ITER):
            zl, bl, tl = z[live], b[live], t[live]
            grad = (2.0 / n) * ((zl @ xc.T - yc) @ xc)
            b_new = _soft(zl - grad / lip, thresh[live])
            step = b_new - bl
            # Adaptive restart (O'Donoghue & Candes 2015): drop momentum when it points uphill,
            # which removes FISTA's ripples on these badly conditioned, near-interpolating fits.
            restart = ((zl - b_new) * step).sum(1, keepdim=True) > 0
            tl = torch.where(restart, torch.ones_like(tl), tl)
            t_new = (1.0 + torch.sqrt(1.0 + 4.0 * tl.square())) / 2.0
            z[live] = b_new + ((tl - 1.0) / t_new) * step
            b[live], t[live] = b_new, t_new
            # A large gamma zeroes beta in one step; freeze converged rows instead of paying for
            # them until the slowest row is done.
            done = step.abs().amax(1) <= _FISTA_TOL * b_new.abs().amax(1).clamp_min(1.0)
            live[live.clone()] = ~done
            if not bool(live.any()):
                break
        beta[rows] = b
    if bool((~active).any()):
        ls, _ = _ridge(x, y, [0.0])
        beta[~active] = ls[0]
    return beta, y_mean - beta @ x_mean


def _adam(x: torch.Tensor, y: torch.Tensor, params: Sequence[dict], penalty: str, seed: int):
    """Mini-batch Adam on eq. 3, all configs sharing (batch, epochs) trained side by side.

    Table 8's "learning rate" is a factor, as in the reference code (lib/scoring_model.py):
    Adam's step is 1 / (n_estimated * lr); a raw step of 100 on a standardised target diverges.
    beta starts at 0 with a free intercept; 50 epochs, no early stopping (the reference stops on
    the held-out fold, which leaks it into model selection).
    """
    n, p = x.shape
    beta_out = torch.zeros(len(params), p, dtype=x.dtype)
    b0_out = torch.zeros(len(params), dtype=x.dtype)
    key = lambda i: (params[i]["batch"], params[i]["epochs"])  # noqa: E731
    order = sorted(range(len(params)), key=key)
    for (batch, epochs), members in itertools.groupby(order, key=key):
        idx = list(members)
        gam = torch.tensor([params[i]["gamma"] for i in idx], dtype=x.dtype).unsqueeze(1)
        lr = torch.tensor([1.0 / (p * params[i]["lr"]) for i in idx], dtype=x.dtype).unsqueeze(1)
        w = torch.zeros(len(idx), p + 1, dtype=x.dtype)  # last column = intercept
        m, v = torch.zeros_like(w), torch.zeros_like(w)
        gen = torch.Generator().manual_seed(seed)
        step = 0
        for _ in range(int(epochs)):
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, int(batch)):
                rows = perm[start : start + int(batch)]
                xb, yb = x[rows], y[rows]
                resid = xb @ w[:, :p].T + w[:, p] - yb.unsqueeze(1)  # [B, C]
                grad = torch.empty_like(w)
                grad[:, :p] = (2.0 / len(rows)) * resid.T @ xb
                grad[:, p] = (2.0 / len(rows)) * resid.sum(0)
                reg = w[:, :p].sign() if penalty == "l1" else 2.0 * w[:, :p]
                grad[:, :p] += gam * reg
                step += 1
                m.mul_(_ADAM_BETAS[0]).add_((1 - _ADAM_BETAS[0]) * grad)
                v.mul_(_ADAM_BETAS[1]).add_((1 - _ADAM_BETAS[1]) * grad.square())
                m_hat = m / (1 - _ADAM_BETAS[0] ** step)
                v_hat = v / (1 - _ADAM_BETAS[1] ** step)
                w -= lr * m_hat / (v_hat.sqrt() + _ADAM_EPS)
        beta_out[idx] = w[:, :p]
        b0_out[idx] = w[:, p]
    return beta_out, b0_out


def _fit_all(x, y, params, penalty, solver, seed):
    if solver == "adam":
        return _adam(x, y, params, penalty, seed)
    gammas = [float(prm["gamma"]) for prm in params]
    return (_ridge if solver == "closed" else _lasso_fista)(x, y, gammas)


def _resolve_solver(penalty: str, solver: str) -> str:
    if penalty not in ("l1", "l2"):
        raise ValueError(f"penalty must be 'l1' or 'l2', got {penalty!r}")
    solver = AUTO_SOLVER[penalty] if solver == "auto" else solver
    allowed = {"l1": ("adam", "fista"), "l2": ("adam", "closed")}[penalty]
    if solver not in allowed:
        raise ValueError(f"solver {solver!r} does not solve penalty {penalty!r}; use {allowed}")
    return solver


def _default_grid(solver: str) -> dict:
    return dict(TABLE8_GRID) if solver == "adam" else {"gamma": TABLE8_GRID["gamma"]}


def fit_relevance(
    masks: torch.Tensor,
    losses: torch.Tensor,
    *,
    penalty: str = "l1",
    grid: Mapping[str, Sequence] | None = None,
    n_folds: int = 5,
    seed: int = 0,
    solver: str = "auto",
    pairs: torch.Tensor | None = None,
    within: Sequence[torch.Tensor] | None = None,
) -> RegressionResult:
    """Estimate per-unit relevance beta from ``masks`` [K, U] (True = kept) and ``losses`` [K].

    ``grid`` maps hyper-parameter names to candidate values (product taken); it defaults to
    Table 8 for Adam (gamma, lr factor, batch, epochs) and to Table 8's gammas otherwise.
    Deterministic for a fixed ``seed``. Raises ValueError on non-finite losses (callers filter).
    ``pairs`` [K] gives each row's (mask, complement) pair id (a row whose partner was dropped is
    a pair of one); by default rows 2k and 2k+1 are a pair when they are complementary. ``within``
    (bool [U] masks, one per group) makes the cross-validation score group-centred betas: the
    within-group order alone, for callers that take the allocation across groups elsewhere. With
    pairs, folds hold out whole pairs and the reported tau ranks within-pair loss differences.
    """
    solver = _resolve_solver(penalty, solver)
    masks = torch.as_tensor(masks)
    losses = torch.as_tensor(losses, dtype=torch.float64).flatten().cpu()
    if masks.dim() != 2 or masks.shape[0] != losses.numel():
        raise ValueError(f"masks {tuple(masks.shape)} and losses {tuple(losses.shape)} disagree")
    bad = int((~torch.isfinite(losses)).sum())
    if bad:
        raise ValueError(f"{bad} of {losses.numel()} losses are NaN or infinite; drop those masks")
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    params = _param_list(grid if grid is not None else _default_grid(solver))
    if not params or any("gamma" not in prm for prm in params):
        raise ValueError("grid must give at least one 'gamma' value")

    x_all = masks.to(torch.float64).cpu()
    n_units = x_all.shape[1]
    estimated = (x_all != x_all[:1]).any(0)
    x = x_all[:, estimated]
    utility = -losses
    t_mean = float(utility.mean())
    t_std = float(utility.std()) if losses.numel() > 1 else 0.0
    y = (utility - t_mean) / (t_std if t_std > 0 else 1.0)
    if pairs is None:
        pairs = _pair_ids(x)
    paired = pairs is not None
    pairs = torch.as_tensor(pairs, dtype=torch.int64).flatten() if paired else torch.arange(x.shape[0])
    if pairs.numel() != x.shape[0]:
        raise ValueError(f"pairs has {pairs.numel()} entries for {x.shape[0]} masks")
    folds, k = _assign_folds(masks.to(torch.bool).cpu(), pairs, n_folds, seed)

    beta_full = torch.zeros(n_units, dtype=torch.float32)
    if x.shape[1] == 0 or t_std == 0:
        # Nothing varies (no candidates, or all losses equal): there is nothing to rank.
        return RegressionResult(beta_full, estimated, 0.0, penalty, solver, params[0], 0.0,
                                t_mean, t_std)

    # Out-of-fold predictions of every row, then one tau over all of them. With pairs the tau is
    # between within-pair differences (predicted beta . (mask - complement) vs observed): the
    # intercept and the pair's shared part cancel, so it measures beta itself and not the
    # mask-vs-complement contrast, which any interpolant of the training pairs predicts.
    pred = torch.zeros(len(params), x.shape[0], dtype=torch.float64)
    for f in range(k):
        train, test = folds != f, folds == f
        beta, b0 = _fit_all(x[train], y[train], params, penalty, solver, seed + f)
        if within is not None:  # score only the within-group order (what --rank within uses)
            beta = centre_within(beta, [w[estimated] for w in within])
        pred[:, test] = b0.unsqueeze(1) + beta @ x[test].T
    if paired:
        pred_d, y_d = _pair_differences(pred, pairs), _pair_differences(y, pairs)
    else:
        pred_d, y_d = pred, y
    taus = torch.tensor([_tau(pred_d[c], y_d) for c in range(len(params))], dtype=torch.float64)
    best = int(torch.argmax(taus))  # first maximum: ties resolve in grid order
    beta, b0 = _fit_all(x, y, [params[best]], penalty, solver, seed + k)
    beta_full[estimated] = beta[0].to(torch.float32)
    table = [(prm, float(t)) for prm, t in zip(params, taus)]
    return RegressionResult(beta_full, estimated, float(b0[0]), penalty, solver, params[best],
                            float(taus[best]), t_mean, t_std, table)
