"""Engine taps that accumulate activation statistics of o_proj / down_proj inputs (for priors)."""
from __future__ import annotations

import torch

from bonsai_lite.search.priors import ActivationStats


class StatsTap:
    """Per (layer, kind) ActivationStats over all rows; optionally per-mask squared sums too.

    Per-mask sums serve `bonsai-noregress` (paper appendix B): the prior is computed inside each
    perturbed sub-model and averaged over the sub-models in which the unit is present.
    """

    def __init__(self, n_layers: int, *, n_samples: int, n_masks: int = 0, residual: dict[str, int] | None = None):
        """``residual`` ({kind: group size}): also accumulate the inputs' second moments and, once a
        (layer, kind) has seen all ``n_samples`` windows, reduce them to the per-unit residual
        covariances (`ActivationStats.reduce_gram`), so one layer's width^2 floats are held at a time."""
        self.stats: dict[tuple[int, str], ActivationStats] = {}
        self.residual = residual
        self.per_mask_sq: dict[tuple[int, str], torch.Tensor] = {}
        self.per_mask_count: dict[tuple[int, str], torch.Tensor] = {}
        self.n_samples, self.n_masks = n_samples, n_masks

    def __call__(self, layer: int, kind: str, x: torch.Tensor, rows: slice) -> None:
        key = (layer, kind)
        if key not in self.stats:
            self.stats[key] = ActivationStats.empty(x.shape[-1], gram=self.residual is not None)
        stats = self.stats[key]
        if self.residual is not None and stats.gram is None:
            raise RuntimeError(f"rows of layer {layer} {kind} arrived after its second moments were reduced")
        stats.update(x)
        if self.residual is not None and not self.n_masks and stats.count == self.n_samples * x.shape[1]:
            stats.reduce_gram(group_size=self.residual[kind])
        if self.n_masks:
            if key not in self.per_mask_sq:
                self.per_mask_sq[key] = torch.zeros(self.n_masks, x.shape[-1], dtype=torch.float64)
                self.per_mask_count[key] = torch.zeros(self.n_masks, dtype=torch.float64)
            mask_of_row = torch.arange(rows.start, rows.stop) // self.n_samples
            sq = x.to(torch.float64).square().sum(1).cpu()  # [rows, width]
            self.per_mask_sq[key].index_add_(0, mask_of_row, sq)
            self.per_mask_count[key].index_add_(0, mask_of_row, torch.full((len(mask_of_row),), float(x.shape[1]),
                                                                            dtype=torch.float64))
