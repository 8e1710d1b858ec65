"""FLAP's prior from column norms read once per run (scores.ColumnNorms) against the reference that
slices the projections of the pruned model and scores them (priors.flap_scores)."""
from __future__ import annotations

import pytest
import torch

from bonsai_lite.io.model import StreamedModel
from bonsai_lite.prune import scores as S
from bonsai_lite.search import priors as P
from bonsai_lite.structure import UnitLayout

pytestmark = pytest.mark.integration


def _pruned(layers, g):
    out = []
    for s in layers:
        keep_h = torch.rand(len(s.heads), generator=g) < 0.7
        keep_h[0] = True
        keep_m = torch.rand(len(s.mlp), generator=g) < 0.6
        out.append(s.keep(heads=keep_h, mlp=keep_m))
    return tuple(out)


def _stats(model, layout, g):
    stats = {}
    for l, (h, m) in enumerate(zip(layout.heads, layout.mlp)):
        for k, width in (("heads", (h.stop - h.start) * model.spec.head_dim), ("mlp", m.stop - m.start)):
            stats[(l, k)] = P.ActivationStats.empty(width)
            stats[(l, k)].update(torch.randn(64, width, generator=g) * torch.rand(width, generator=g))
    return stats


def test_cached_column_norms_score_as_the_sliced_projections(tiny_models, monkeypatch):
    parent = StreamedModel.open(str(tiny_models["llama-gqa-tied"]))
    g = torch.Generator().manual_seed(0)
    cache = S.ColumnNorms()
    S.flap_unit_scores(parent, _stats(parent, UnitLayout.of(parent.layers), g), UnitLayout.of(parent.layers),
                       columns_of=cache)  # the first iteration: reads the projections
    model = parent.with_layers(_pruned(parent.layers, g))
    layout = UnitLayout.of(model.layers)
    stats = _stats(model, layout, g)

    reads = []
    real_read = type(model.ckpt).read
    monkeypatch.setattr(type(model.ckpt), "read", lambda self, name, *a, **k: reads.append(name) or
                        real_read(self, name, *a, **k))
    got, own, columns = S.flap_unit_scores(model, stats, layout, columns_of=cache)
    assert not reads  # a later iteration reads no weights
    monkeypatch.undo()

    for l, (h, m) in enumerate(zip(layout.heads, layout.mlp)):  # reference: slice, then score
        o, d = S.output_projections(model, l)
        for k, w in (("heads", o), ("mlp", d)):
            ref = P.flap_scores(w, stats[(l, k)], group_size=1).double()
            torch.testing.assert_close(columns[(l, k)][1], ref, rtol=1e-6, atol=0)
    ref_scores = S.flap_unit_scores(model, stats, layout, columns_of=S.ColumnNorms())[0]
    torch.testing.assert_close(got, ref_scores, rtol=0, atol=0)  # a cold cache gives the same scores
    assert got.std() > 0
