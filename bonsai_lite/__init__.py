"""bonsai_lite: structured pruning of LLMs with forward passes only (Bonsai), layer-streamed."""
__version__ = "0.1.0"
