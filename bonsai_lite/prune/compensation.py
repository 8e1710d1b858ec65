"""FLAP's bias compensation across a run: the calibration means of the output projections' input
columns, the biases that take a removed unit's mean contribution (carried across iterations), the
fills that stand in for masked units during the search, and their transport to other ranks."""
from __future__ import annotations

import torch

from bonsai_lite.prune import scores as S
from bonsai_lite.search.priors import bias_compensation


def compensated_biases(model, layout, drop: torch.Tensor, means: dict) -> dict:
    """Current output bias + W[:, removed] @ mean[removed], for every layer that loses units."""
    out = {}
    hd = model.spec.head_dim
    for l, (h, m) in enumerate(zip(layout.heads, layout.mlp)):
        if not (drop[h].any() or drop[m].any()):
            continue
        o, d = S.output_projections(model, l)
        names = model.spec.adapter.block_tensor_names(l)
        for key, w, keep in (("o_b", o, (~drop[h]).repeat_interleave(hd)), ("down_b", d, ~drop[m])):
            kind = "heads" if key == "o_b" else "mlp"
            if keep.all() or (l, kind) not in means:
                continue
            name = names[key]
            comp = bias_compensation(w, means[(l, kind)], keep_columns=keep)
            out[name] = _current_bias(model, name, comp.numel()) + comp
    return out


def _current_bias(model, name: str, width: int) -> torch.Tensor:
    if name in model.biases:
        return model.biases[name].float()
    if name in model.ckpt.infos:
        return model.ckpt.read(name).float()
    return torch.zeros(width, dtype=torch.float32)


def model_tensors(model) -> dict:
    """A model's compensation biases and masked-unit fills as named tensors (sent to other ranks)."""
    out = {f"bias:{name}": t for name, t in model.biases.items()}
    for l, fill in model.fills.items():
        for kind, t in zip(("heads", "mlp"), fill):
            if t is not None:
                out[f"fill:{l}:{kind}"] = t
    return out


def with_model_tensors(model, tensors: dict):
    """Inverse of `model_tensors` on a model with the same layers."""
    biases = {k.split(":", 1)[1]: t for k, t in tensors.items() if k.startswith("bias:")}
    model = model.with_biases(biases)
    if any(k.startswith("fill:") for k in tensors):
        model = model.with_fills({l: (tensors.get(f"fill:{l}:heads"), tensors.get(f"fill:{l}:mlp"))
                                  for l in range(len(model.layers))})
    return model


def column_means(tap) -> dict:
    """Calibration means of every o_proj / down_proj input column, keyed (layer, kind)."""
    return {key: st.mean.to(torch.float32) for key, st in tap.stats.items() if st.count}


def fills(means: dict, layers, head_dim: int) -> dict:
    """Per layer (head_fill, mlp_fill) for the BlockLoader from the (layer, kind) means."""
    return {l: (means.get((l, "heads")), means.get((l, "mlp"))) for l in range(len(layers))}
