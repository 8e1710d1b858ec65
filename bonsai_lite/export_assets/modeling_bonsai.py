"""Per-layer-width Llama / Mistral / Qwen2, shipped inside checkpoints exported by bonsai-lite.

Structured pruning leaves every decoder layer with its own number of query heads, key/value heads
and MLP units, which stock transformers configs cannot describe. This file keeps everything stock
(embeddings, rotary, masks, cache, generation, the LM head) and only rebuilds the decoder layers
from `config.bonsai_per_layer`, one entry per layer, named like transformers' own per-layer
overrides (`per_layer_config`):

    {"num_attention_heads": 4, "num_key_value_heads": 2, "kv_map": [0, 0, 1, 1],
     "intermediate_size": 50, "biases": ["q_proj", "k_proj", "v_proj"]}

`kv_map[h]` is the key/value head read by query head `h`; after pruning, groups may be unequal, so
K/V are gathered per head (after the cache, which keeps only the kept K/V heads). Decoding one
token with SDPA does not copy the cache: each K/V head's queries, padded to the largest group, attend
to it as one short query sequence (what transformers' `pack_gqa` does for equal groups). A layer with no
heads or no MLP units skips that sub-block (adding its output bias, if it has one).

Load with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`. Imports only the
standard library, torch and transformers (a requirement of transformers' remote-code loader).
"""
import warnings

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward
from transformers.models.llama import modeling_llama as _llama
from transformers.models.mistral import modeling_mistral as _mistral
from transformers.models.qwen2 import modeling_qwen2 as _qwen2

# Must equal bonsai_lite.structure.PER_LAYER_KEY (this file cannot import bonsai_lite).
PER_LAYER_KEY = "bonsai_per_layer"


def _layer_window(config, layer_idx: int):
    """The sliding window of one layer (Qwen2: per layer type; Mistral: global; Llama: none)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return getattr(config, "sliding_window", None) if layer_types[layer_idx] == "sliding_attention" else None
    return getattr(config, "sliding_window", None)


# The stock model hands each layer its KV cache as `past_key_values` (transformers < 5.24) or as
# `cache` (>= 5.24, the old name deprecated). Layers here take it under either name, so this file
# reads no version number and needs no change when the old name is finally removed.
_CACHE_KWARGS = ("cache", "past_key_values")


def _pop_cache(kwargs: dict):
    """Remove every cache keyword from `kwargs`; return the cache (None when there is none)."""
    found = [kwargs.pop(name) for name in _CACHE_KWARGS if name in kwargs]
    found = [c for c in found if c is not None]  # never `or`: an empty cache has len() == 0
    return found[0] if found else None


def _attention_function(implementation):
    get = getattr(ALL_ATTENTION_FUNCTIONS, "get_interface", None)  # absent in early 5.x: index the mapping
    if get is not None:
        return get(implementation, eager_attention_forward)
    return eager_attention_forward if implementation in (None, "eager") else ALL_ATTENTION_FUNCTIONS[implementation]


class _BonsaiAttention:
    """Mixed into a subclass of the stock attention class (so output recorders still find it)."""

    def __init__(self, config, layer_idx: int, widths: dict):
        nn.Module.__init__(self)
        self.config, self.layer_idx = config, layer_idx
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_heads = int(widths["num_attention_heads"])
        self.num_kv_heads = int(widths["num_key_value_heads"])
        kv_map = [int(k) for k in widths["kv_map"]]
        if len(kv_map) != self.num_heads or (kv_map and max(kv_map) >= self.num_kv_heads):
            raise ValueError(f"layer {layer_idx}: kv_map {kv_map} does not fit {self.num_heads} heads / "
                             f"{self.num_kv_heads} key/value heads")
        group = self.num_heads // self.num_kv_heads if self.num_kv_heads else 0
        equal = (group > 0 and self.num_heads % self.num_kv_heads == 0
                 and kv_map == [h // group for h in range(self.num_heads)])
        # Equal consecutive groups use the stock GQA path; otherwise K/V are gathered per query head.
        self.num_key_value_groups = group if equal else 1
        self._kv_map = None if equal else tuple(kv_map)
        self._kv_index = None  # built lazily on the compute device (never a buffer: loading is on meta)
        # Decoding with unequal groups: query head h sits in slot _pack_slot[h] of a [kv heads, largest
        # group] grid, so one SDPA call reads each K/V head once (empty slots are computed, then dropped).
        sizes = [kv_map.count(k) for k in range(self.num_kv_heads)]
        self._group = max(sizes, default=0)
        seen = [0] * self.num_kv_heads
        slots = []
        for k in kv_map:
            slots.append(k * self._group + seen[k])
            seen[k] += 1
        self._pack_slot = None if equal else tuple(slots)
        self._pack_index = None
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = getattr(config, "attention_dropout", 0.0)
        self.is_causal = True
        self.sliding_window = _layer_window(config, layer_idx)
        biases = set(widths.get("biases", ()))
        d, hidden = self.head_dim, config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * d, bias="q_proj" in biases)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * d, bias="k_proj" in biases)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * d, bias="v_proj" in biases)
        self.o_proj = nn.Linear(self.num_heads * d, hidden, bias="o_proj" in biases)

    def _gather_index(self, device) -> torch.Tensor:
        if self._kv_index is None or self._kv_index.device != device:
            self._kv_index = torch.tensor(self._kv_map, dtype=torch.long, device=device)
        return self._kv_index

    def _packed_decode(self, q, k, v, attention_mask):
        """One query position, unequal groups, SDPA: the queries packed per K/V head ([b, kv heads,
        largest group, d]) attend to the cache as it is; returns [b, 1, heads, d] like the attention
        functions. The mask ([b or 1, 1, 1, keys] or None) broadcasts over a group's queries."""
        b, _, _, d = q.shape
        if self._pack_index is None or self._pack_index.device != q.device:
            self._pack_index = torch.tensor(self._pack_slot, dtype=torch.long, device=q.device)
        packed = q.new_zeros(b, self.num_kv_heads * self._group, d)
        packed.index_copy_(1, self._pack_index, q[:, :, 0])
        packed = packed.view(b, self.num_kv_heads, self._group, d)
        out = torch.nn.functional.scaled_dot_product_attention(packed, k, v, attn_mask=attention_mask,
                                                               scale=self.scaling)
        return out.reshape(b, -1, d).index_select(1, self._pack_index).unsqueeze(1)

    def keep_cache_length(self, hidden_states: torch.Tensor, past_key_values) -> None:
        """A layer without heads still advances its cache: masks and positions read the cache length
        of a layer (the first full-attention one), and a cache layer holding an empty tensor reports
        length 0. One zero per token (width 1, one head) keeps the count at a negligible cost."""
        if past_key_values is None:
            return
        b, t = hidden_states.shape[:2]
        z = hidden_states.new_zeros(b, 1, t, 1)
        past_key_values.update(z, z, self.layer_idx)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        past_key_values = _pop_cache(kwargs)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        if (self._kv_map is not None and q.shape[2] == 1 and self.config._attn_implementation == "sdpa"
                and not self.training and (attention_mask is None or attention_mask.shape[1] == 1)):
            out = self._packed_decode(q, k, v, attention_mask)
            return self.o_proj(out.reshape(*input_shape, -1)), None
        if self._kv_map is not None:
            idx = self._gather_index(k.device)
            k, v = k.index_select(1, idx), v.index_select(1, idx)
        out, weights = _attention_function(self.config._attn_implementation)(
            self, q, k, v, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights


class BonsaiMLP(nn.Module):
    def __init__(self, config, widths: dict):
        super().__init__()
        m, hidden = int(widths["intermediate_size"]), config.hidden_size
        biases = set(widths.get("biases", ()))
        self.intermediate_size = m
        self.gate_proj = nn.Linear(hidden, m, bias="gate_proj" in biases)
        self.up_proj = nn.Linear(hidden, m, bias="up_proj" in biases)
        self.down_proj = nn.Linear(m, hidden, bias="down_proj" in biases)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class _BonsaiDecoderLayer:
    """Mixed into a subclass of the stock decoder layer; skips sub-blocks that lost every unit."""

    _attention_cls = None
    _norm_cls = None

    def __init__(self, config, layer_idx: int, widths: dict):
        GradientCheckpointingLayer.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = self._attention_cls(config, layer_idx, widths)
        self.mlp = BonsaiMLP(config, widths)
        self.input_layernorm = self._norm_cls(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = self._norm_cls(config.hidden_size, eps=config.rms_norm_eps)
        layer_types = getattr(config, "layer_types", None)
        self.attention_type = layer_types[layer_idx] if layer_types is not None else "full_attention"

    def forward(self, hidden_states, attention_mask=None, position_ids=None, use_cache=False,
                position_embeddings=None, **kwargs):
        past_key_values = _pop_cache(kwargs)
        attn = self.self_attn
        if attn.num_heads:
            out, _ = attn(self.input_layernorm(hidden_states), position_embeddings=position_embeddings,
                          attention_mask=attention_mask, cache=past_key_values, position_ids=position_ids,
                          **kwargs)
            hidden_states = hidden_states + out
        else:
            attn.keep_cache_length(hidden_states, past_key_values)
            if attn.o_proj.bias is not None:
                hidden_states = hidden_states + attn.o_proj.bias
        if self.mlp.intermediate_size:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        elif self.mlp.down_proj.bias is not None:
            hidden_states = hidden_states + self.mlp.down_proj.bias
        return hidden_states


class _BonsaiConfig:
    """Mixed into a subclass of the stock config."""

    _stock_architecture = None

    def to_dict(self):
        d = super().to_dict()
        # save_pretrained names the architecture after the model class; keep the stock name, which
        # bonsai-lite reads to pick the weight layout (auto_map still routes loading to this file).
        if d.get("architectures"):
            d["architectures"] = [self._stock_architecture]
        return d


class _BonsaiForCausalLM:
    """Mixed into a subclass of the stock CausalLM: the stock model minus its decoder layers, plus ours."""

    _layer_cls = None

    def __init__(self, config):
        per_layer = getattr(config, PER_LAYER_KEY, None)
        if not per_layer or len(per_layer) != config.num_hidden_layers:
            raise ValueError(f"config.{PER_LAYER_KEY} must list the widths of all {config.num_hidden_layers} layers")
        # Build the stock model with no decoder layers (they would have the parent's widths and be thrown
        # away), then add layers with their own widths.
        n_layers = config.num_hidden_layers
        config.num_hidden_layers = 0
        try:
            super().__init__(config)
        finally:
            config.num_hidden_layers = n_layers
        with warnings.catch_warnings():  # a pruned-away sub-block has zero-size weights; torch warns on their init
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            self.model.layers = nn.ModuleList(self._layer_cls(config, i, per_layer[i]) for i in range(n_layers))
        self.post_init()


def _family(prefix: str, module, config_cls):
    """Config + CausalLM classes for one stock architecture (`prefix` as in `LlamaForCausalLM`)."""
    attention = type(f"Bonsai{prefix}Attention", (_BonsaiAttention, getattr(module, f"{prefix}Attention")), {})
    layer = type(f"Bonsai{prefix}DecoderLayer", (_BonsaiDecoderLayer, getattr(module, f"{prefix}DecoderLayer")),
                 {"_attention_cls": attention, "_norm_cls": getattr(module, f"{prefix}RMSNorm")})
    config = type(f"Bonsai{prefix}Config", (_BonsaiConfig, config_cls),
                  {"model_type": config_cls.model_type, "_stock_architecture": f"{prefix}ForCausalLM"})
    causal_lm = type(f"Bonsai{prefix}ForCausalLM", (_BonsaiForCausalLM, getattr(module, f"{prefix}ForCausalLM")),
                     {"config_class": config, "_layer_cls": layer, "_no_split_modules": [layer.__name__]})
    for cls in (attention, layer, config, causal_lm):
        cls.__module__ = __name__
    return config, causal_lm


BonsaiLlamaConfig, BonsaiLlamaForCausalLM = _family("Llama", _llama, _llama.LlamaConfig)
BonsaiMistralConfig, BonsaiMistralForCausalLM = _family("Mistral", _mistral, _mistral.MistralConfig)
BonsaiQwen2Config, BonsaiQwen2ForCausalLM = _family("Qwen2", _qwen2, _qwen2.Qwen2Config)

# Stock architecture name -> (config class, CausalLM class) named in the exported config's auto_map.
FAMILIES = {
    "LlamaForCausalLM": ("BonsaiLlamaConfig", "BonsaiLlamaForCausalLM"),
    "MistralForCausalLM": ("BonsaiMistralConfig", "BonsaiMistralForCausalLM"),
    "Qwen2ForCausalLM": ("BonsaiQwen2Config", "BonsaiQwen2ForCausalLM"),
}
