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


# ---- equal GQA groups ---------------------------------------------------------------------------------

def gqa_layers(n_layers, heads=12, kv=3):
    per = heads // kv
    return tuple(LayerStructure(heads=tuple(range(heads)), kv_of_head=tuple(h // per for h in range(heads)),
                                mlp=tuple(range(8))) for _ in range(n_layers))


@pytest.mark.parametrize("seed", range(8))
def test_equal_groups_drop_keeps_groups_equal_and_the_best_heads(seed):
    from bonsai_lite.prune.align import equal_groups_drop
    from bonsai_lite.export.gguf import layer_layout

    g = torch.Generator().manual_seed(seed)
    layers = gqa_layers(5)
    layout = UnitLayout.of(layers)
    scores = torch.rand(layout.total, generator=g, dtype=torch.float64)
    scores[torch.rand(layout.total, generator=g) < 0.2] = math.inf  # fixed units
    tiebreak = torch.rand(layout.total, generator=g, dtype=torch.float64)
    drop = (torch.rand(layout.total, generator=g) < 0.4) & torch.isfinite(scores)
    out = equal_groups_drop(scores, drop, layout, layers, tiebreak)
    assert torch.equal(out[torch.cat([torch.arange(m.start, m.stop) for m in layout.mlp])],
                       drop[torch.cat([torch.arange(m.start, m.stop) for m in layout.mlp])])  # MLP untouched
    new = tuple(s.keep(heads=~out[h], mlp=~out[m]) for s, h, m in zip(layers, layout.heads, layout.mlp))
    for s, n, h in zip(layers, new, layout.heads):
        sizes = [n.kv_of_head.count(k) for k in n.kv]
        assert len(set(sizes)) <= 1  # equal groups
        if n.kv_of_head:  # the GGUF writes one K/V head per kept group: nothing repeated
            assert layer_layout(n.kv_map.tolist(), 8, first=False, o_bias=False, down_bias=False).kv_heads == len(n.kv)
        kept_before, kept_after = int((~drop[h]).sum()), len(n.heads)
        assert abs(kept_after - kept_before) <= len(s.kv) / 2  # the nearest multiple of the group count
        for k in s.kv:  # within a group, every kept head ranks above every dropped one (fixed ones go last)
            members = [h.start + i for i, kk in enumerate(s.kv_of_head) if kk == k]
            kept = [u for u in members if not out[u]]
            gone = [u for u in members if out[u]]
            if kept and gone:
                assert min((scores[u].item(), tiebreak[u].item()) for u in kept) >= \
                    max((scores[u].item(), tiebreak[u].item()) for u in gone)
    assert torch.equal(equal_groups_drop(scores, out, layout, layers, tiebreak), out)  # idempotent


def test_equal_groups_drop_leaves_an_equal_selection_alone():
    from bonsai_lite.prune.align import equal_groups_drop

    layers = gqa_layers(2)
    layout = UnitLayout.of(layers)
    scores = torch.arange(layout.total, dtype=torch.float64)
    drop = torch.zeros(layout.total, dtype=torch.bool)
    for h in layout.heads:  # the lowest-scoring head of each group of 4
        drop[h.start + torch.tensor([0, 4, 8])] = True
    assert torch.equal(equal_groups_drop(scores, drop, layout, layers), drop)
