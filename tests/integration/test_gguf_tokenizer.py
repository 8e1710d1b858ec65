"""The tokenizer a GGUF export carries when it is converted from tokenizer.json (models that do
not descend from a GGUF): llama.cpp must split text into exactly the tokens the Hugging Face
tokenizer gives. Small byte-level BPE tokenizers are trained here with the pre-tokenizers of GPT-2,
Llama 3 and Qwen2, written by the exporter's own tokenizer code into a vocab-only GGUF, and
compared token for token. Needs llama-cpp-python; skipped without it."""
from __future__ import annotations

import json
import random

import pytest

llama_cpp = pytest.importorskip("llama_cpp")
tokenizers = pytest.importorskip("tokenizers")

from bonsai_lite.export.gguf import _add_tokenizer  # noqa: E402
from bonsai_lite.io.gguf import LLAMA3_SPLIT, QWEN2_SPLIT, hf_bpe_tokenizer  # noqa: E402

pytestmark = pytest.mark.integration
WORDS = ("the of and to in a was is for as on with by he that at from his it an were are which this be has "
         "had also or not but first one their its after new been who they have she two her all other time "
         "during into more only over most film season game album song team war city state school").split()


def _text(seed: int, n: int) -> str:
    """WikiText-like lines: headings, numbers, contractions, punctuation, odd spacing, non-ASCII."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 16))]
        if i % 7 == 0:
            lines.append(f" = {words[0].title()} {words[1]} = ")
            continue
        words.insert(rng.randrange(len(words)), rng.choice(["1,234", "2006", "3.14", "12345", "don't", "It's",
                                                            "(born", "@-@", "he'll", "ünïcödé", "日本語"]))
        lines.append(" " + " ".join(words) + rng.choice([" .", " ,", "  ", ".\t", " ;"]))
    return "\n".join(lines) + "\n\n  trailing  spaces \r\n"


def _train(pre_tokenizer, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([_text(0, 3000)], trainers.BpeTrainer(
        vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|end|>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    return tok


def _vocab_only_gguf(model_dir, n_vocab: int, path):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in (("context_length", 64), ("embedding_length", 8), ("block_count", 1), ("feed_forward_length", 8),
                   ("head_count", 1), ("head_count_kv", 1), ("layer_norm_rms_eps", 1e-5), ("vocab_size", n_vocab)):
        getattr(w, f"add_{add}")(v)
    _add_tokenizer(w, ("hf", hf_bpe_tokenizer(model_dir, n_vocab)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


def _split(regex):
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


@pytest.mark.parametrize("kind", ["gpt2", "llama3", "qwen2"])
def test_llama_cpp_tokenises_like_the_hf_tokenizer(tmp_path, kind):
    from tokenizers import pre_tokenizers

    pre = {"gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
           "llama3": lambda: _split(LLAMA3_SPLIT), "qwen2": lambda: _split(QWEN2_SPLIT)}[kind]()
    hf = _train(pre, tmp_path)
    llm = _vocab_only_gguf(tmp_path, hf.get_vocab_size(), tmp_path / "vocab.gguf")
    text = _text(1, 400)  # other lines than the training text
    lines = [line for line in text.split("\n") if line]
    differ = [line for line in lines if hf.encode(line, add_special_tokens=False).ids !=
              llm.tokenize(line.encode(), add_bos=False, special=False)]
    assert not differ, f"{len(differ)} of {len(lines)} lines differ, e.g. {differ[0]!r}"
    assert hf.encode(text, add_special_tokens=False).ids == llm.tokenize(text.encode(), add_bos=False, special=False)
    assert llm.tokenize(b"<|end|>", add_bos=False, special=True) == [hf.token_to_id("<|end|>")]


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    from tokenizers import pre_tokenizers

    _train(pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(use_regex=False)]),
           tmp_path)
    with pytest.raises(ValueError, match="not one llama.cpp is known to reproduce.*--no-tokenizer"):
        hf_bpe_tokenizer(tmp_path, 700)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    data["normalizer"] = {"type": "Lowercase"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="Lowercase normaliser"):
        hf_bpe_tokenizer(tmp_path, 700)
