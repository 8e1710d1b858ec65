"""GGUF files: reading (the demo model ships as one) and, beside it, what writing needs.

Reading goes through transformers' GGUF loader (dequantised to a dense model) and the `gguf`
package's reader; nothing here interprets the format by hand.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def load_gguf_model(gguf_path: str | os.PathLike) -> torch.nn.Module:
    """The GGUF's model, dequantised to a dense float32 transformers model (reference for tests)."""
    import transformers
    from transformers import AutoModelForCausalLM

    gguf_path = Path(gguf_path)
    kwargs = {}
    if hasattr(transformers, "GgufConfig"):  # 5.17+ asks for dequantisation; earlier versions always dequantise
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, **kwargs
    )
    return model.eval()


def load_gguf_tokenizer(gguf_path: str | os.PathLike):
    """The tokenizer embedded in the GGUF, as a transformers fast tokenizer."""
    from transformers import AutoTokenizer

    gguf_path = Path(gguf_path)
    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def gguf_has_output_weight(gguf_path: str | os.PathLike) -> bool:
    """Whether the GGUF stores its own output projection; without one, llama.cpp ties it to the embedding."""
    import gguf

    output_name = f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT]}.weight"
    reader = gguf.GGUFReader(gguf_path)
    return any(t.name == output_name for t in reader.tensors)


# --- writing --------------------------------------------------------------------------------------
# GGUF tensor names by slicing role (export/plan.py's roles), shared by every architecture llama.cpp
# builds from Llama-style blocks (llama, deci, qwen2). Keys of `gguf.MODEL_TENSOR`.
BLOCK_TENSORS = {"q": "ATTN_Q", "k": "ATTN_K", "v": "ATTN_V", "o": "ATTN_OUT", "gate": "FFN_GATE", "up": "FFN_UP",
                 "down": "FFN_DOWN", "attn_norm": "ATTN_NORM", "mlp_norm": "FFN_NORM"}
GLOBAL_TENSORS = {"embed": "TOKEN_EMBD", "final_norm": "OUTPUT_NORM", "lm_head": "OUTPUT"}
# Output element types; 1-D tensors (norms, biases) stay float32 as llama.cpp's own converter writes them.
FILE_TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16")}


def tensor_name(role: str, layer: int | None, *, bias: bool = False) -> str:
    import gguf

    key = BLOCK_TENSORS[role] if layer is not None else GLOBAL_TENSORS[role]
    base = gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, key)]
    return (base.format(bid=layer) if layer is not None else base) + (".bias" if bias else ".weight")


def gguf_tokenizer_fields(path: str | os.PathLike) -> list[tuple[str, object, object, object]]:
    """(key, value, type, element type) of every `tokenizer.*` field of a GGUF, to copy into another."""
    import gguf

    reader = gguf.GGUFReader(path)
    out = []
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        out.append((key, f.contents(), vtype, sub))
    return out


# The pre-tokenizer splits text before BPE merges; llama.cpp names its own implementations
# (`tokenizer.ggml.pre`) and tokenises differently under any other name: with "default" a GPT-2
# tokenizer split " =" into " ", "=" on 413 of 415 WikiText lines. Known splits, as tokenizer.json
# writes them: GPT-2's ByteLevel regex, and a Split regex before ByteLevel for Llama 3 and Qwen2.
# Each pairing is checked token for token against llama.cpp in tests/integration/test_gguf_tokenizer.py.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_PRE = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


def llama_cpp_pre(tokenizer: dict) -> str:
    """llama.cpp's `tokenizer.ggml.pre` name for a tokenizer.json's pre-tokenizer and normaliser.

    Raises ValueError for one llama.cpp is not known to reproduce (its tokens would differ)."""
    pre, norm = tokenizer.get("pre_tokenizer") or {}, tokenizer.get("normalizer")
    if norm is not None and norm.get("type") != "NFC":
        raise ValueError(f"tokenizer.json has a {norm.get('type')} normaliser, which llama.cpp does not apply")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    steps = pre.get("pretokenizers") or []
    if pre.get("type") == "Sequence" and len(steps) == 2 and steps[0].get("type") == "Split" \
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True) \
            and str(steps[0].get("behavior")).lower() == "isolated" and not steps[0].get("invert") \
            and (steps[0].get("pattern") or {}).get("Regex") in SPLIT_PRE:
        return SPLIT_PRE[steps[0]["pattern"]["Regex"]]
    raise ValueError(f"tokenizer.json's pre-tokenizer ({json.dumps(pre)[:120]}) is not one llama.cpp is known to "
                     "reproduce (GPT-2, Llama 3, Qwen2)")


def hf_bpe_tokenizer(model_dir: str | os.PathLike, vocab_size: int) -> dict:
    """A byte-level BPE tokenizer (tokenizer.json) as GGUF tokenizer metadata, with llama.cpp's
    name for its pre-tokenizer (`pre`).

    Raises ValueError for any other tokenizer kind: llama.cpp would tokenise it differently.
    """
    import gguf
    from gguf.vocab import BpeVocab, SpecialVocab

    model_dir = Path(model_dir)
    hint = "; pass tokenizer=False (--no-tokenizer) to write a GGUF with token ids only"
    tj = model_dir / "tokenizer.json"
    data = json.loads(tj.read_text(encoding="utf-8")) if tj.is_file() else {}
    kind = (data.get("model") or {}).get("type", "BPE")
    if kind != "BPE":
        raise ValueError(f"{model_dir}: tokenizer.json is a {kind} tokenizer, not a byte-level BPE one (the kind "
                         f"this converter gives llama.cpp){hint}")
    try:
        pre = llama_cpp_pre(data) if data else "gpt-2"
    except ValueError as e:
        raise ValueError(f"{model_dir}: {e}{hint}") from None
    try:
        vocab = BpeVocab(model_dir)
    except FileNotFoundError as e:
        raise ValueError(f"{model_dir}: no GPT-2-style byte-level BPE tokenizer (tokenizer.json) to convert for "
                         f"llama.cpp{hint}") from e
    special = {t["content"] for t in data.get("added_tokens", []) if t.get("special")}
    tokens, types = [], []
    for text, _score, kind in vocab.all_tokens():
        s = text.decode("utf-8") if isinstance(text, bytes) else text
        tokens.append(s)
        types.append(gguf.TokenType.CONTROL if s in special else kind)
    if len(tokens) > vocab_size:
        raise ValueError(f"{model_dir}: tokenizer has {len(tokens)} tokens, the model only {vocab_size} embeddings")
    for i in range(len(tokens), vocab_size):  # embedding rows beyond the tokenizer (padding to a multiple)
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    return {"tokens": tokens, "types": [int(t) for t in types], "pre": pre,
            "special": SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)}
