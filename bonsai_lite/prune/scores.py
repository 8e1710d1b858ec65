"""Unit scores per method ("higher = keep"), from activation statistics and output projections."""
from __future__ import annotations

import torch

from bonsai_lite.search import priors as P
from bonsai_lite.structure import UnitLayout

PRIOR_METHODS = {"wanda", "activation", "flap"}


def output_projections(model, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """o_proj and down_proj of one layer, sliced to the current structure, float32 on the CPU."""
    from bonsai_lite.prune.slicing import slice_param

    a, s = model.spec.adapter, model.layers[layer]
    names = a.block_tensor_names(layer)
    o = slice_param(model.ckpt.read(names["o_w"]), "o", is_bias=False, layer=s, head_dim=model.spec.head_dim)
    d = slice_param(model.ckpt.read(names["down_w"]), "down", is_bias=False, layer=s, head_dim=model.spec.head_dim)
    return o.float(), d.float()


class ColumnNorms:
    """Squared input-column norms of every layer's o_proj and down_proj in the checkpoint, each read
    once. Pruning removes columns and never changes the kept weights (compensation goes into the
    biases), so a pruned model's norms are the checkpoint's at its kept columns, and FLAP's prior
    reads no weights after the first iteration (a 7-8B model's o/down are 4.8 GB in bf16)."""

    def __init__(self):
        self._full: dict[tuple[int, str], torch.Tensor] = {}
        self._blocks: dict[int, torch.Tensor] = {}

    @property
    def loaded(self) -> bool:
        return bool(self._full)

    def observe(self, layer: int, w) -> None:
        """Take one layer's norms from its block weights `w` (`ops.BlockWeights`) as a dense pass
        loaded them, for `engine.evaluate(on_weights=...)`, where `whole_projections` holds: the
        checkpoint is then not read a second time for them (4.8 of an 8B model's 15 GB in bf16)."""
        self._full[(layer, "heads")] = P.column_sq_norms(w.o_w).cpu()
        self._full[(layer, "mlp")] = P.column_sq_norms(w.down_w).cpu()

    def __call__(self, model, layer: int, kind: str) -> torch.Tensor:
        from bonsai_lite.prune.slicing import kept_index

        if (layer, kind) not in self._full:
            names = model.spec.adapter.block_tensor_names(layer)
            w = model.ckpt.read(names["o_w" if kind == "heads" else "down_w"])
            self._full[(layer, kind)] = P.column_sq_norms(w)
        return self._full[(layer, kind)][kept_index(model.layers[layer], kind, model.spec.head_dim)]

    def blocks(self, model, layer: int, kind: str) -> torch.Tensor:
        """``W_G^T W_G`` of every kept unit G, ``[units, g, g]`` (`priors.column_gram_blocks`); for MLP
        units the squared column norms. Read with the norms, once per run."""
        if kind == "mlp":
            return self(model, layer, kind)[:, None, None]
        if layer not in self._blocks:
            names = model.spec.adapter.block_tensor_names(layer)
            w = model.ckpt.read(names["o_w"])
            self._blocks[layer] = P.column_gram_blocks(w, group_size=model.spec.head_dim)
            self._full.setdefault((layer, kind), P.column_sq_norms(w))
        return self._blocks[layer][torch.tensor(model.layers[layer].heads, dtype=torch.long)]


def whole_projections(model, dtype: torch.dtype) -> bool:
    """Whether a pass over `model` in `dtype` loads every layer's o_proj and down_proj with the
    values the checkpoint stores: every column kept, in order, and cast exactly (`exact_cast`)."""
    from bonsai_lite.search.pass_costs import exact_cast

    hd = model.spec.head_dim
    for l, layer in enumerate(model.layers):
        names = model.spec.adapter.block_tensor_names(l)
        o, d = model.ckpt.info(names["o_w"]), model.ckpt.info(names["down_w"])
        if layer.heads != tuple(range(o.shape[1] // hd)) or layer.mlp != tuple(range(d.shape[1])):
            return False
        if not (exact_cast(o.dtype, dtype) and exact_cast(d.dtype, dtype)):
            return False
    return True


def prior_scores(model, stats: dict, layout: UnitLayout, *, kind: str,
                 columns_of: ColumnNorms | None = None, fluctuation: str = "variance") -> torch.Tensor:
    """Module-level Wanda (appendix F.2), activation magnitude (F.1), weight magnitude, or FLAP's
    standardised fluctuation (already on one scale across groups, see `comparable_prior`)."""
    if kind in ("flap", "flap-parent", "flap-anchored"):
        return flap_unit_scores(model, stats, layout, columns_of=columns_of, fluctuation=fluctuation)[0]
    out = torch.zeros(layout.total, dtype=torch.float64)
    hd = model.spec.head_dim
    for l, (h, m) in enumerate(zip(layout.heads, layout.mlp)):
        o, d = output_projections(model, l) if kind in ("wanda", "magnitude") else (None, None)
        for sl, k, w, g in ((h, "heads", o, hd), (m, "mlp", d, 1)):
            if sl.stop == sl.start:
                continue
            if kind == "wanda":
                out[sl] = P.wanda_scores(w, stats[(l, k)], group_size=g).double()
            elif kind == "activation":
                out[sl] = P.activation_magnitude_scores(stats[(l, k)], group_size=g).double()
            elif kind == "magnitude":
                out[sl] = P.magnitude_scores(w, group_size=g).double()
            else:
                raise ValueError(kind)
    return out


def flap_unit_scores(model, stats: dict, layout: UnitLayout, *, norms: dict | None = None,
                     anchor: dict | None = None, columns_of: ColumnNorms | None = None,
                     fluctuation: str = "variance") -> tuple[torch.Tensor, dict, dict]:
    """FLAP: fluctuation x squared column norm, standardised per (layer, kind); each group's
    (mean, std) of column scores, keyed (layer, kind); and each group's column scores keyed by
    checkpoint column, ``{key: (columns, scores)}``. With ``norms`` (such a dict, e.g. the
    parent's) groups are standardised with those instead of their own current mean and std. With
    ``anchor`` (such column scores, e.g. the parent's) each group's scores are first divided by
    their drift from it, the median over surviving columns of current / anchored score.
    ``columns_of`` caches the projections' column norms across calls (one per run). ``fluctuation``
    "residual" replaces each unit's input variance by what is left of it after the best prediction
    from the other kept inputs (`priors.residual_covariances`; stats with second moments)."""
    hd = model.spec.head_dim
    columns_of = columns_of or ColumnNorms()
    scores, groups, sizes, slots, keys = torch.zeros(layout.total, dtype=torch.float64), [], [], [], []
    columns = {}
    for l, (h, m) in enumerate(zip(layout.heads, layout.mlp)):
        for sl, k, g in ((h, "heads", hd), (m, "mlp", 1)):
            if sl.stop == sl.start:
                continue
            # column-level fluctuation; flap_standardize averages head columns after z-scoring
            if fluctuation == "residual":
                col = P.residual_column_scores(columns_of.blocks(model, l, k),
                                               P.residual_covariances(stats[(l, k)], group_size=g))
            else:
                col = P.flap_column_scores(columns_of(model, l, k), stats[(l, k)], group_size=1).double()
            columns[(l, k)] = (checkpoint_columns(model.layers[l], k, hd), col)
            if anchor is not None and (l, k) in anchor:
                col = col / P.group_drift(col, columns[(l, k)][0], *anchor[(l, k)])
            groups.append(col)
            sizes.append(g)
            slots.append(sl)
            keys.append((l, k))
    own = {key: (float(c.double().mean()), float(c.double().std()) if c.numel() > 1 else 0.0)
           for key, c in zip(keys, groups)}
    use = [None if norms is None else norms.get(key) for key in keys]
    for sl, z in zip(slots, P.flap_standardize(groups, group_sizes=sizes, norms=use)):
        scores[sl] = z.double()
    return scores, own, columns


def checkpoint_columns(layer, kind: str, head_dim: int) -> torch.Tensor:
    """Checkpoint column indices of a layer's kept output-projection columns, in the current order."""
    if kind == "heads":
        return (torch.tensor(layer.heads, dtype=torch.long)[:, None] * head_dim + torch.arange(head_dim)).flatten()
    return torch.tensor(layer.mlp, dtype=torch.long)


def noregress_scores(model, tap, layout: UnitLayout, masks: torch.Tensor) -> torch.Tensor:
    """Paper appendix B: the Wanda prior computed inside each perturbed sub-model, averaged over
    the sub-models in which the unit is present."""
    hd = model.spec.head_dim
    out = torch.zeros(layout.total, dtype=torch.float64)
    for l, (h, m) in enumerate(zip(layout.heads, layout.mlp)):
        o, d = output_projections(model, l)
        for sl, k, w, g in ((h, "heads", o, hd), (m, "mlp", d, 1)):
            if sl.stop == sl.start or (l, k) not in tap.per_mask_sq:
                continue
            rms = (tap.per_mask_sq[(l, k)] / tap.per_mask_count[(l, k)][:, None].clamp_min(1)).sqrt()  # [K, cols]
            col = rms * w.abs().mean(0).double()[None, :]
            unit = col.reshape(col.shape[0], -1, g).mean(-1)  # [K, units]
            present = masks[:, sl].double()
            out[sl] = (unit * present).sum(0) / present.sum(0).clamp_min(1)
    return out
