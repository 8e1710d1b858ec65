"""Self-sampled calibration text: the cached decoder equals transformers' logits; seeded."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from bonsai_lite.calib.self_text import Decoder, sample_text_ids
from bonsai_lite.io.model import StreamedModel

pytestmark = pytest.mark.integration


class _Tok:
    bos_token_id, eos_token_id = 1, 2


@pytest.mark.parametrize("resident", [True, False])
@pytest.mark.parametrize("case", ["llama-gqa-tied", "qwen2-gqa-bias"])
def test_cached_decoder_matches_transformers(tiny_models, tiny_tokens, case, resident):
    ids = tiny_tokens[:2, :12]
    ref = AutoModelForCausalLM.from_pretrained(tiny_models[case], dtype=torch.float32)(ids).logits
    dec = Decoder(StreamedModel.open(tiny_models[case]), max_len=12, samples=2, resident=resident)
    assert dec.resident is resident
    first = dec.step(ids[:, :5])  # a prefill of several tokens, then one token at a time
    assert torch.allclose(first, ref[:, 4], atol=1e-4)
    for t in range(5, 12):
        assert torch.allclose(dec.step(ids[:, t : t + 1]), ref[:, t], atol=1e-4)


def test_sampling_is_seeded(tiny_models):
    a = sample_text_ids(tiny_models["llama-gqa-tied"], tokenizer=_Tok(), samples=2, seq_len=16, seed=3)
    b = sample_text_ids(tiny_models["llama-gqa-tied"], tokenizer=_Tok(), samples=2, seq_len=16, seed=3)
    c = sample_text_ids(tiny_models["llama-gqa-tied"], tokenizer=_Tok(), samples=2, seq_len=16, seed=4)
    assert a.shape == (32,) and torch.equal(a, b) and not torch.equal(a, c)
