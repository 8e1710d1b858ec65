"""Allocation model: prior order within a group, learned cross-group scale; planted problems."""

import pytest
import torch

from bonsai_lite.search.allocation import fit_allocation, normalised
from bonsai_lite.search.regression import fit_relevance
from bonsai_lite.search.sampling import sample_masks

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]

def _planted(n_masks, *, seed=0, n_groups=30, size=40, noise=0.05, spread=0.5):
    """Truth: relevance = a_g * prior~_u with group scales a_g spanning 30x (what the prior cannot
    see); the prior has the right order inside each group but arbitrary per-group units."""
    g = torch.Generator().manual_seed(seed)
    groups = [torch.arange(i * size, (i + 1) * size) for i in range(n_groups)]
    shape = torch.rand(n_groups * size, generator=g, dtype=torch.float64) ** 2 + 0.05
    unit_scale = torch.cat([torch.full((size,), float(10 ** torch.rand(1, generator=g) * 3)) for _ in groups])
    prior = shape * unit_scale  # raw prior: right order in a group, wrong scale across groups
    a = 10 ** (1.5 * torch.rand(n_groups, generator=g, dtype=torch.float64))
    truth = normalised(shape, groups) * torch.repeat_interleave(a, size)
    s = sample_masks(prior, groups=groups, p_iter=0.2, n_masks=n_masks, generator=g, keep_spread=spread)
    clean = -(s.masks.double() @ truth)
    losses = clean + noise * clean.std() * torch.randn(s.masks.shape[0], generator=g, dtype=torch.float64)
    return s, groups, prior, truth, losses


def _loss_of_removing(score, truth, candidates, n):
    """True relevance removed by dropping the n lowest-scoring candidates (lower is better)."""
    idx = candidates.nonzero().flatten()
    order = idx[torch.argsort(score[idx].double(), stable=True)]
    return float(truth[order[:n]].sum())


@pytest.mark.parametrize("n_masks", [24, 64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_allocation_beats_prior_only_and_unit_regression(n_masks, seed):
    # 24 masks for 30 groups (fewer than the groups: the shrinkage to a common scale carries it) and 64
    s, groups, prior, truth, losses = _planted(n_masks, seed=seed)
    alloc = fit_allocation(s.masks, losses, prior=prior, groups=groups, candidates=s.candidates)
    unit = fit_relevance(s.masks, losses, penalty="l1")
    n = int(s.candidates.sum()) // 2
    lost = {
        "oracle": _loss_of_removing(truth, truth, s.candidates, n),
        "allocation": _loss_of_removing(alloc.beta, truth, s.candidates, n),
        "unit": _loss_of_removing(unit.beta, truth, s.candidates, n),
        "prior": _loss_of_removing(normalised(prior, groups), truth, s.candidates, n),
    }
    assert lost["oracle"] <= lost["allocation"] < lost["prior"], lost
    assert lost["allocation"] < lost["unit"], lost
    if n_masks > len(groups):
        assert alloc.cv_kendall_tau > 0.3  # the groups' deviations from the common scale are predicted


def test_allocation_without_group_signal_reports_low_tau():
    s, groups, prior, truth, _ = _planted(24)
    noise = torch.randn(s.masks.shape[0], generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    res = fit_allocation(s.masks, noise, prior=prior, groups=groups, candidates=s.candidates)
    assert res.cv_kendall_tau < 0.3 and torch.isfinite(res.beta).all()
