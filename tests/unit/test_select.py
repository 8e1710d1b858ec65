"""Greedy selection: ascending score, ties broken by the prior (not by unit index)."""

import pytest
import torch

from bonsai_lite.prune.select import greedy_drop

pytestmark = pytest.mark.unit


def test_tied_scores_drop_lowest_prior_not_first_index():
    # Defect 3: an all-zero beta (large gamma) used to drop units 0, 1, 2, ... (the first layers).
    scores = torch.zeros(10, dtype=torch.float64)
    prior = torch.tensor([9, 8, 7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.float64)
    drop = greedy_drop(scores, torch.ones(10, dtype=torch.float64), 2.5, tiebreak=prior)
    assert drop.nonzero().flatten().tolist() == [7, 8, 9]


def test_score_order_first_tiebreak_second_fixed_units_kept():
    scores = torch.tensor([0.0, 1.0, 0.0, float("inf"), 1.0, -1.0], dtype=torch.float64)
    prior = torch.tensor([5.0, 0.0, 1.0, -9.0, 2.0, 7.0], dtype=torch.float64)
    costs = torch.ones(6, dtype=torch.float64)
    # reference: sort by the (score, prior) pairs in Python
    ref = sorted((i for i in range(6) if scores[i] != float("inf")), key=lambda i: (scores[i], prior[i]))
    for target in range(1, 6):
        drop = greedy_drop(scores, costs, target - 0.5, tiebreak=prior)
        assert set(drop.nonzero().flatten().tolist()) == set(ref[: min(target, len(ref))])
    assert not greedy_drop(scores, costs, 100.0, tiebreak=prior)[3]


def test_within_group_order_keeps_the_prior_allocation_and_betas_order():
    from bonsai_lite.prune.select import greedy_drop, within_group_order

    g = torch.Generator().manual_seed(0)
    groups = [slice(0, 6), slice(6, 10)]
    prior = torch.tensor([5.0, 1.0, 2.0, 3.0, 4.0, 0.5, -1.0, 0.0, 7.0, -2.0], dtype=torch.float64)
    candidates = torch.tensor([0, 1, 1, 1, 1, 1, 1, 1, 0, 1], dtype=torch.bool)
    beta = torch.randn(10, generator=g, dtype=torch.float64)
    out = within_group_order(beta, prior, groups, candidates)
    for sl in groups:
        c = torch.arange(10)[sl][candidates[sl]]
        # the group's values are the prior's (so the allocation across groups is the prior's) ...
        assert torch.equal(torch.sort(out[c]).values, torch.sort(prior[c]).values)
        # ... placed in beta's order
        assert torch.equal(torch.argsort(out[c]), torch.argsort(beta[c]))
    assert out[0] == prior[0] and out[8] == prior[8]  # fixed units untouched
    costs = torch.ones(10, dtype=torch.float64)
    scores = torch.where(candidates, out, torch.full_like(out, float("inf")))
    ref = torch.where(candidates, prior, torch.full_like(prior, float("inf")))
    drop, drop_ref = greedy_drop(scores, costs, 4), greedy_drop(ref, costs, 4)
    assert [int(drop[sl].sum()) for sl in groups] == [int(drop_ref[sl].sum()) for sl in groups]
