"""Module-level priors rho (paper section 3.2, appendix F) and FLAP's fluctuation metric.

Every score here is computed from the *input* of a block's output projection: the concatenated
head outputs entering ``o_proj`` (width ``n_heads * head_dim``) or the MLP intermediate entering
``down_proj`` (width ``I``). A prunable unit is ``group_size`` consecutive input columns
(``head_dim`` for a head, 1 for an MLP unit), so one function serves both kinds.

Pure tensor maths: no I/O, no hooks. The engine feeds activation tiles to ``ActivationStats``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "ActivationStats",
    "wanda_scores",
    "activation_magnitude_scores",
    "magnitude_scores",
    "flap_scores",
    "flap_column_scores",
    "residual_covariances",
    "residual_column_scores",
    "column_gram_blocks",
    "column_sq_norms",
    "flap_standardize",
    "flap_bias_compensation",
    "bias_compensation",
    "RIDGE_DAMP",
]

# Ridge damping of the least-squares refit (prune/refit.py, which takes it from here), times the mean
# diagonal of the second moments; the residual fluctuation models what that refit cannot recover,
# so it damps the inputs' covariance the same way.
RIDGE_DAMP = 0.01
# `ActivationStats.update` converts a tile to float64 this many bytes at a time: under glibc's mmap
# threshold (1 MiB, `search.machine.MMAP_THRESHOLD`), so the heap reuses the block.
UPDATE_CHUNK_BYTES = 2**19


@dataclass
class ActivationStats:
    """Per-channel running sums of an output projection's input activations.

    Sums are float64 because they run over ~10^5 token rows of bf16/fp16 activations; float32
    would lose the low bits that ``variance`` needs (it subtracts two large sums). ``count`` is the
    number of token rows seen. ``update`` accumulates in place; ``merge`` returns a new object and
    leaves both operands untouched, so tiles streamed on different devices or processes combine
    in any order.
    """

    sum: torch.Tensor
    sq_sum: torch.Tensor
    abs_sum: torch.Tensor
    count: int = 0
    # Optional second moments x^T x ([width, width], float64), for the residual fluctuation, and
    # what `reduce_gram` turns them into once every row is in (the per-unit residual covariances).
    gram: torch.Tensor | None = None
    residual: torch.Tensor | None = None

    @classmethod
    def empty(cls, width: int, *, device: torch.device | str | None = None, gram: bool = False) -> ActivationStats:
        """Zeroed statistics for ``width`` input channels (with their second moments if ``gram``)."""
        zeros = lambda: torch.zeros(width, dtype=torch.float64, device=device)  # noqa: E731
        g = torch.zeros(width, width, dtype=torch.float64, device=device) if gram else None
        return cls(sum=zeros(), sq_sum=zeros(), abs_sum=zeros(), count=0, gram=g)

    @property
    def width(self) -> int:
        return self.sum.numel()

    def update(self, x: torch.Tensor) -> None:
        """Accumulate a tile ``x`` of shape ``[..., width]`` (any float dtype, any device)."""
        if x.shape[-1] != self.width:
            raise ValueError(f"expected last dim {self.width}, got shape {tuple(x.shape)}")
        rows = x.reshape(-1, self.width)
        # Reduce on x's device, move only the three width-long vectors: a tile can be
        # thousands of rows and the stats may live on the CPU. On a CPU a few rows at a time: a
        # float64 copy of a whole tile is a fresh mapping (search.machine.bound_host_allocator)
        # whose page faults cost 5-9x the sums themselves (docs/PERFORMANCE.md, twenty-third
        # session); on a GPU the whole tile, each part's sums being a copy to the stats' device.
        dev = self.sum.device
        step = max(1, UPDATE_CHUNK_BYTES // (8 * self.width)) if rows.device.type == "cpu" else max(1, len(rows))
        for part in rows.split(step):
            part = part.to(torch.float64, copy=True)  # a copy even of a float64 tile: squared in place below
            self.sum += part.sum(0).to(dev)
            self.abs_sum += part.abs().sum(0).to(dev)
            self.sq_sum += part.square_().sum(0).to(dev)
        if self.gram is not None:  # a float32 product per tile, summed in float64: 5x faster than float64
            r32 = rows.float()
            self.gram.add_((r32.T @ r32).to(dev))
        self.count += rows.shape[0]

    def merge(self, other: ActivationStats) -> ActivationStats:
        """Statistics of the union of both streams (new object)."""
        if other.width != self.width:
            raise ValueError(f"cannot merge widths {self.width} and {other.width}")
        dev = self.sum.device
        return ActivationStats(
            sum=self.sum + other.sum.to(dev),
            sq_sum=self.sq_sum + other.sq_sum.to(dev),
            abs_sum=self.abs_sum + other.abs_sum.to(dev),
            count=self.count + other.count,
            gram=None if self.gram is None or other.gram is None else self.gram + other.gram.to(dev),
        )

    def reduce_gram(self, *, group_size: int, damp: float = RIDGE_DAMP) -> None:
        """Replace the second moments (width^2 floats) by the residual covariances (width x g)."""
        self.residual = residual_covariances(self, group_size=group_size, damp=damp)
        self.gram = None

    def _require_rows(self, minimum: int) -> None:
        if self.count < minimum:
            raise ValueError(f"need at least {minimum} activation rows, have {self.count}")

    @property
    def mean(self) -> torch.Tensor:
        self._require_rows(1)
        return self.sum / self.count

    @property
    def mean_abs(self) -> torch.Tensor:
        self._require_rows(1)
        return self.abs_sum / self.count

    @property
    def rms(self) -> torch.Tensor:
        self._require_rows(1)
        return (self.sq_sum / self.count).sqrt()

    @property
    def variance(self) -> torch.Tensor:
        """Sample variance (n - 1 denominator, as FLAP's running estimate)."""
        self._require_rows(2)
        centered = self.sq_sum - self.sum.square() / self.count
        # Cancellation can leave -1e-17 on constant channels; a variance is never negative.
        return (centered / (self.count - 1)).clamp_min(0.0)


def _per_unit(column_scores: torch.Tensor, group_size: int, *, reduce: str) -> torch.Tensor:
    width = column_scores.numel()
    if group_size < 1 or width % group_size:
        raise ValueError(f"width {width} is not a multiple of group_size {group_size}")
    units = column_scores.reshape(width // group_size, group_size)
    pooled = units.mean(1) if reduce == "mean" else units.sum(1)
    return pooled.to(torch.float32)


def _check_weight(w_out: torch.Tensor, stats: ActivationStats | None) -> None:
    if w_out.dim() != 2:
        raise ValueError(f"w_out must be [out_features, in_features], got {tuple(w_out.shape)}")
    if stats is not None and stats.width != w_out.shape[1]:
        raise ValueError(f"w_out has {w_out.shape[1]} input columns, stats have {stats.width}")


def _column_abs_mean(w_out: torch.Tensor) -> torch.Tensor:
    # mean(dtype=) avoids materialising a float64 copy of a 4096 x 11008 matrix.
    return w_out.abs().mean(0, dtype=torch.float32).to(torch.float64)


def wanda_scores(w_out: torch.Tensor, stats: ActivationStats, *, group_size: int) -> torch.Tensor:
    """Module-level Wanda (appendix F.2, eq. 6): mean_o |W[o, c]| * RMS(a_c), averaged per unit.

    ``w_out`` is the output projection ``[out_features, d]``; returns float32 ``[d // group_size]``.
    """
    _check_weight(w_out, stats)
    column = _column_abs_mean(w_out) * stats.rms.to(w_out.device)
    return _per_unit(column, group_size, reduce="mean")


def activation_magnitude_scores(stats: ActivationStats, *, group_size: int) -> torch.Tensor:
    """Mean |a| per unit (appendix F.1, eqs. 4-5).

    Flattening a head's ``[B, S, d_h]`` activations and averaging equals the mean of its columns'
    means, because every column has the same row count. Eq. 4 averages per sequence first; with
    equal-length calibration sequences that is the same number.
    """
    return _per_unit(stats.mean_abs, group_size, reduce="mean")


def magnitude_scores(w_out: torch.Tensor, *, group_size: int) -> torch.Tensor:
    """Data-free baseline: mean |W_out| over the unit's input columns (all output rows).

    Only the output projection is looked at because it is the one matrix whose columns map
    one-to-one onto units for both heads and MLP units; q/k/v and gate/up rows would need
    architecture knowledge (GQA sharing) that this module must not have.
    """
    _check_weight(w_out, None)
    return _per_unit(_column_abs_mean(w_out), group_size, reduce="mean")


def flap_scores(w_out: torch.Tensor, stats: ActivationStats, *, group_size: int) -> torch.Tensor:
    """FLAP's WIFV fluctuation metric: Var(a_c) * ||W[:, c]||^2 per column, summed per unit.

    An et al. 2024, eq. (3) and their ``metrics['WIFV']``. Their AL-AM mode additionally squares
    the attention columns' metric and standardises columns before averaging into heads; to
    reproduce that, call with ``group_size=1``, square, and pass ``group_sizes`` to
    ``flap_standardize``.
    """
    _check_weight(w_out, stats)
    return flap_column_scores(column_sq_norms(w_out), stats, group_size=group_size)


def column_sq_norms(w_out: torch.Tensor, *, rows_per_slab: int = 512) -> torch.Tensor:
    """||W[:, c]||^2 per input column of an output projection, float64. Summed in float32 over slabs
    of rows through one reused buffer: a float copy of a whole 8B down_proj (235 MB of fresh pages)
    took 6x as long on a 2-core CPU."""
    acc = torch.zeros(w_out.shape[1], dtype=torch.float32, device=w_out.device)
    buf = torch.empty(min(rows_per_slab, w_out.shape[0]), w_out.shape[1], dtype=torch.float32, device=w_out.device)
    for slab in w_out.split(rows_per_slab):
        b = buf[: len(slab)]
        b.copy_(slab).mul_(b)
        acc += b.sum(0)
    return acc.to(torch.float64)


def flap_column_scores(col_sq_norm: torch.Tensor, stats: ActivationStats, *, group_size: int) -> torch.Tensor:
    """`flap_scores` from the projection's squared column norms instead of the projection."""
    if stats.width != col_sq_norm.numel():
        raise ValueError(f"{col_sq_norm.numel()} column norms for stats of {stats.width} columns")
    return _per_unit(stats.variance.to(col_sq_norm.device) * col_sq_norm, group_size, reduce="sum")


def column_gram_blocks(w_out: torch.Tensor, *, group_size: int) -> torch.Tensor:
    """``W[:, G]^T W[:, G]`` of every unit G (``group_size`` consecutive input columns), float64
    ``[units, g, g]``: the part of the projection the residual fluctuation weighs a unit's inputs by."""
    _check_weight(w_out, None)
    if group_size == 1:
        return column_sq_norms(w_out)[:, None, None]
    units = w_out.shape[1] // group_size
    w = w_out.to(torch.float64).reshape(w_out.shape[0], units, group_size)
    return torch.einsum("oui,ouj->uij", w, w)


def residual_covariances(stats: ActivationStats, *, group_size: int, damp: float = RIDGE_DAMP) -> torch.Tensor:
    """Covariance of each unit's inputs left after the best affine prediction from all the other
    inputs, ``[units, g, g]`` float64: ``inv(inv(Sigma)[G, G])`` with Sigma the inputs' covariance,
    ridge-damped by ``damp`` times its mean diagonal (the refit's `DAMP`). Where FLAP's variance is
    what a bias cannot recover when a unit goes, this is what a least-squares refit of the kept
    columns cannot (docs/search-maths.md, "Residual fluctuation")."""
    if stats.residual is not None and stats.residual.shape[1] == group_size:
        return stats.residual
    if stats.gram is None:
        raise ValueError("residual covariances need the inputs' second moments (ActivationStats.empty(gram=True))")
    stats._require_rows(2)
    width = stats.width
    if width % group_size:
        raise ValueError(f"width {width} is not a multiple of group_size {group_size}")
    mean = stats.mean
    cov = (stats.gram - stats.count * torch.outer(mean, mean)) / (stats.count - 1)
    cov = (cov + cov.T) / 2
    lam = damp * cov.diagonal().mean().clamp_min(1e-30)
    precision = torch.cholesky_inverse(torch.linalg.cholesky(cov + lam * torch.eye(width, dtype=cov.dtype,
                                                                                   device=cov.device)))
    units = width // group_size
    idx = torch.arange(width, device=cov.device).reshape(units, group_size)
    blocks = precision[idx[:, :, None], idx[:, None, :]]  # [units, g, g]
    return torch.linalg.inv(blocks)


def residual_column_scores(blocks: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Column-level residual fluctuation, ``[units * g]`` float64: column i of unit G gets
    ``sum_j (W^T W)[i, j] R_G[j, i]``, so a unit's columns sum to ``tr(W_G R_G W_G^T)``, the expected
    squared output error its removal leaves after the refit. With g = 1 it is FLAP's metric with the
    variance replaced by the residual variance."""
    if blocks.shape != residual.shape:
        raise ValueError(f"weight blocks {tuple(blocks.shape)} and residual covariances {tuple(residual.shape)} differ")
    return (blocks.to(residual.device, torch.float64) * residual.transpose(1, 2)).sum(-1).flatten()


def flap_standardize(
    scores_per_group: Sequence[torch.Tensor], *, group_sizes: Sequence[int] | None = None,
    norms: Sequence[tuple[float, float] | None] | None = None,
) -> list[torch.Tensor]:
    """Z-score each (layer, kind) group's scores so that groups rank on one global scale.

    FLAP standardises every layer's metric vector separately (mean, unbiased std) before its
    global ranking; it stacks layers of one kind, so each row is one of our groups. With
    ``group_sizes[i] = g > 1`` the i-th input holds column scores that are standardised first and
    then averaged over ``g`` consecutive columns, FLAP's order for attention heads. A group whose
    scores are all equal (or that has one element) gets zeros instead of FLAP's NaNs: it carries
    no ranking information and NaNs would poison a global sort. ``norms[i] = (mean, std)``, when
    given, standardises group i with those instead of its own (an earlier model's, e.g. the parent's).
    """
    if group_sizes is not None and len(group_sizes) != len(scores_per_group):
        raise ValueError("group_sizes must have one entry per group")
    out = []
    for i, scores in enumerate(scores_per_group):
        s = scores.to(torch.float64).flatten()
        norm = None if norms is None else norms[i]
        if norm is not None:
            z = (s - norm[0]) / norm[1] if norm[1] > 0 else torch.zeros_like(s)
        elif s.numel() < 2:
            z = torch.zeros_like(s)
        else:
            std = s.std()
            z = torch.zeros_like(s) if std == 0 else (s - s.mean()) / std
        g = 1 if group_sizes is None else group_sizes[i]
        out.append(_per_unit(z, g, reduce="mean"))
    return out


def group_drift(scores: torch.Tensor, columns: torch.Tensor, anchor_columns: torch.Tensor,
                anchor_scores: torch.Tensor) -> float:
    """How far a group's scores moved since an earlier model, as one factor: the median over
    columns present in both of current / earlier score (1.0 when none is comparable).

    Pruning upstream rescales a whole group's activations; dividing by this factor takes that
    group-wide shift out and keeps the within-group changes."""
    if not columns.numel() or not anchor_columns.numel():
        return 1.0
    earlier = torch.full((int(max(columns.max(), anchor_columns.max())) + 1,), float("nan"), dtype=torch.float64)
    earlier[anchor_columns] = anchor_scores.to(torch.float64)
    ref, now = earlier[columns], scores.to(torch.float64)
    ok = (ref > 0) & (now > 0)  # NaN (absent earlier) compares False
    ratios = now[ok] / ref[ok]
    return float(ratios.median()) if ratios.numel() else 1.0


def flap_bias_compensation(
    w_out: torch.Tensor, stats: ActivationStats, *, keep_columns: torch.Tensor
) -> torch.Tensor:
    """Output bias ``W[:, removed] @ mean(a)[removed]`` that preserves removed channels' mean.

    FLAP's ``compress(..., bias=True)``: after slicing the columns away, adding this bias to the
    output projection makes the pruned layer exact on the mean calibration input. Float32
    ``[out_features]``; callers cast to the weight dtype.
    """
    _check_weight(w_out, stats)
    keep = keep_columns.to(device=w_out.device, dtype=torch.bool).flatten()
    if keep.numel() != w_out.shape[1]:
        raise ValueError(f"keep_columns has {keep.numel()} entries, w_out {w_out.shape[1]} columns")
    return bias_compensation(w_out, stats.mean, keep_columns=keep)


def bias_compensation(w_out: torch.Tensor, mean: torch.Tensor, *, keep_columns: torch.Tensor) -> torch.Tensor:
    """``W[:, removed] @ mean[removed]`` (float32 ``[out_features]``) from the input means alone."""
    keep = keep_columns.to(device=w_out.device, dtype=torch.bool).flatten()
    if keep.numel() != w_out.shape[1] or mean.numel() != w_out.shape[1]:
        raise ValueError(f"keep_columns ({keep.numel()}) / mean ({mean.numel()}) do not match w_out's "
                         f"{w_out.shape[1]} columns")
    removed = ~keep
    return (w_out[:, removed].to(torch.float64) @ mean.to(w_out.device, torch.float64)[removed]).to(torch.float32)
