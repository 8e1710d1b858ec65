"""Post-pruning adaptation on tiny models: streamed teacher cache == transformers; merged == unmerged LoRA;
resumed training == uninterrupted; the CLI end to end."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bonsai_lite.adapt import teacher as teacher_mod
from bonsai_lite.adapt.budget import TrainShape, check_training_budget
from bonsai_lite.adapt.merge import export_adapted, lora_deltas
from bonsai_lite.adapt.teacher import build_teacher_cache
from bonsai_lite.adapt.train import AdaptConfig, adapt, needs_remote_code, with_lora
from bonsai_lite.errors import BonsaiError, BudgetError, CheckpointError
from bonsai_lite.io.model import StreamedModel
from conftest import make_tiny_model

pytestmark = pytest.mark.integration
torch.set_num_threads(2)

TEXT = ("The quick brown fox jumps over the lazy dog. Pruned models recover with a little fine-tuning.\n" * 40)


def add_char_tokenizer(model_dir):
    """A character-level tokenizer (97 ids, inside the tiny models' 211) so text files can be tokenised."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    tok = Tokenizer(models.WordLevel({"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(parent, 'pruned' student with narrower MLPs, text file): same vocabulary and tokenizer."""
    root = tmp_path_factory.mktemp("adapt")
    parent = add_char_tokenizer(make_tiny_model(root / "parent", "llama-gqa-tied", seed=0))
    pruned = add_char_tokenizer(make_tiny_model(root / "pruned", "llama-gqa-tied", seed=1,
                                                shapes=dict(intermediate_size=40)))
    text = root / "text.txt"
    text.write_text(TEXT)
    return parent, pruned, text


def cfg(pair, tmp_path, **kw) -> AdaptConfig:
    parent, pruned, text = pair
    base = dict(pruned=str(pruned), out=str(tmp_path / "out"), data=str(text), parent=str(parent), seq_len=32,
                batch_size=2, max_steps=6, rank=4, top_k=16, save_every=2, lr=1e-2, distill_weight=0.5)
    return AdaptConfig(**{**base, **kw})


@pytest.mark.parametrize("case", ["llama-gqa-tied", "mistral-gqa", "qwen2-gqa-bias"])
def test_teacher_cache_equals_transformers_topk(tiny_models, tiny_tokens, tmp_path, monkeypatch, case):
    k = 9
    ref = AutoModelForCausalLM.from_pretrained(tiny_models[case], dtype=torch.float32)(tiny_tokens).logits.float()
    top = ref.topk(k, -1)
    tail = ref.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
    # Passes of one window, and a first build killed after its first pass: the resumed cache is whole.
    monkeypatch.setattr(teacher_mod, "PASS_TOKENS", tiny_tokens.shape[1])
    real_pass, calls = teacher_mod.teacher_pass, []

    def killed_after_one(*a, **kw):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real_pass(*a, **kw)

    monkeypatch.setattr(teacher_mod, "teacher_pass", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(tiny_models[case], tiny_tokens, tmp_path / "cache", k=k)
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["windows_done"] == 1
    monkeypatch.setattr(teacher_mod, "teacher_pass", real_pass)
    cache = build_teacher_cache(tiny_models[case], tiny_tokens, tmp_path / "cache", k=k)
    values, indices, lse, got_tail = cache.batch(np.arange(tiny_tokens.shape[0]))
    assert cache.complete
    assert torch.allclose(values, top.values, atol=1e-4) and torch.equal(indices, top.indices)
    assert torch.allclose(lse, ref.logsumexp(-1), atol=1e-4) and torch.allclose(got_tail, tail, atol=1e-4)
    with pytest.raises(BonsaiError, match="other settings"):
        build_teacher_cache(tiny_models[case], tiny_tokens, tmp_path / "cache", k=k + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["llama-mha-untied", "qwen2-gqa-bias"])
def test_merged_logits_equal_unmerged_lora(tmp_path, tiny_tokens, case, dtype):
    from peft import LoraConfig

    src = make_tiny_model(tmp_path / "src", case, dtype=dtype)
    base = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    torch.manual_seed(0)
    model = with_lora(base, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear",
                                       init_lora_weights=False))  # B != 0: the merge has work to do
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.1)  # the size of a trained adapter; a random one moves logits by ~10
        want = model(tiny_tokens).logits
        plain = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)(tiny_tokens).logits
    deltas = lora_deltas(model)
    assert len(deltas) == 3 * 7 and (want - plain).abs().max() > 0.1
    out = export_adapted(src, tmp_path / "merged", lora=deltas)
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)(tiny_tokens).logits
    # These random tiny models sit ~2e-5 from their own float64 logits in float32 (logits up to ~8),
    # so float32 is held to 1e-5 of the logits' scale and float64 to 1e-10 absolute.
    tol = 1e-5 * want.abs().max() if dtype == torch.float32 else 1e-10
    assert (got - want).abs().max() <= tol
    if dtype == torch.float32:
        with torch.no_grad():
            assert torch.equal(got, model.merge_and_unload()(tiny_tokens).logits)  # peft's merge, bit for bit
    # Same tensor names, shapes, dtypes and shards as the source: as fast as the pruned model.
    src_infos = StreamedModel.open(src).ckpt.infos
    dst_infos = StreamedModel.open(out).ckpt.infos
    assert {n: (i.shape, i.dtype, i.file.name) for n, i in src_infos.items()} == \
           {n: (i.shape, i.dtype, i.file.name) for n, i in dst_infos.items()}


def _final_state(run_dir):
    doc = json.loads((run_dir / "train" / "state.json").read_text())
    return doc["meta"], load_file(str(run_dir / "train" / doc["tensors"]))


@pytest.mark.parametrize("full", [False, True])
def test_resumed_training_equals_uninterrupted(pair, tmp_path, full):
    c = cfg(pair, tmp_path, full=full)
    whole = adapt(c, run_dir=tmp_path / "whole.run", export=False)
    killed_at = []

    def kill_after_five(step, total, loss):
        if step == 5:  # last save was at step 4: step 5 is lost and redone
            killed_at.append(step)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        adapt(c, run_dir=tmp_path / "resumed.run", export=False, progress=kill_after_five)
    assert killed_at == [5] and _final_state(tmp_path / "resumed.run")[0]["step"] == 4
    resumed = adapt(c, run_dir=tmp_path / "resumed.run", export=False)
    meta_a, ta = _final_state(tmp_path / "whole.run")
    meta_b, tb = _final_state(tmp_path / "resumed.run")
    assert meta_a["step"] == meta_b["step"] == 6 and meta_a["history"] == meta_b["history"]
    assert ta.keys() == tb.keys() and any(k.startswith("optim.") for k in ta)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k  # bit-identical weights, moments and RNG
    assert whole["train_loss"] == resumed["train_loss"]
    with pytest.raises(BonsaiError, match="other settings"):
        adapt(cfg(pair, tmp_path, full=full, lr=3e-3), run_dir=tmp_path / "whole.run", export=False)


def test_cli_end_to_end_json(pair, tmp_path, capsys):
    from bonsai_lite.cli.main import main

    parent, pruned, text = pair
    out = tmp_path / "adapted"
    rc = main(["adapt", str(pruned), "--parent", str(parent), "--data", str(text), "--out", str(out),
               "--max-steps", "3", "--seq-len", "32", "--batch-size", "2", "--rank", "4", "--top-k", "8",
               "--save-every", "2", "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) >= {"out", "steps", "train_loss", "seconds"} and result["steps"] == 3
    assert result["out"] == str(out.resolve()) and np.isfinite(result["train_loss"])
    assert (out / "tokenizer.json").is_file() and (out / "bonsai_adapt.json").is_file()
    AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # a stock directory still
    # An existing output is refused without --overwrite; a tiny budget is refused with the minimum.
    assert main(["adapt", str(pruned), "--data", str(text), "--out", str(out), "--distill-weight", "0"]) == 2
    assert main(["adapt", str(pruned), "--data", str(text), "--out", str(tmp_path / "o2"), "--distill-weight", "0",
                 "--memory-budget", "1MB", "--seq-len", "32"]) == 2
    assert "fine-tuning needs about" in capsys.readouterr().err


def test_budget_refusal_names_the_minimum(pair):
    spec = StreamedModel.open(pair[1])
    shape = TrainShape(batch=8, seq_len=512, rank=4, full=True, param_bytes=4, checkpointing=False, top_k=64)
    with pytest.raises(BudgetError) as e:
        check_training_budget(spec.spec, spec.layers, shape, budget=2**20, cuda=False)
    assert 0 < e.value.minimum_bytes < check_training_budget(spec.spec, spec.layers, shape, budget=2**40, cuda=False)


def test_remote_code_only_from_inside_the_directory(pair, tmp_path):
    d = tmp_path / "remote"
    shutil.copytree(pair[1], d)
    config = json.loads((d / "config.json").read_text())
    assert needs_remote_code(d, trusted=False) is False  # a stock export loads without it
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_bonsai.BonsaiForCausalLM"}
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not a file"):
        needs_remote_code(d, trusted=True)
    (d / "modeling_bonsai.py").write_text("")
    with pytest.raises(CheckpointError, match="--trust-remote-code"):
        needs_remote_code(d, trusted=False)
    assert needs_remote_code(d, trusted=True) is True
    config["auto_map"] = {"AutoModelForCausalLM": "someone/repo--modeling.M"}
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="another repository"):
        needs_remote_code(d, trusted=True)
