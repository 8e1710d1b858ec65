"""Mistral (`MistralForCausalLM`): Llama names, GQA, optional sliding-window attention."""
from bonsai_lite.adapters.base import Adapter

MISTRAL = Adapter(name="mistral", architectures=("MistralForCausalLM",), sliding_window_key="sliding_window")
