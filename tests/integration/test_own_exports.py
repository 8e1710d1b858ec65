"""bonsai-lite loads its own per-layer exports without --trust-remote-code (after checking that the
shipped modeling file is the one it writes); a foreign or edited modeling file still needs the flag."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from bonsai_lite.adapt.train import AdaptConfig, adapt
from bonsai_lite.cli.main import main
from bonsai_lite.errors import CheckpointError
from bonsai_lite.export import MODELING_FILE, export_pruned
from bonsai_lite.io.hf import load_causal_lm, own_model_class
from bonsai_lite.structure import load_spec
from conftest import make_tiny_model
from test_adapt import TEXT, add_char_tokenizer
from test_export import per_layer_structure

pytestmark = pytest.mark.integration
torch.set_num_threads(2)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    parent = add_char_tokenizer(make_tiny_model(root / "parent", "qwen2-gqa-bias", seed=0))
    out = root / "pruned"
    export_pruned(parent, per_layer_structure(load_spec(parent), seed=2), out)
    text = root / "text.txt"
    text.write_text(TEXT)
    return parent, out, text


def test_own_export_loads_without_remote_code_and_equals_remote_load(exported):
    _, out, _ = exported
    assert own_model_class(out) is not None
    ours = load_causal_lm(out, dtype=torch.float32).eval()
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(ours).__module__ == "bonsai_lite.export_assets.modeling_bonsai"
    assert type(remote).__module__ != type(ours).__module__  # the reference ran the shipped file
    tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(tokens).logits, remote(tokens).logits)


def test_edited_modeling_file_needs_the_flag(exported, tmp_path):
    import shutil

    _, out, _ = exported
    d = shutil.copytree(out, tmp_path / "edited")
    (d / MODELING_FILE).write_text((d / MODELING_FILE).read_text() + "\n# edited\n")
    assert own_model_class(d) is None
    with pytest.raises(CheckpointError, match="--trust-remote-code"):
        load_causal_lm(d)
    assert load_causal_lm(d, trust_remote_code=True) is not None


def test_cli_eval_and_adapt_without_the_flag(exported, tmp_path, capsys):
    parent, out, text = exported
    assert main(["eval", str(out), "--data", str(text), "--seq-len", "32", "--device", "cpu"]) == 0
    cfg = AdaptConfig(pruned=str(out), out=str(tmp_path / "adapted"), data=str(text), parent=str(parent), seq_len=32,
                      batch_size=2, max_steps=2, rank=4, top_k=16, save_every=2, lr=1e-2, distill_weight=0.5,
                      device="cpu")
    adapt(cfg)
    assert (tmp_path / "adapted" / "config.json").is_file()
