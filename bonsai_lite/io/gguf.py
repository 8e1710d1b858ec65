"""GGUF files: reading (the demo model ships as one) and, beside it, what writing needs.

Reading goes through transformers' GGUF loader (dequantised to a dense model) and the `gguf`
package's reader; nothing here interprets the format by hand.
"""
from __future__ import annotations

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


def hf_bpe_tokenizer(model_dir: str | os.PathLike, vocab_size: int) -> dict:
    """A GPT-2-style byte-level BPE tokenizer (tokenizer.json) as GGUF tokenizer metadata.

    Raises ValueError for any other tokenizer kind: llama.cpp would tokenise it differently.
    """
    import json

    import gguf
    from gguf.vocab import BpeVocab, SpecialVocab

    model_dir = Path(model_dir)
    try:
        vocab = BpeVocab(model_dir)
    except FileNotFoundError as e:
        raise ValueError(f"{model_dir}: no GPT-2-style byte-level BPE tokenizer (tokenizer.json) to convert for "
                         "llama.cpp; pass tokenizer=False to write a GGUF without one (token ids only)") from e
    special = set()
    tj = model_dir / "tokenizer.json"
    if tj.is_file():
        special = {t["content"] for t in json.loads(tj.read_text(encoding="utf-8")).get("added_tokens", [])
                   if t.get("special")}
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
    return {"tokens": tokens, "types": [int(t) for t in types],
            "special": SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)}
