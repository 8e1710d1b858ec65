"""The engine computes the model transformers computes (issue 11, item 9): Qwen2's per-layer sliding
windows (`layer_types` from `max_window_layers`) and dynamic (NTK) rope scaling past
`max_position_embeddings`. Reference: whole-model transformers on the same tokens."""
from __future__ import annotations

import json

import pytest
import torch

from bonsai_lite.io.model import StreamedModel
from bonsai_lite.search.engine import evaluate
from conftest import make_tiny_model
from test_engine import PLANS, hf_nll

pytestmark = pytest.mark.integration
torch.set_num_threads(1)


def edit_config(model, **changes):
    cfg = json.loads((model / "config.json").read_text())
    for k, v in changes.items():
        cfg.pop(k, None) if v is None else cfg.__setitem__(k, v)
    (model / "config.json").write_text(json.dumps(cfg))
    return model


def engine_nll(model, tokens, plan="layer-major-host"):
    return evaluate(StreamedModel.open(model), tokens, None, PLANS[plan]).row_nll[0].float()


@pytest.mark.parametrize("max_window_layers,layer_types", [
    (1, None),  # transformers derives [full, sliding, sliding]
    (2, None),
    (0, None),  # every layer windowed
    (3, ["sliding_attention", "full_attention", "sliding_attention"]),  # explicit layer_types win
], ids=["max_window_layers 1", "max_window_layers 2", "max_window_layers 0", "explicit layer_types"])
def test_qwen2_sliding_window_layers_match_transformers(tmp_path, tiny_tokens, max_window_layers, layer_types):
    """Item 9: Qwen2 use_sliding_window with max_window_layers below the layer count: the engine windowed
    every layer; now the layers transformers windows, equal to its NLL within 1e-4."""
    m = edit_config(make_tiny_model(tmp_path / "q", "qwen2-gqa-bias"), use_sliding_window=True, sliding_window=8,
                    max_window_layers=max_window_layers, layer_types=layer_types)
    ref = hf_nll(m, tiny_tokens)
    windowed_everywhere = edit_config(make_tiny_model(tmp_path / "all", "qwen2-gqa-bias"), use_sliding_window=True,
                                      sliding_window=8, max_window_layers=0, layer_types=None)
    if max_window_layers:  # the test can tell the two models apart
        assert not torch.allclose(ref, hf_nll(windowed_everywhere, tiny_tokens), atol=1e-3)
    for plan in ("layer-major-host", "resident"):
        assert torch.allclose(engine_nll(m, tiny_tokens, plan), ref, atol=1e-4, rtol=0), plan


@pytest.mark.parametrize("seq_len", [12, 40], ids=["12 tokens", "40 tokens"])
def test_dynamic_rope_scaling_matches_transformers(tmp_path, tiny_tokens, seq_len):
    """Item 9: dynamic rope scaling: past max_position_embeddings (16) transformers rescales the
    frequencies for the sequence length; the engine now does too (NLL within 1e-4)."""
    m = edit_config(make_tiny_model(tmp_path / "d", "llama-gqa-tied"), max_position_embeddings=16,
                    rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    tokens = tiny_tokens[:, :seq_len]
    ref = hf_nll(m, tokens)
    assert torch.allclose(engine_nll(m, tokens), ref, atol=1e-4, rtol=0), (engine_nll(m, tokens), ref)
