"""Priors against explicit per-unit python loops on tiny random tensors."""

import math

import pytest
import torch

from bonsai_lite.search.priors import (
    ActivationStats,
    activation_magnitude_scores,
    column_gram_blocks,
    column_sq_norms,
    flap_bias_compensation,
    flap_scores,
    flap_standardize,
    magnitude_scores,
    residual_column_scores,
    residual_covariances,
    wanda_scores,
)

pytestmark = pytest.mark.unit

HEAD_DIM, N_HEADS, OUT = 4, 3, 5
WIDTH = HEAD_DIM * N_HEADS


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(2, 7, WIDTH, generator=g) * torch.linspace(0.1, 3.0, WIDTH) + 0.5
    w_out = torch.randn(OUT, WIDTH, generator=g)
    stats = ActivationStats.empty(WIDTH)
    stats.update(acts)
    return acts.reshape(-1, WIDTH).double(), w_out, stats


def _units(group_size):
    return [range(u * group_size, (u + 1) * group_size) for u in range(WIDTH // group_size)]


@pytest.mark.parametrize("group_size", [1, HEAD_DIM])
def test_wanda_matches_loops(data, group_size):
    rows, w, stats = data
    expected = []
    for cols in _units(group_size):
        per_col = []
        for c in cols:
            w_mean = sum(abs(float(w[o, c])) for o in range(OUT)) / OUT
            rms = math.sqrt(sum(float(r[c]) ** 2 for r in rows) / len(rows))
            per_col.append(w_mean * rms)
        expected.append(sum(per_col) / len(per_col))
    got = wanda_scores(w, stats, group_size=group_size)
    assert got.dtype == torch.float32 and got.shape == (WIDTH // group_size,)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32))


@pytest.mark.parametrize("group_size", [1, HEAD_DIM])
def test_activation_magnitude_and_weight_magnitude_match_loops(data, group_size):
    rows, w, stats = data
    act, mag = [], []
    for cols in _units(group_size):
        # A head's activations flattened to one vector (appendix F.1, eq. 5).
        values = [abs(float(r[c])) for r in rows for c in cols]
        act.append(sum(values) / len(values))
        weights = [abs(float(w[o, c])) for o in range(OUT) for c in cols]
        mag.append(sum(weights) / len(weights))
    torch.testing.assert_close(
        activation_magnitude_scores(stats, group_size=group_size), torch.tensor(act)
    )
    torch.testing.assert_close(magnitude_scores(w, group_size=group_size), torch.tensor(mag))


@pytest.mark.parametrize("group_size", [1, HEAD_DIM])
def test_flap_scores_match_loops(data, group_size):
    rows, w, stats = data
    n = len(rows)
    expected = []
    for cols in _units(group_size):
        total = 0.0
        for c in cols:
            mean = sum(float(r[c]) for r in rows) / n
            var = sum((float(r[c]) - mean) ** 2 for r in rows) / (n - 1)
            total += var * sum(float(w[o, c]) ** 2 for o in range(OUT))
        expected.append(total)
    got = flap_scores(w, stats, group_size=group_size)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32))


@pytest.mark.parametrize("rows_per_slab", [1, 2, 3, 64])
def test_column_norms_in_slabs_equal_the_float64_sum(rows_per_slab):
    """Slabs that split the rows unevenly (5 rows in 2s and 3s), one slab, and bf16 weights."""
    w = torch.randn(OUT, WIDTH, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    expected = w.double().square().sum(0)
    torch.testing.assert_close(column_sq_norms(w, rows_per_slab=rows_per_slab), expected, rtol=1e-6, atol=0)


def test_stats_streamed_in_chunks_equal_one_shot():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 10, WIDTH, generator=g) * 4 + 2).to(torch.bfloat16)
    whole = ActivationStats.empty(WIDTH)
    whole.update(x)
    parts = [ActivationStats.empty(WIDTH) for _ in range(3)]
    for part, chunk in zip(parts, x.reshape(-1, WIDTH).split([5, 11, 14])):
        part.update(chunk)
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert merged.count == whole.count == 30
    for name in ("sum", "sq_sum", "abs_sum"):
        torch.testing.assert_close(getattr(merged, name), getattr(whole, name))
    # merge is pure: the operands are unchanged
    assert parts[0].count == 5
    ref = x.reshape(-1, WIDTH).double()
    torch.testing.assert_close(merged.variance, ref.var(0))
    torch.testing.assert_close(merged.mean, ref.mean(0))


def test_stats_update_in_row_chunks_matches_float64_reference(monkeypatch):
    """A tile wider than one conversion chunk (3 rows here) gives the sums and second moments of the
    whole tile taken at once in float64."""
    import bonsai_lite.search.priors as P

    monkeypatch.setattr(P, "UPDATE_CHUNK_BYTES", 3 * 8 * WIDTH)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 17, WIDTH, generator=g) * torch.linspace(0.1, 3.0, WIDTH) - 1.5
    ref = x.reshape(-1, WIDTH).double()
    stats = ActivationStats.empty(WIDTH, gram=True)
    stats.update(x)
    x64 = ref.clone()
    ActivationStats.empty(WIDTH).update(x64)
    torch.testing.assert_close(x64, ref, rtol=0, atol=0)  # a float64 tile is not squared in place
    assert stats.count == 34
    torch.testing.assert_close(stats.sum, ref.sum(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.abs_sum, ref.abs().sum(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.sq_sum, ref.square().sum(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.gram, ref.T @ ref, rtol=1e-5, atol=1e-5)  # a float32 product per tile
    torch.testing.assert_close(x.reshape(-1, WIDTH).double(), ref, rtol=0, atol=0)


def test_stats_reject_wrong_width_and_empty():
    stats = ActivationStats.empty(WIDTH)
    with pytest.raises(ValueError):
        stats.update(torch.zeros(2, WIDTH + 1))
    with pytest.raises(ValueError):
        _ = stats.rms


def test_bias_compensation_preserves_mean_output(data):
    _, w, stats = data
    keep = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    mean_in = stats.mean.float()
    full = torch.nn.functional.linear(mean_in, w)
    pruned = torch.nn.functional.linear(mean_in[keep], w[:, keep])
    bias = flap_bias_compensation(w, stats, keep_columns=keep)
    assert bias.shape == (OUT,)
    torch.testing.assert_close(pruned + bias, full, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(pruned, full)  # the compensation is doing work


def test_flap_standardize_per_group_and_pooling():
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(6, generator=g) * 10, torch.rand(8, generator=g)
    za, zb = flap_standardize([a, b])
    for z, s in ((za, a), (zb, b)):
        ref = [(float(v) - float(s.mean())) / float(s.std()) for v in s]
        torch.testing.assert_close(z, torch.tensor(ref))
    # FLAP's head order: standardise columns, then average groups of head_dim columns.
    (zh,) = flap_standardize([b], group_sizes=[4])
    torch.testing.assert_close(zh, zb.reshape(2, 4).mean(1))
    # constant or singleton groups carry no ranking: zeros, not NaN
    zc, z1 = flap_standardize([torch.full((5,), 3.0), torch.tensor([7.0])])
    assert torch.equal(zc, torch.zeros(5)) and torch.equal(z1, torch.zeros(1))


def test_group_size_must_divide_width(data):
    _, w, stats = data
    with pytest.raises(ValueError):
        wanda_scores(w, stats, group_size=5)


def test_flap_standardize_with_given_norms():
    g = torch.Generator().manual_seed(0)
    groups = [torch.rand(12, generator=g, dtype=torch.float64), torch.rand(8, generator=g, dtype=torch.float64)]
    own = [(float(x.mean()), float(x.std())) for x in groups]
    # the group's own mean and std give FLAP's z-scores; another model's give a shifted scale
    for a, b in zip(flap_standardize(groups, norms=own), flap_standardize(groups)):
        torch.testing.assert_close(a, b)
    shifted = flap_standardize(groups, norms=[(0.0, 1.0), None])
    torch.testing.assert_close(shifted[0], groups[0].float())
    torch.testing.assert_close(shifted[1], flap_standardize(groups)[1])


def test_group_drift_is_the_median_ratio_on_shared_columns():
    from bonsai_lite.search.priors import group_drift

    anchor_cols, anchor = torch.arange(6), torch.tensor([1.0, 2.0, 4.0, 8.0, 0.0, 3.0])
    # columns 1, 3, 4 and 5 survive, reordered; 4 had a zero score and cannot give a ratio
    cols, now = torch.tensor([5, 1, 3, 4]), torch.tensor([1.5, 3.0, 2.0, 9.0])
    # ratios 0.5 (col 5), 1.5 (col 1), 0.25 (col 3): median 0.5
    assert group_drift(now, cols, anchor_cols, anchor) == pytest.approx(0.5)
    # a uniform rescale is recovered exactly, whatever the survivors
    assert group_drift(anchor[[0, 2]] * 0.3, torch.tensor([0, 2]), anchor_cols, anchor) == pytest.approx(0.3)
    # nothing comparable: no correction
    assert group_drift(now, torch.tensor([7, 8, 9, 10]), anchor_cols, anchor) == 1.0


@pytest.mark.parametrize("group_size", [1, HEAD_DIM])
def test_residual_fluctuation_is_the_error_a_least_squares_refit_leaves(group_size):
    """A unit's summed residual column scores equal the squared output error (per row, n - 1) of the
    best affine fit of the dense output from the other inputs, solved by lstsq; FLAP's variance
    score is the same error with only a bias to fit, and is larger on correlated inputs."""
    g = torch.Generator().manual_seed(3)
    n = 400
    acts = (torch.randn(n, WIDTH, generator=g, dtype=torch.float64) @ torch.randn(WIDTH, WIDTH, generator=g,
                                                                                    dtype=torch.float64)) + 0.3
    w = torch.randn(OUT, WIDTH, generator=g, dtype=torch.float64)
    stats = ActivationStats.empty(WIDTH, gram=True)
    for chunk in acts.split(150):
        stats.update(chunk)
    col = residual_column_scores(column_gram_blocks(w, group_size=group_size),
                                 residual_covariances(stats, group_size=group_size, damp=0.0))
    unit = col.reshape(-1, group_size).sum(1)
    flap = flap_scores(w, stats, group_size=group_size).double()
    target = acts @ w.T
    for u, cols in enumerate(_units(group_size)):
        kept = [c for c in range(WIDTH) if c not in cols]
        design = torch.cat([acts[:, kept], torch.ones(n, 1, dtype=torch.float64)], 1)
        fit = design @ torch.linalg.lstsq(design, target).solution
        error = (target - fit).square().sum() / (n - 1)
        assert unit[u].item() == pytest.approx(error.item(), rel=1e-4)  # float32 tile products
        assert flap[u] > 1.5 * unit[u]  # the inputs are correlated: a refit recovers much of the variance


def test_second_moments_stream_merge_and_reduce():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 10, WIDTH, generator=g) * 2 + 1
    whole = ActivationStats.empty(WIDTH, gram=True)
    whole.update(x)
    parts = [ActivationStats.empty(WIDTH, gram=True) for _ in range(2)]
    parts[0].update(x[:1])
    parts[1].update(x[1:])
    merged = parts[0].merge(parts[1])
    rows = x.reshape(-1, WIDTH).double()
    torch.testing.assert_close(merged.gram, rows.T @ rows, rtol=1e-5, atol=1e-4)  # float32 tile products
    torch.testing.assert_close(whole.gram, rows.T @ rows, rtol=1e-5, atol=1e-4)
    expected = residual_covariances(whole, group_size=HEAD_DIM)
    whole.reduce_gram(group_size=HEAD_DIM)
    assert whole.gram is None
    torch.testing.assert_close(residual_covariances(whole, group_size=HEAD_DIM), expected)
    with pytest.raises(ValueError, match="second moments"):
        residual_covariances(ActivationStats.empty(WIDTH), group_size=1)
