"""Export: the sliced checkpoint equals the masked dense parent, reloads in transformers (custom code
per-layer, stock when uniform) and in the streamed engine; writes are atomic and refuse to clobber."""
from __future__ import annotations

import errno
import inspect
import json
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

import bonsai_lite.export.safetensors as export_mod
from bonsai_lite.errors import BonsaiError
from bonsai_lite.export import EXPORT_INFO, MODELING_FILE, export_pruned
from bonsai_lite.io.checkpoint import INDEX_NAME, Checkpoint
from bonsai_lite.io.model import StreamedModel
from bonsai_lite.search.engine import evaluate
from bonsai_lite.search.planner import Plan
from bonsai_lite.structure import PER_LAYER_KEY, LayerStructure, UnitLayout, load_spec

pytestmark = pytest.mark.integration
torch.set_num_threads(2)

CASES = ["llama-gqa-tied", "llama-mha-untied", "mistral-gqa", "qwen2-gqa-bias"]
STOCK = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
PLAN = Plan(device="cpu", dtype="float32", order="layer-major", cache="host", group_rows=10**6, tile_rows=3,
            head_chunk=64, prefetch=False, weights_8bit=False, predicted_peak_bytes=0, predicted_seconds=0,
            budget_bytes=0)


def keep(s: LayerStructure, heads, mlp) -> LayerStructure:
    heads, mlp = set(heads), set(mlp)
    return s.keep(heads=torch.tensor([i in heads for i in range(len(s.heads))], dtype=torch.bool),
                  mlp=torch.tensor([i in mlp for i in range(len(s.mlp))], dtype=torch.bool))


def random_mlp(g: torch.Generator, n: int, frac: float = 0.6) -> list[int]:
    return sorted(torch.randperm(n, generator=g)[: int(n * frac)].tolist())


def per_layer_structure(spec, seed: int) -> tuple[LayerStructure, ...]:
    """Layer 0 loses every head; layer 1 every head of KV group 0 and a few more; layer 2 keeps an
    unequal number of heads per KV group and loses every MLP unit; other MLP units dropped at random."""
    g = torch.Generator().manual_seed(seed)
    s0, s1, s2 = spec.layers
    group = spec.n_heads // spec.n_kv
    rest = [h for h in range(spec.n_heads) if h >= group]
    l1 = [h for h in rest if torch.rand(1, generator=g).item() < 0.6] or rest[:1]
    if group > 1:  # group j keeps j + 1 heads (capped): unequal groups
        l2 = [h for h in range(spec.n_heads) if h % group <= min(h // group, group - 1)]
    else:
        l2 = sorted(torch.randperm(spec.n_heads, generator=g)[:4].tolist())
    return (keep(s0, [], random_mlp(g, spec.intermediate)), keep(s1, l1, random_mlp(g, spec.intermediate, 0.4)),
            keep(s2, l2, []))


def uniform_structure(spec, seed: int, heads_per_group: int, mlp: int) -> tuple[LayerStructure, ...]:
    g = torch.Generator().manual_seed(seed)
    group = spec.n_heads // spec.n_kv
    layers = []
    for s in spec.layers:
        if group > 1:
            heads = [kv * group + i for kv in range(spec.n_kv)
                     for i in sorted(torch.randperm(group, generator=g)[:heads_per_group].tolist())]
        else:
            heads = torch.randperm(spec.n_heads, generator=g)[:heads_per_group].tolist()
        layers.append(keep(s, heads, torch.randperm(spec.intermediate, generator=g)[:mlp].tolist()))
    return tuple(layers)


def mask_of(parent_layers, layers) -> torch.Tensor:
    """The dense-parent unit mask equivalent to a structure (parent slots = positions)."""
    layout = UnitLayout.of(parent_layers)
    mask = torch.zeros(layout.total, dtype=torch.bool)
    for h, m, s in zip(layout.heads, layout.mlp, layers):
        mask[h.start + torch.tensor(s.heads, dtype=torch.long)] = True
        mask[m.start + torch.tensor(s.mlp, dtype=torch.long)] = True
    return mask


def masked_parent_logits(parent, mask, tokens, biases: dict | None = None) -> torch.Tensor:
    """Reference: transformers' dense parent with pruned units' o_proj/down_proj input columns zeroed
    (plus extra biases added to those projections' outputs)."""
    m = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32).eval()
    layout = UnitLayout.of(load_spec(parent).layers)
    head_dim = m.config.head_dim
    modules = dict(m.named_modules())
    with torch.no_grad():
        for l, layer in enumerate(m.model.layers):
            layer.self_attn.o_proj.weight.mul_(mask[layout.heads[l]].repeat_interleave(head_dim).float()[None, :])
            layer.mlp.down_proj.weight.mul_(mask[layout.mlp[l]].float()[None, :])
        for name, b in (biases or {}).items():
            modules[name.removesuffix(".bias")].register_forward_hook(lambda mod, inp, out, b=b: out + b)
        return m(tokens).logits.float()


def nll(logits, tokens) -> torch.Tensor:
    lg = logits[:, :-1]
    return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none").view(
        tokens.shape[0], -1).mean(1)


def load_export(out, **kw):
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True, **kw)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory):
    """Each case exported per-layer once: case -> (out, layers, result)."""
    root = tmp_path_factory.mktemp("exports")
    done = {}
    for i, case in enumerate(CASES):
        spec = load_spec(tiny_models[case])
        layers = per_layer_structure(spec, seed=i)
        result = export_pruned(tiny_models[case], layers, root / f"{case}-pruned", metadata={"case": case})
        done[case] = (root / f"{case}-pruned", layers, result)
    return done


@pytest.mark.parametrize("case", CASES)
def test_per_layer_export_equals_masked_parent(tiny_models, tiny_tokens, exported, case):
    parent = tiny_models[case]
    out, layers, _ = exported[case]
    mask = mask_of(load_spec(parent).layers, layers)
    model = load_export(out, trust_remote_code=True)
    assert type(model).__name__ == "Bonsai" + STOCK[load_spec(parent).adapter.name]
    with torch.no_grad():
        logits = model(tiny_tokens).logits.float()
    ref = masked_parent_logits(parent, mask, tiny_tokens)
    assert (logits - ref).abs().max().item() < 1e-4
    engine_ref = evaluate(StreamedModel.open(parent), tiny_tokens, mask[None], PLAN)
    assert torch.allclose(nll(logits, tiny_tokens).double(), engine_ref.row_nll[0], atol=1e-4, rtol=0)
    # (b) the streamed engine reads the export (per-layer config) and agrees with the masked parent
    res = evaluate(StreamedModel.open(out), tiny_tokens, None, PLAN)
    assert torch.allclose(res.row_nll[0], engine_ref.row_nll[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_export_files_index_and_config(tiny_models, exported, case):
    parent = tiny_models[case]
    out, layers, result = exported[case]
    parent_index = json.loads((parent / INDEX_NAME).read_text())["weight_map"]
    index = json.loads((out / INDEX_NAME).read_text())
    # (d) one shard per parent shard, each holding its parent shard's tensors; the index names them all
    parent_shards = sorted(set(parent_index.values()))
    assert len(result.shards) == len(parent_shards)
    assert set(index["weight_map"].values()) == set(result.shards) == {p.name for p in out.glob("*.safetensors")}
    for src, dst in zip(parent_shards, result.shards):
        names = {n for n, f in index["weight_map"].items() if f == dst}
        assert names == {n for n, f in parent_index.items() if f == src}
    ckpt = Checkpoint(out)
    assert index["metadata"]["total_size"] == result.bytes == ckpt.nbytes()
    assert result.params == sum(torch.Size(i.shape).numel() for i in ckpt.infos.values())
    spec = load_spec(parent)
    assert ("lm_head.weight" in ckpt.infos) == (not spec.tie_embeddings)
    # the config describes each layer; the streaming loader reads it back as the kept structure
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"].startswith(MODELING_FILE.removesuffix(".py") + ".")
    assert cfg["architectures"] == [STOCK[spec.adapter.name]] and cfg["head_dim"] == spec.head_dim
    assert [e["num_attention_heads"] for e in cfg[PER_LAYER_KEY]] == [len(s.heads) for s in layers]
    reread = load_spec(out).layers
    assert [(len(s.heads), s.kv_map.tolist(), len(s.mlp)) for s in reread] == \
           [(len(s.heads), s.kv_map.tolist(), len(s.mlp)) for s in layers]
    assert (out / "generation_config.json").is_file() and (out / MODELING_FILE).is_file()
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info["metadata"] == {"case": case} and info["layers"][2]["heads"] == list(layers[2].heads)
    assert not list(out.parent.glob(f".{out.name}.*"))  # no temporary directory left beside it


@pytest.mark.parametrize("case", CASES)
def test_generation_with_cache_equals_no_cache(tiny_tokens, exported, case):
    out, _, _ = exported[case]
    model = load_export(out, trust_remote_code=True)
    prompt = tiny_tokens[:1, :20]  # longer than Mistral's 16-token window: the sliding cache is exercised
    kw = dict(max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(prompt), pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kw)
        uncached = model.generate(prompt, use_cache=False, **kw)
        slow = prompt
        for _ in range(5):  # reference: full forward, argmax, append
            slow = torch.cat([slow, model(slow).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, slow) and torch.equal(uncached, slow)
    # A left-padded batch builds explicit masks sized from the cache of layer 0, which has no heads.
    batch, mask = tiny_tokens[:2, :20].clone(), torch.ones(2, 20, dtype=torch.long)
    batch[0, :4], mask[0, :4] = 0, 0
    kw["attention_mask"] = mask
    with torch.no_grad():
        assert torch.equal(model.generate(batch, use_cache=True, **kw), model.generate(batch, use_cache=False, **kw))


@pytest.mark.parametrize("case", CASES)
def test_cached_decode_with_unequal_groups_equals_the_full_forward(tiny_tokens, exported, case, monkeypatch):
    """Decoding one token at a time through the cache (unequal groups: the packed SDPA call, no K/V
    copy) gives the logits of a full forward over the same tokens, with and without a padding mask."""
    out, layers, _ = exported[case]
    model = load_export(out, trust_remote_code=True)  # the shipped file, as users load it
    assert model.config._attn_implementation == "sdpa"
    mixin = next(c for c in type(model.model.layers[0].self_attn).__mro__ if c.__name__ == "_BonsaiAttention")
    packed, calls = mixin._packed_decode, []
    monkeypatch.setattr(mixin, "_packed_decode", lambda self, *a: calls.append(self.layer_idx) or packed(self, *a))
    # the cache's keyword: `cache` from transformers 5.24 (`past_key_values` deprecated), before it the old name
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    tokens, mask = tiny_tokens[:2, :24].clone(), torch.ones(2, 24, dtype=torch.long)
    mask[0, :3] = 0  # left padding: an explicit mask reaches the packed call
    for m in (None, mask):
        with torch.no_grad():
            full = model(tokens, attention_mask=m).logits
            step = model(tokens[:, :20], attention_mask=None if m is None else m[:, :20], use_cache=True)
            cache, logits = step.past_key_values, [step.logits]
            for i in range(20, 24):
                step = model(tokens[:, i:i + 1], attention_mask=None if m is None else m[:, :i + 1],
                             **{cache_kw: cache}, use_cache=True)
                cache = step.past_key_values
                logits.append(step.logits)
        rows = slice(None) if m is None else slice(1, 2)  # a padded row's logits at pad positions are moot
        assert torch.allclose(torch.cat(logits, 1)[rows], full[rows], atol=1e-4), case
    unequal = {l for l, s in enumerate(layers) if len({s.kv_of_head.count(k) for k in s.kv}) > 1}
    assert set(calls) == unequal  # every unequal layer decoded packed, and only those
    assert unequal or "mha" in case  # multi-head attention has groups of one: never unequal


def test_saved_again_by_transformers_stays_readable(tiny_tokens, exported, tmp_path):
    """After fine-tuning, users save with transformers: the copy keeps the stock architecture name
    (for bonsai-lite's loader) and the auto_map (for transformers)."""
    out, layers, _ = exported["llama-gqa-tied"]
    model = load_export(out, trust_remote_code=True)
    model.save_pretrained(tmp_path / "resaved")
    cfg = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "auto_map" in cfg
    assert [len(s.heads) for s in load_spec(tmp_path / "resaved").layers] == [len(s.heads) for s in layers]
    again = load_export(tmp_path / "resaved", trust_remote_code=True)
    with torch.no_grad():
        assert torch.equal(again(tiny_tokens).logits, model(tiny_tokens).logits)


def test_per_layer_export_does_not_load_as_stock_model(exported):
    out, _, _ = exported["llama-gqa-tied"]
    with pytest.raises(Exception):  # size mismatches: never a silently wrong stock model
        AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("case", CASES)
def test_uniform_export_is_a_stock_model(tiny_models, tiny_tokens, tmp_path, case):
    parent = tiny_models[case]
    spec = load_spec(parent)
    layers = uniform_structure(spec, seed=7, heads_per_group=2 if spec.n_kv < spec.n_heads else 4, mlp=40)
    out = tmp_path / "uniform"
    export_pruned(parent, layers, out, uniform=True)
    cfg = json.loads((out / "config.json").read_text())
    assert PER_LAYER_KEY not in cfg and "auto_map" not in cfg and not (out / MODELING_FILE).exists()
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]) == \
           (len(layers[0].heads), len(layers[0].kv), 40)
    model = load_export(out)  # (c) no trust_remote_code
    assert type(model).__name__ == STOCK[spec.adapter.name]
    mask = mask_of(spec.layers, layers)
    with torch.no_grad():
        logits = model(tiny_tokens).logits.float()
    assert (logits - masked_parent_logits(parent, mask, tiny_tokens)).abs().max().item() < 1e-4
    res = evaluate(StreamedModel.open(out), tiny_tokens, None, PLAN)
    assert torch.allclose(res.row_nll[0], nll(logits, tiny_tokens).double(), atol=1e-4, rtol=0)


def test_uniform_refuses_structures_a_stock_config_cannot_hold(tiny_models, exported, tmp_path):
    parent = tiny_models["llama-gqa-tied"]
    _, per_layer, _ = exported["llama-gqa-tied"]
    with pytest.raises(ValueError, match="same"):
        export_pruned(parent, per_layer, tmp_path / "a", uniform=True)
    spec = load_spec(parent)
    unequal = tuple(keep(s, [0, 3, 4], range(40)) for s in spec.layers)  # groups of 1 and 2 heads
    with pytest.raises(ValueError, match="consecutive"):
        export_pruned(parent, unequal, tmp_path / "b", uniform=True)
    assert not list(tmp_path.iterdir())  # refused before anything was written
    # 5 heads: newer transformers' LlamaConfig wants hidden % heads == 0, older ones accept it. The
    # export must follow whatever the installed transformers does: refuse, or write a loadable model.
    mha = tiny_models["llama-mha-untied"]
    five = tuple(keep(s, range(5), range(40)) for s in load_spec(mha).layers)
    cfg = json.loads((mha / "config.json").read_text())
    cfg["num_attention_heads"] = cfg["num_key_value_heads"] = 5
    try:
        AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    except Exception:  # noqa: BLE001 - the reference: transformers' own validators
        with pytest.raises(ValueError, match="transformers rejects"):
            export_pruned(mha, five, tmp_path / "c", uniform=True)
        assert not (tmp_path / "c").exists()
    else:
        export_pruned(mha, five, tmp_path / "c", uniform=True)
        assert load_export(tmp_path / "c").config.num_attention_heads == 5


@pytest.mark.parametrize("case", ["llama-gqa-tied", "qwen2-gqa-bias"])
def test_extra_biases_per_layer(tiny_models, tiny_tokens, tmp_path, case):
    """FLAP bias compensation: o/down biases, including on a layer without heads / without MLP units."""
    parent = tiny_models[case]
    spec = load_spec(parent)
    layers = per_layer_structure(spec, seed=3)
    g = torch.Generator().manual_seed(5)
    biases = {f"model.layers.{l}.{p}.bias": torch.randn(spec.hidden, generator=g) * 0.1
              for l, p in [(0, "self_attn.o_proj"), (1, "mlp.down_proj"), (2, "mlp.down_proj")]}
    out = tmp_path / "flap"
    export_pruned(parent, layers, out, extra_biases=biases)
    cfg = json.loads((out / "config.json").read_text())[PER_LAYER_KEY]
    assert "o_proj" in cfg[0]["biases"] and "down_proj" in cfg[2]["biases"]
    model = load_export(out, trust_remote_code=True)
    with torch.no_grad():
        logits = model(tiny_tokens).logits.float()
    ref = masked_parent_logits(parent, mask_of(spec.layers, layers), tiny_tokens, biases)
    assert (logits - ref).abs().max().item() < 1e-4
    res = evaluate(StreamedModel.open(out), tiny_tokens, None, PLAN)
    assert torch.allclose(res.row_nll[0], nll(logits, tiny_tokens).double(), atol=1e-4, rtol=0)


def test_extra_biases_uniform(tiny_models, tiny_tokens, tmp_path):
    parent = tiny_models["llama-gqa-tied"]
    spec = load_spec(parent)
    layers = uniform_structure(spec, seed=1, heads_per_group=2, mlp=48)
    biases = {"model.layers.1.self_attn.o_proj.bias": torch.full((spec.hidden,), 0.05),
              "model.layers.2.mlp.down_proj.bias": torch.linspace(-0.1, 0.1, spec.hidden)}
    out = tmp_path / "flap-uniform"
    export_pruned(parent, layers, out, uniform=True, extra_biases=biases, dtype=torch.float32)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["attention_bias"] is True and cfg["mlp_bias"] is True
    model = load_export(out)  # the stock model with q/k/v/gate/up biases written as zeros
    with torch.no_grad():
        logits = model(tiny_tokens).logits.float()
    ref = masked_parent_logits(parent, mask_of(spec.layers, layers), tiny_tokens, biases)
    assert (logits - ref).abs().max().item() < 1e-4
    mistral = tiny_models["mistral-gqa"]
    with pytest.raises(ValueError, match="no switch for biases"):
        export_pruned(mistral, uniform_structure(load_spec(mistral), 1, 2, 48), tmp_path / "m", uniform=True,
                      extra_biases=biases)
    with pytest.raises(ValueError, match="shape"):
        export_pruned(parent, layers, tmp_path / "s", extra_biases={"model.layers.1.mlp.down_proj.bias": torch.ones(3)})
    with pytest.raises(ValueError, match="not projection biases"):
        export_pruned(parent, layers, tmp_path / "n", extra_biases={"model.norm.bias": torch.ones(spec.hidden)})


def test_per_layer_export_prunes_again(tiny_tokens, exported, tmp_path):
    """A per-layer export is itself a parent: its slots are range(n) with the recorded kv_map."""
    out, _, _ = exported["qwen2-gqa-bias"]
    first = StreamedModel.open(out)
    g = torch.Generator().manual_seed(9)
    layers = tuple(s.keep(heads=torch.arange(len(s.heads)) != 0, mlp=torch.rand(len(s.mlp), generator=g) < 0.5)
                   for s in first.layers)
    again = export_pruned(out, layers, tmp_path / "again").out
    ref = evaluate(first, tiny_tokens, mask_of(first.layers, layers)[None], PLAN)
    res = evaluate(StreamedModel.open(again), tiny_tokens, None, PLAN)
    assert torch.allclose(res.row_nll[0], ref.row_nll[0], atol=1e-4, rtol=0)


def test_bfloat16_export(tiny_models, tmp_path):
    parent = tiny_models["mistral-gqa"]
    layers = per_layer_structure(load_spec(parent), seed=2)
    out = export_pruned(parent, layers, tmp_path / "bf16", dtype=torch.bfloat16).out
    assert {i.dtype for i in Checkpoint(out).infos.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_export(out, trust_remote_code=True).model.layers[2].self_attn.num_heads == len(layers[2].heads)


def test_refuses_existing_output_unless_overwrite(tiny_models, exported, tmp_path):
    parent = tiny_models["llama-gqa-tied"]
    _, layers, _ = exported["llama-gqa-tied"]
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(BonsaiError, match="already exists"):
        export_pruned(parent, layers, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    with pytest.raises(BonsaiError, match="parent"):
        export_pruned(parent, layers, parent, overwrite=True)
    export_pruned(parent, layers, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_full_disk_leaves_nothing_behind(tiny_models, exported, tmp_path, monkeypatch):
    parent = tiny_models["llama-gqa-tied"]
    _, layers, _ = exported["llama-gqa-tied"]
    real, calls = export_mod.write_shard, []

    def disk_fills_on_second_shard(job, *args, **kw):
        calls.append(job.file)
        if len(calls) == 2:
            (args[-1] / job.file).write_bytes(b"\0" * 100)  # a partly written shard
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(job, *args, **kw)

    monkeypatch.setattr(export_mod, "write_shard", disk_fills_on_second_shard)
    with pytest.raises(BonsaiError, match="disk full"):
        export_pruned(parent, layers, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    # with overwrite, the previous export stays untouched
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    calls.clear()
    with pytest.raises(BonsaiError, match="disk full"):
        export_pruned(parent, layers, old, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and (old / "config.json").read_text() == "{}"


def test_modeling_file_reads_the_loader_key():
    from bonsai_lite.export_assets import modeling_bonsai

    assert modeling_bonsai.PER_LAYER_KEY == PER_LAYER_KEY
