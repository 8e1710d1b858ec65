"""Llama-2/3 and SmolLM2 (`LlamaForCausalLM`)."""
from bonsai_lite.adapters.base import Adapter

LLAMA = Adapter(name="llama", architectures=("LlamaForCausalLM",),
                stock_bias_flags=(("attention_bias", ("q", "k", "v", "o")), ("mlp_bias", ("gate", "up", "down"))))
