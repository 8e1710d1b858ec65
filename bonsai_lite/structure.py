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

    def window(self, layer: int) -> int | None:
        """Sliding window of one layer, as transformers decides it: Qwen2's `layer_types` (from
        `max_window_layers`) window only some layers; Mistral windows all of them."""
        types = getattr(self.hf_config, "layer_types", None)
        if self.sliding_window is not None and types is not None:
            return self.sliding_window if types[layer] == "sliding_attention" else None
        return self.sliding_window

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


def _per_layer(entries: list[dict], n_layers: int) -> tuple[LayerStructure, ...]:
    if not isinstance(entries, list) or len(entries) != n_layers:
        raise CheckpointError(f"config.json: {PER_LAYER_KEY} must list one entry per layer ({n_layers})")
    layers = []
    for i, e in enumerate(entries):
        try:
            kv_map = [int(k) for k in e["kv_map"]]
            mlp = int(e["intermediate_size"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"config.json: {PER_LAYER_KEY}[{i}] is malformed ({err.__class__.__name__}: "
                                  f"{err})") from err
        if not 0 <= mlp <= MAX_WIDTH or len(kv_map) > MAX_WIDTH:
            raise CheckpointError(f"config.json: {PER_LAYER_KEY}[{i}] has impossible widths")
        layers.append(LayerStructure(heads=tuple(range(len(kv_map))), kv_of_head=tuple(kv_map), mlp=tuple(range(mlp))))
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
    if raw.get("quantization_config"):
        method = raw["quantization_config"].get("quant_method", "?") if isinstance(raw["quantization_config"], dict) \
            else "?"
        raise CheckpointError(f"{model_dir}: a quantised checkpoint (quantization_config: {method}); bonsai-lite prunes "
                              "float weights only: dequantise it first (load it with transformers and save_pretrained "
                              "in float16/bfloat16)")
    _check_raw_widths(model_dir, raw)
    try:
        hf = AutoConfig.for_model(raw["model_type"], **{k: v for k, v in raw.items() if k != "model_type"})
    except Exception as e:  # transformers raises ValueError, TypeError, KeyError and its own validation errors
        reason = " ".join(str(e).split())
        raise CheckpointError(f"{model_dir}/config.json is not a valid {raw['model_type']} config ({reason})") from e
    spec = spec_from_hf_config(hf, adapter=adapter, raw=raw)
    _check_spec(model_dir, spec)
    return spec


# No released decoder comes near these; a config beyond them is corrupt, and building its per-layer
# structures (a tuple per layer) would take gigabytes before anything could say so.
MAX_LAYERS, MAX_WIDTH = 4096, 2**24


def _check_raw_widths(model_dir, raw: dict) -> None:
    """Integer widths must be positive integers below a sane bound, before anything is built from them."""
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                "vocab_size", "head_dim"):
        v = raw.get(key)
        if v is None and key in ("num_key_value_heads", "head_dim"):
            continue
        limit = MAX_LAYERS if key == "num_hidden_layers" else MAX_WIDTH
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= limit:
            raise CheckpointError(f"{model_dir}/config.json: {key} = {v!r} must be an integer in [1, {limit}]")


def _check_spec(model_dir, spec: "ModelSpec") -> None:
    """What transformers accepts but no model can be: each a one-line error before any work."""
    from transformers.activations import ACT2FN
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    where = f"{model_dir}/config.json"
    if spec.n_heads % spec.n_kv:
        raise CheckpointError(f"{where}: num_attention_heads {spec.n_heads} is not a multiple of num_key_value_heads "
                              f"{spec.n_kv}")
    explicit = getattr(spec.hf_config, "head_dim", None)
    if spec.head_dim * spec.n_heads != spec.hidden and not explicit:
        raise CheckpointError(f"{where}: hidden_size {spec.hidden} is not divisible by num_attention_heads {spec.n_heads} "
                              "and no head_dim is given")
    if spec.head_dim % 2:
        raise CheckpointError(f"{where}: head_dim {spec.head_dim} is odd; rotary embeddings need an even head_dim")
    if not (isinstance(spec.eps, (int, float)) and 0 < spec.eps < 1):
        raise CheckpointError(f"{where}: rms_norm_eps = {spec.eps!r} must be a small positive number")
    if spec.act not in ACT2FN:
        raise CheckpointError(f"{where}: unknown hidden_act {spec.act!r}; known: {', '.join(sorted(ACT2FN)[:12])}, ...")
    params = getattr(spec.hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
        raise CheckpointError(f"{where}: unknown rope type {rope_type!r}; known: default, "
                              f"{', '.join(sorted(ROPE_INIT_FUNCTIONS))}")
    for i, layer in enumerate(spec.layers):
        if any(not 0 <= k < spec.n_kv for k in layer.kv_of_head) or len(layer.mlp) > spec.intermediate \
                or len(layer.heads) > spec.n_heads:
            raise CheckpointError(f"{where}: {PER_LAYER_KEY}[{i}] does not fit the model's widths "
                                  f"({len(layer.heads)} heads, {len(layer.mlp)} MLP units, kv_map {list(layer.kv_of_head)})")


def spec_from_hf_config(hf, *, adapter: Adapter | None = None, raw: dict | None = None) -> ModelSpec:
    raw = raw if raw is not None else hf.to_dict()
    adapter = adapter or adapter_for(getattr(hf, "architectures", None))
    n_heads = hf.num_attention_heads
    n_kv = getattr(hf, "num_key_value_heads", None) or n_heads
    if n_heads < 1 or n_kv < 1 or n_heads % n_kv:  # before anything divides by them
        raise CheckpointError(f"config.json: num_attention_heads {n_heads} is not a multiple of num_key_value_heads "
                              f"{n_kv}")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // n_heads
    window = None
    if adapter.sliding_window_key:
        window = getattr(hf, adapter.sliding_window_key, None)
        if adapter.sliding_window_flag and not getattr(hf, adapter.sliding_window_flag, False):
            window = None
    layers = (
        _per_layer(raw[PER_LAYER_KEY], hf.num_hidden_layers)
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


def rope_inv_freq(spec: ModelSpec, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Rotary inverse frequencies and scaling exactly as transformers computes them for this config and
    a forward pass over `seq_len` positions: `dynamic` (NTK) and `longrope` scaling change their
    frequencies once a sequence is longer than the trained context (transformers' `dynamic_rope_update`)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = spec.hf_config
    params = getattr(hf, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "dynamic" and seq_len is not None and seq_len > hf.max_position_embeddings:
        return ROPE_INIT_FUNCTIONS[rope_type](hf, None, seq_len=seq_len)
    if rope_type == "longrope" and seq_len is not None and \
            seq_len > params.get("original_max_position_embeddings", hf.max_position_embeddings):
        return ROPE_INIT_FUNCTIONS[rope_type](hf, None, seq_len=seq_len)
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


def positions_in_parent(layers: tuple[LayerStructure, ...], parent: tuple[LayerStructure, ...]) -> torch.Tensor:
    """Where each unit of `layers` (UnitLayout order) sits in the layout of `parent`, the structure it
    was cut from; units are matched by their checkpoint slots."""
    mine, theirs = UnitLayout.of(layers), UnitLayout.of(parent)
    out = torch.empty(mine.total, dtype=torch.long)
    for l, (s, p) in enumerate(zip(layers, parent)):
        for at, outer, kept, slots in ((mine.heads[l], theirs.heads[l], s.heads, p.heads),
                                       (mine.mlp[l], theirs.mlp[l], s.mlp, p.mlp)):
            where = {slot: outer.start + i for i, slot in enumerate(slots)}
            out[at] = torch.tensor([where[u] for u in kept], dtype=torch.long)
    return out
