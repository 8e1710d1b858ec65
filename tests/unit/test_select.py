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
