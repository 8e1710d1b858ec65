"""The refit's normal equations from the kept inputs and the dense output (prune/refit.py), solved in
place, against the textbook ridge on the whole (d + 1) x (d + 1) second-moment matrix."""
from __future__ import annotations

import torch

from bonsai_lite.prune import refit as R


def _reference(x: torch.Tensor, weight, bias, kept, damp):
    # the whole second-moment matrix of [x, 1], then the ridge on the kept inputs, shrunk towards W
    d = x.shape[1]
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1).double()
    gram = x1.T @ x1
    rows = torch.cat([kept, torch.tensor([d])])
    a = gram[rows][:, rows].clone()
    lam = damp * a.diagonal()[:-1].mean()
    a[range(len(kept)), range(len(kept))] += lam
    rhs = gram[rows] @ torch.cat([weight.double(), bias.double()[:, None]], 1).T
    rhs[:-1] += lam * weight.double()[:, kept].T
    beta = torch.linalg.solve(a, rhs)
    new = torch.zeros(weight.shape, dtype=torch.float64)
    new[:, kept] = beta[:-1].T
    return new, beta[-1]


def test_kept_rows_solve_equals_the_whole_matrix_ridge(monkeypatch):
    monkeypatch.setattr(R, "OUT_BLOCK", 5)  # several blocks of output rows, the last one short
    monkeypatch.setattr(R, "COL_BLOCK", 3)  # several column blocks of each tile product, the last one short
    g = torch.Generator().manual_seed(0)
    n, d, out = 300, 24, 13
    x = torch.randn(n, d, generator=g) * torch.linspace(0.2, 3.0, d) + 0.5  # uneven scales, nonzero means
    weight, bias = torch.randn(out, d, generator=g), torch.randn(out, generator=g)
    kept = torch.tensor([0, 3, 4, 9, 10, 11, 17, 23])
    moments, add = R._kept_moments(weight, bias, kept, "cpu")
    for tile in x.split(70):  # the tap sees tiles of [batch, seq, d] as the block computes them
        add("mlp", tile.reshape(1, -1, d))
    got_w, got_b = R.refit_projection(moments, weight, kept, damp=R.DAMP)
    want_w, want_b = _reference(x, weight, bias, kept, R.DAMP)
    assert got_w.dtype == got_b.dtype == torch.float32  # solved in float64, held as the model computes
    torch.testing.assert_close(got_w.double(), want_w, rtol=1e-4, atol=1e-5)  # float32 tile products
    torch.testing.assert_close(got_b.double(), want_b, rtol=1e-4, atol=1e-5)
    assert not got_w[:, [1, 2, 5]].any()  # removed columns stay zero


def test_no_bias_and_nothing_kept():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 6, generator=g) + 1.0
    weight = torch.randn(4, 6, generator=g)
    kept = torch.tensor([], dtype=torch.long)
    moments, add = R._kept_moments(weight, None, kept, "cpu")
    add("heads", x)
    w, b = R.refit_projection(moments, weight, kept)
    assert not w.any()
    # nothing kept: the bias alone reproduces the dense output's mean
    torch.testing.assert_close(b.double(), (x.double() @ weight.double().T).mean(0), rtol=1e-6, atol=1e-6)


def test_the_solve_overwrites_its_inputs_instead_of_copying_them():
    # the 8B refit fits 4 GB because the factor takes A's memory and the solution B's (no third matrix)
    g = torch.Generator().manual_seed(2)
    m = torch.randn(40, 30, generator=g, dtype=torch.float64)
    a = m.T @ m + torch.eye(30, dtype=torch.float64)
    rhs_t = torch.randn(7, 30, generator=g, dtype=torch.float64)
    want = torch.linalg.solve(a, rhs_t.T).T
    ptr = rhs_t.data_ptr()
    got = R._cholesky_solve_(a.clone(), rhs_t)
    torch.testing.assert_close(got, want)
    assert got.data_ptr() == ptr
