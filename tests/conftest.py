"""Fixtures: tiny random Llama / Mistral / Qwen2 checkpoints saved as *sharded* safetensors."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "data"

TINY_SHAPES = dict(hidden_size=72, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
                   num_key_value_heads=2, vocab_size=211, max_position_embeddings=256)

CASES = {
    # name: (model_type, extra config)
    "llama-gqa-tied": ("llama", dict(tie_word_embeddings=True)),
    "llama-mha-untied": ("llama", dict(tie_word_embeddings=False, num_key_value_heads=6)),
    "mistral-gqa": ("mistral", dict(tie_word_embeddings=False, sliding_window=16)),
    "qwen2-gqa-bias": ("qwen2", dict(tie_word_embeddings=True, head_dim=16)),
}


def make_tiny_model(out: Path, case: str, *, seed: int = 0, dtype=torch.float32, shapes: dict | None = None,
                    shard: str = "40KB") -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra = CASES[case]
    cfg = AutoConfig.for_model(model_type, **{**TINY_SHAPES, **(shapes or {}), **extra})
    if model_type == "qwen2":
        cfg.use_sliding_window = False
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Random init is tiny; scale up so masked sub-models differ clearly in loss.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif p.dim() == 2:
                p.normal_(0, 0.2)
            else:
                p.normal_(0, 0.1)
    model.to(dtype).save_pretrained(out, max_shard_size=shard)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {case: make_tiny_model(root / case, case, seed=i) for i, case in enumerate(CASES)}


@pytest.fixture(scope="session")
def tiny_tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, TINY_SHAPES["vocab_size"], (3, 40), generator=g)


def prunable_model(parent: Path, root: Path) -> tuple[Path, Path]:
    """A copy of a tiny sharded model with a word-level tokenizer over its 211-token vocabulary, and a
    calibration text (real WikiText-2 validation text when ../shared is present)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    model = Path(shutil.copytree(parent, root / "model"))
    src = DATA / "wikitext2-valid.txt"
    text = src.read_text()[:20000] if src.is_file() else " ".join(f"w{i % 300}" for i in range(4000))
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(vocab_size=211, special_tokens=["[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(model)
    (root / "calib.txt").write_text(text)
    return model, root / "calib.txt"
