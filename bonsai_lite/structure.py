"""What a model is made of: its shape (from `config.json`) and which prunable units survive.

A *unit* is an attention query head or an MLP intermediate unit of a decoder block. Under GQA a
query head is the unit and each kept head remembers which key/value head it reads (`kv_of_head`);
a key/value head disappears with the last query head that reads it (docs/design.md, "GQA").
`Structure` is the single source of truth for the engine, the search, slicing and export.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bonsai_lite.adapters import Adapter, adapter_for
from bonsai_lite.errors import CheckpointError

# Key under which an exported per-layer-width checkpoint records each layer's widths in config.json.
PER_LAYER_KEY = "bonsai_per_layer"


@dataclass(frozen=True)
class LayerStructure:
    heads: tuple[int, ...]  # checkpoint query-head slots kept, ascending
    kv_of_head: tuple[int, ...]  # checkpoint key/value slot read by each kept head
    mlp: tuple[int, ...]  # checkpoint MLP intermediate units kept, ascending

    @property
    def kv(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.kv_of_head)))

    @property
    def kv_map(self) -> torch.Tensor:
        """For each kept head, the position of its key/value head among the kept ones."""
        pos = {k: i for i, k in enumerate(self.kv)}
        return torch.tensor([pos[k] for k in self.kv_of_head], dtype=torch.long)

    def keep(self, *, heads: torch.Tensor, mlp: torch.Tensor) -> "LayerStructure":
        """Keep the units whose positions (among the currently kept ones) are True."""
        h = [i for i, k in enumerate(heads.tolist()) if k]
        return LayerStructure(
            heads=tuple(self.heads[i] for i in h),
            kv_of_head=tuple(self.kv_of_head[i] for i in h),
            mlp=tuple(u for u, k in zip(self.mlp, mlp.tolist()) if k),
        )


@dataclass(frozen=True)
class ModelSpec:
    """Shapes and numerics of a checkpoint, read from config.json alone (no weights needed)."""

    adapter: Adapter
    hidden: int
    n_layers: int
    vocab: int
    head_dim: int
    n_heads: int
    n_kv: int
    intermediate: int
    eps: float
    act: str
    tie_embeddings: bool
    sliding_window: int | None
    dtype: torch.dtype
    layers: tuple[LayerStructure, ...]
    hf_config: object = field(repr=False, compare=False)

    @property
    def gqa_group(self) -> int:
        return self.n_heads // self.n_kv

    def unit_params(self) -> tuple[int, int]:
        """Parameters removed with one query head (q rows, o columns, q bias) and one MLP unit."""
        head = 2 * self.hidden * self.head_dim + self.head_dim
        mlp = 3 * self.hidden
        return head, mlp

    def block_params(self, layer: LayerStructure) -> int:
        """Parameters of a decoder block with the given structure (biases ignored; they are tiny)."""
        nh, nkv, m = len(layer.heads), len(layer.kv), len(layer.mlp)
        return self.hidden * self.head_dim * (2 * nh + 2 * nkv) + 3 * self.hidden * m + 2 * self.hidden

    def non_embedding_params(self, layers: tuple[LayerStructure, ...] | None = None) -> int:
        return sum(self.block_params(s) for s in (layers or self.layers)) + self.hidden

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tie_embeddings else 2)


def _dense_layers(n_layers: int, n_heads: int, n_kv: int, intermediate: int) -> tuple[LayerStructure, ...]:
    group = n_heads // n_kv
    layer = LayerStructure(
        heads=tuple(range(n_heads)), kv_of_head=tuple(h // group for h in range(n_heads)), mlp=tuple(range(intermediate))
    )
    return (layer,) * n_layers


def _per_layer(entries: list[dict]) -> tuple[LayerStructure, ...]:
    layers = []
    for e in entries:
        kv_map = [int(k) for k in e["kv_map"]]
        layers.append(
            LayerStructure(
                heads=tuple(range(len(kv_map))), kv_of_head=tuple(kv_map), mlp=tuple(range(int(e["intermediate_size"])))
            )
        )
    return tuple(layers)


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir)
    if not path.is_dir():
        raise CheckpointError(f"{path}: model directory not found")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path}: no config.json (is this a Hugging Face model directory?)")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e.msg} at line {e.lineno})") from e


def load_spec(model_dir: str | Path) -> ModelSpec:
    """Build the spec from config.json; refuses unsupported architectures before anything else."""
    raw = read_config(model_dir)
    adapter = adapter_for(raw.get("architectures"))
    from transformers import AutoConfig  # deferred: transformers is slow to import

    if "model_type" not in raw:
        raise CheckpointError(f"{model_dir}/config.json has no model_type; is it a Hugging Face causal LM config?")
    try:
        hf = AutoConfig.for_model(raw["model_type"], **{k: v for k, v in raw.items() if k != "model_type"})
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{model_dir}/config.json is not a valid {raw['model_type']} config ({e})") from e
    return spec_from_hf_config(hf, adapter=adapter, raw=raw)


def spec_from_hf_config(hf, *, adapter: Adapter | None = None, raw: dict | None = None) -> ModelSpec:
    raw = raw if raw is not None else hf.to_dict()
    adapter = adapter or adapter_for(getattr(hf, "architectures", None))
    n_heads = hf.num_attention_heads
    n_kv = getattr(hf, "num_key_value_heads", None) or n_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // n_heads
    window = None
    if adapter.sliding_window_key:
        window = getattr(hf, adapter.sliding_window_key, None)
        if adapter.sliding_window_flag and not getattr(hf, adapter.sliding_window_flag, False):
            window = None
    layers = (
        _per_layer(raw[PER_LAYER_KEY])
        if raw.get(PER_LAYER_KEY)
        else _dense_layers(hf.num_hidden_layers, n_heads, n_kv, hf.intermediate_size)
    )
    dtype_name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    return ModelSpec(
        adapter=adapter,
        hidden=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        vocab=hf.vocab_size,
        head_dim=head_dim,
        n_heads=n_heads,
        n_kv=n_kv,
        intermediate=hf.intermediate_size,
        eps=hf.rms_norm_eps,
        act=hf.hidden_act,
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        sliding_window=window,
        dtype=getattr(torch, str(dtype_name).replace("torch.", ""), torch.float32),
        layers=layers,
        hf_config=hf,
    )


def rope_inv_freq(spec: ModelSpec) -> tuple[torch.Tensor, float]:
    """Rotary inverse frequencies and scaling exactly as transformers computes them for this config."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = spec.hf_config
    params = getattr(hf, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        return ROPE_INIT_FUNCTIONS[rope_type](hf, None)
    base = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    dim = spec.head_dim
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0


@dataclass(frozen=True)
class UnitLayout:
    """Where each layer's heads and MLP units sit in a flat unit vector (current structure)."""

    heads: tuple[slice, ...]
    mlp: tuple[slice, ...]
    total: int

    @classmethod
    def of(cls, layers: tuple[LayerStructure, ...]) -> "UnitLayout":
        heads, mlp, pos = [], [], 0
        for s in layers:
            heads.append(slice(pos, pos + len(s.heads)))
            pos += len(s.heads)
            mlp.append(slice(pos, pos + len(s.mlp)))
            pos += len(s.mlp)
        return cls(tuple(heads), tuple(mlp), pos)

    def groups(self) -> list[torch.Tensor]:
        """One index tensor per (layer, kind): the groups the sampler fixes and perturbs within."""
        out = []
        for h, m in zip(self.heads, self.mlp):
            out += [torch.arange(h.start, h.stop), torch.arange(m.start, m.stop)]
        return [g for g in out if len(g)]
