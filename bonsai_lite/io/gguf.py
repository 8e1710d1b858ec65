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
    from transformers import AutoModelForCausalLM, GgufConfig

    gguf_path = Path(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
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
