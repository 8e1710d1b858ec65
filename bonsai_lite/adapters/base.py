"""Architecture knowledge as data: weight-name templates and which tensors a prunable unit owns.

Generic code never branches on the model type; adding an architecture means adding one `Adapter`
value in a module of this package and registering it in `adapters/__init__.py`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Adapter:
    """Weight names of a pre-norm decoder with RMSNorm, rotary GQA attention and a gated MLP.

    Block-relative names get the `layer` prefix (formatted with the layer index) and `.weight` /
    `.bias` appended. Biases are optional: a bias is used when the checkpoint has it (Qwen2's
    q/k/v biases, Llama's `attention_bias`/`mlp_bias` flags).
    """

    name: str
    architectures: tuple[str, ...]
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    layer: str = "model.layers.{}."
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    # Mistral/Qwen2 may attend within a sliding window; the config key that holds its size.
    sliding_window_key: str | None = None
    # Qwen2 keeps `sliding_window` in its config but only applies it when this flag is true.
    sliding_window_flag: str | None = None
    # llama.cpp architecture of a uniform (stock-config) export, as its own converter names it.
    gguf_arch: str = "llama"
    # Projection biases a stock transformers config can express: roles whose modules always carry a
    # bias, and config flags that switch a bias on for several roles at once (roles a flag covers but
    # the model lacks are written as zeros). Read by the uniform export and the compensation check.
    stock_biases: tuple[str, ...] = ()
    stock_bias_flags: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def block_prefix(self, layer: int) -> str:
        return self.layer.format(layer)

    def projections(self) -> dict[str, str]:
        """Role -> block-relative module name, for every linear map of a block."""
        return {"q": self.q, "k": self.k, "v": self.v, "o": self.o,
                "gate": self.gate, "up": self.up, "down": self.down}

    def block_tensor_names(self, layer: int) -> dict[str, str]:
        """Role -> full tensor name of every weight and possible bias of one block."""
        prefix = self.block_prefix(layer)
        names = {"attn_norm": f"{prefix}{self.attn_norm}.weight", "mlp_norm": f"{prefix}{self.mlp_norm}.weight"}
        for role, module in self.projections().items():
            names[f"{role}_w"] = f"{prefix}{module}.weight"
            names[f"{role}_b"] = f"{prefix}{module}.bias"
        return names


# How each projection is cut when units are removed: the role's weight rows (output features) or
# columns (input features) and which unit kind indexes them. Shared by every architecture above.
SLICE_RULES: dict[str, tuple[str, str]] = {
    "q": ("rows", "heads"),
    "k": ("rows", "kv"),
    "v": ("rows", "kv"),
    "o": ("cols", "heads"),
    "gate": ("rows", "mlp"),
    "up": ("rows", "mlp"),
    "down": ("cols", "mlp"),
}
