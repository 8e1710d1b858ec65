"""Mask sampling: fixed fraction, complement pairs, keep counts, seeding, prior preference."""

import pytest
import torch

from bonsai_lite.search.sampling import sample_masks

pytestmark = pytest.mark.unit

# Group sizes chosen so that candidate counts are even, odd and 1; plus a lone unit.
SIZES = [20, 23, 3, 1]
P_ITER = 0.2


def _groups():
    out, start = [], 0
    for n in SIZES:
        out.append(torch.arange(start, start + n))
        start += n
    return out


def _prior(seed=0):
    return torch.rand(sum(SIZES), generator=torch.Generator().manual_seed(seed))


def _sample(seed=0, n_masks=40, prior=None):
    prior = _prior() if prior is None else prior
    gen = torch.Generator().manual_seed(seed)
    return sample_masks(prior, groups=_groups(), p_iter=P_ITER, n_masks=n_masks, generator=gen)


def test_fixed_top_fraction_always_kept():
    prior, s = _prior(), _sample()
    assert s.masks.shape == (40, sum(SIZES)) and s.masks.dtype == torch.bool
    assert torch.equal(s.fixed, ~s.candidates)
    for idx in _groups():
        n = idx.numel()
        n_fixed = n if n == 1 else min(n - 2, int((1 - 2 * P_ITER) * n + 0.5))
        fixed = idx[s.fixed[idx]]
        assert fixed.numel() == n_fixed
        # the fixed units are the group's top by prior
        top = idx[torch.argsort(prior[idx], descending=True)[:n_fixed]]
        assert set(fixed.tolist()) == set(top.tolist())
        assert s.masks[:, fixed].all()


def test_pairs_are_complements_and_drop_counts():
    s = _sample()
    masks, comps = s.masks[0::2], s.masks[1::2]
    cand = s.candidates
    assert torch.equal(masks[:, cand], ~comps[:, cand])
    assert torch.equal(masks[:, ~cand], comps[:, ~cand])
    for idx in _groups():
        c_idx = idx[cand[idx]]
        c = c_idx.numel()
        dropped = (~masks[:, c_idx]).sum(1)
        assert ((dropped == c - c // 2) | (dropped == c // 2)).all()
        assert ((~comps[:, c_idx]).sum(1) == c - dropped).all()
        if c % 2:  # odd groups: which pair member keeps the extra unit varies
            assert len(set(dropped.tolist())) == 2


def test_no_identical_candidate_columns_with_one_candidate_per_layer():
    # Defect 1: 9 heads at p_iter 0.05 left one candidate per layer; every mask dropped it and
    # every complement kept it, so all those columns were identical (one shared beta).
    groups = [torch.arange(9 * i, 9 * (i + 1)) for i in range(30)]
    prior = torch.rand(270, generator=torch.Generator().manual_seed(1))
    s = sample_masks(prior, groups=groups, p_iter=0.05, n_masks=200, generator=torch.Generator().manual_seed(0))
    x = s.masks[:, s.candidates].double()
    assert x.shape[1] >= 2 * len(groups)
    cols = {tuple(col.tolist()) for col in x.T}
    assert len(cols) == x.shape[1]  # no two candidate columns alike
    indicator = (torch.arange(200) % 2 == 0).double()
    assert not any(torch.equal(col, indicator) or torch.equal(col, 1 - indicator) for col in x.T)


def test_lone_unit_never_perturbed_and_odd_n_rounds_up():
    s = _sample(n_masks=7)
    assert s.masks.shape[0] == 8
    assert bool(s.fixed[-1]) and s.masks[:, -1].all()


def test_seeding():
    a, b, c = _sample(seed=5), _sample(seed=5), _sample(seed=6)
    assert torch.equal(a.masks, b.masks)
    assert not torch.equal(a.masks, c.masks)


def test_higher_prior_candidates_kept_more_often():
    # One group of 40: 32 fixed, 8 candidates whose priors differ by a factor of 8.
    prior = torch.cat([torch.full((32,), 100.0), torch.tensor([1.0] * 4 + [8.0] * 4)])
    gen = torch.Generator().manual_seed(0)
    s = sample_masks(prior, groups=[torch.arange(40)], p_iter=0.1, n_masks=2000, generator=gen)
    kept = s.masks[0::2, 32:].float().mean(0)
    # Keeping 4 of 8 by successive weighted draws puts the heavy units near 0.9, the light
    # ones near 0.1; the margin is far wider than the +-0.03 sampling noise over 1000 draws.
    assert kept[4:].min() > 0.7 and kept[:4].max() < 0.3


def test_zero_priors_still_sampled():
    prior = torch.cat([torch.ones(8), torch.zeros(4)])
    gen = torch.Generator().manual_seed(0)
    s = sample_masks(prior, groups=[torch.arange(12)], p_iter=0.25, n_masks=400, generator=gen)
    assert s.candidates[8:].all()
    assert s.masks[0::2, 8:].any(0).all()  # every zero-prior candidate kept at least once


def test_rejects_bad_inputs():
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError):
        sample_masks(torch.ones(4), groups=[torch.arange(3), torch.arange(2, 4)],
                     p_iter=0.2, n_masks=2, generator=gen)
    with pytest.raises(ValueError):
        sample_masks(torch.tensor([1.0, float("nan")]), groups=[torch.arange(2)],
                     p_iter=0.2, n_masks=2, generator=gen)


def test_keep_spread_varies_counts_and_keeps_pairs():
    g = torch.Generator().manual_seed(0)
    prior = torch.rand(60, generator=torch.Generator().manual_seed(1))
    groups = [torch.arange(0, 30), torch.arange(30, 60)]
    s = sample_masks(prior, groups=groups, p_iter=0.25, n_masks=40, generator=g, keep_spread=1.0)
    counts = s.masks[:, :30][:, s.candidates[:30]].sum(1)
    assert len(set(counts.tolist())) > 3  # the kept count varies between masks
    for k in range(0, 40, 2):
        a, b = s.masks[k], s.masks[k + 1]
        assert torch.equal(a[s.candidates], ~b[s.candidates]) and a[s.fixed].all() and b[s.fixed].all()
    g2 = torch.Generator().manual_seed(0)
    again = sample_masks(prior, groups=groups, p_iter=0.25, n_masks=40, generator=g2, keep_spread=1.0)
    assert torch.equal(again.masks, s.masks)


def test_global_candidates_cover_the_lowest_units_and_never_leave_one_alone():
    from bonsai_lite.prune.select import greedy_drop
    from bonsai_lite.search.sampling import global_candidates

    g = torch.Generator().manual_seed(3)
    groups = [slice(0, 40), slice(40, 80), slice(80, 84)]
    scores = torch.randn(84, generator=g, dtype=torch.float64)
    scores[40:80] -= 1.5  # one group is much less useful: a per-group rule would cap its losses
    costs = torch.ones(84, dtype=torch.float64)
    costs[80:84] = 10.0
    cand = global_candidates(scores, costs, 30.0, groups)
    assert greedy_drop(scores, costs, 15.0)[~cand].sum() == 0  # they hold an iteration's whole removal
    assert int(cand[40:80].sum()) > int(cand[0:40].sum())  # the weak group contributes more
    for sl in groups:
        assert int(cand[sl].sum()) != 1
    # sample_masks perturbs exactly those units
    s = sample_masks(scores.float(), groups=groups, p_iter=0.1, n_masks=8, generator=g, candidates=cand)
    assert torch.equal(s.candidates, cand)
    assert torch.all(s.masks[:, ~cand])
