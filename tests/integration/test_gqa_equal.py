"""`--gqa equal` through the real loop: every iteration leaves every layer's GQA groups equal, so the
GGUF writer repeats no K/V head; without it the same search leaves unequal groups (the constraint
is what makes them equal, not the model)."""
from __future__ import annotations

import pytest
import torch

from bonsai_lite.config import CalibConfig, RunConfig, SearchConfig
from bonsai_lite.export.gguf import layer_layout
from bonsai_lite.prune.run import run_pruning

pytestmark = pytest.mark.integration


def _layers(model_dir, tmp_path, gqa, method):
    cfg = RunConfig(model=str(model_dir), out=str(tmp_path / f"{gqa}-{method}"),
                    calib=CalibConfig(text=None, samples=2, seq_len=16),
                    search=SearchConfig(method=method, sparsity=0.5, p_iter=0.25, masks_per_iter=8, seed=3, gqa=gqa),
                    device="cpu")
    ids = torch.randint(0, 211, (400,), generator=torch.Generator().manual_seed(0))
    return run_pruning(cfg, ids=ids, run_dir=tmp_path / f"{gqa}-{method}.run").layers


def _unequal(layers) -> int:
    return sum(len({s.kv_of_head.count(k) for k in s.kv}) > 1 for s in layers)


@pytest.mark.parametrize("method", ["bonsai", "wanda-sp"])
def test_equal_groups_through_the_loop(tiny_models, tmp_path, method):
    model = tiny_models["llama-gqa-tied"]
    free = _layers(model, tmp_path, "any", method)
    equal = _layers(model, tmp_path, "equal", method)
    assert _unequal(free) > 0
    assert _unequal(equal) == 0
    for s in equal:
        if s.kv_of_head:
            assert layer_layout(s.kv_map.tolist(), len(s.mlp), first=False, o_bias=False, down_bias=False).kv_heads \
                == len(s.kv)
    # the constraint moves heads, not the budget: both runs keep about the same number of heads
    heads = lambda layers: sum(len(s.heads) for s in layers)  # noqa: E731
    assert abs(heads(equal) - heads(free)) <= len(equal) * 2
