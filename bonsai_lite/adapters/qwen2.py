"""Qwen2/Qwen2.5 (`Qwen2ForCausalLM`): Llama names plus q/k/v biases (picked up from the checkpoint)."""
from bonsai_lite.adapters.base import Adapter

QWEN2 = Adapter(
    name="qwen2",
    architectures=("Qwen2ForCausalLM",),
    sliding_window_key="sliding_window",
    sliding_window_flag="use_sliding_window",
    gguf_arch="qwen2",
    stock_biases=("q", "k", "v"),
)
