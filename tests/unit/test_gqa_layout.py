"""The stock GQA layout test (`ops.equal_kv_groups`: the engine's attention, the loader, the uniform
export) against a brute-force reference over every small head -> key/value head map."""
from __future__ import annotations

import itertools

import pytest

from bonsai_lite.export.plan import check_uniform
from bonsai_lite.ops import equal_kv_groups
from bonsai_lite.structure import LayerStructure

pytestmark = pytest.mark.unit


def _stock(kv_map, n_kv):
    """Each key/value head serves one run of consecutive heads, all runs the same length."""
    runs = [len(list(g)) for _, g in itertools.groupby(kv_map)]
    return [k for k, _ in itertools.groupby(kv_map)] == list(range(n_kv)) and len(set(runs)) == 1


def test_equal_kv_groups_and_the_uniform_export_agree_with_the_reference():
    seen = set()
    for n_heads in range(1, 7):
        for n_kv in range(1, 4):
            for kv_map in itertools.product(range(n_kv), repeat=n_heads):
                if set(kv_map) != set(range(n_kv)):  # a layer keeps only key/value heads some head reads
                    continue
                expect = _stock(kv_map, n_kv)
                seen.add(expect)
                assert equal_kv_groups(list(kv_map), n_kv) == expect, kv_map
                layer = LayerStructure(heads=tuple(range(n_heads)), kv_of_head=kv_map, mlp=(0,))
                if expect:
                    check_uniform((layer, layer))
                else:
                    with pytest.raises(ValueError, match="stock GQA config"):
                        check_uniform((layer, layer))
    assert seen == {True, False}
