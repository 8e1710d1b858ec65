"""Width alignment against a brute-force reference: per layer, the kept count is the nearest multiple
and the kept set is the best-scoring one among those that contain the units the selection kept/dropped."""
from __future__ import annotations

import math

import pytest
import torch

from bonsai_lite.prune.align import align_drop
from bonsai_lite.structure import LayerStructure, UnitLayout

pytestmark = pytest.mark.unit


def layout_of(widths):
    layers = tuple(LayerStructure(heads=(0, 1), kv_of_head=(0, 0), mlp=tuple(range(w))) for w in widths)
    return UnitLayout.of(layers)


def reference(scores, drop, m: slice, multiple: int) -> set[int]:
    """Kept units of one layer: rank all units by (kept-by-selection first, then score), keep the top `want`."""
    units = list(range(m.start, m.stop))
    kept = [u for u in units if not drop[u]]
    fixed = [u for u in units if math.isinf(scores[u].item())]
    want = round(len(kept) / multiple) * multiple
    if want < len(fixed):
        want += multiple
    want = min(want, len(units))
    if want >= len(kept):
        extra = sorted((u for u in units if drop[u]), key=lambda u: -scores[u].item())[: want - len(kept)]
        return set(kept) | set(extra)
    keep = sorted((u for u in kept if u not in fixed), key=lambda u: -scores[u].item())[: want - len(fixed)]
    return set(fixed) | set(keep)


@pytest.mark.parametrize("multiple", [1, 4, 8, 32])
@pytest.mark.parametrize("seed", range(6))
def test_align_matches_reference(seed, multiple):
    g = torch.Generator().manual_seed(seed)
    widths = [int(w) for w in torch.randint(5, 80, (4,), generator=g)]
    layout = layout_of(widths)
    scores = torch.randn(layout.total, generator=g, dtype=torch.float64)
    scores[torch.rand(layout.total, generator=g) < 0.1] = math.inf
    drop = (torch.rand(layout.total, generator=g) < torch.rand(1, generator=g)) & torch.isfinite(scores)
    out = align_drop(scores, drop, layout, multiple)
    for h in layout.heads:
        assert torch.equal(out[h], drop[h])
    for m in layout.mlp:
        kept = {u for u in range(m.start, m.stop) if not out[u]}
        assert kept == reference(scores, drop, m, multiple)
        n = m.stop - m.start
        assert len(kept) % multiple == 0 or len(kept) == n
        assert not any(out[u] and math.isinf(scores[u].item()) for u in range(m.start, m.stop))


def test_auto_multiple_only_for_wide_mlps():
    from bonsai_lite.prune.align import auto_multiple_of

    assert auto_multiple_of(96) == 1  # tiny test models: rounding would move widths by a third
    assert auto_multiple_of(1536) == 32  # SmolLM2-135M
    assert auto_multiple_of(14336) == 32  # Llama-3-8B
