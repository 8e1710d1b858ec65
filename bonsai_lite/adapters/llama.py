"""Llama-2/3 and SmolLM2 (`LlamaForCausalLM`)."""
from bonsai_lite.adapters.base import Adapter

LLAMA = Adapter(name="llama", architectures=("LlamaForCausalLM",))
