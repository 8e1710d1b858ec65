"""bonsai-lite loads its own per-layer exports without --trust-remote-code (after checking that the
shipped modeling file is the one it writes); a foreign or edited modeling file still needs the flag."""
from __future__ import annotations

import hashlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from bonsai_lite.adapt.train import AdaptConfig, adapt
from bonsai_lite.cli.main import main
from bonsai_lite.errors import CheckpointError
from bonsai_lite.export import MODELING_FILE, export_pruned
from bonsai_lite.io.hf import EARLIER_MODELING_SHA256, load_causal_lm, own_model_class
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


@pytest.mark.parametrize("commit", sorted(EARLIER_MODELING_SHA256.values()))
def test_exports_of_earlier_versions_load_as_own(exported, tmp_path, commit):
    """An export that ships the modeling file an earlier bonsai-lite wrote (taken from git; the table
    holds its hash) loads through today's classes without the flag, with the same logits as that
    file run as remote code."""
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    old = subprocess.run(["git", "show", f"{commit}:bonsai_lite/export_assets/{MODELING_FILE}"], cwd=root,
                         capture_output=True)
    if old.returncode:
        pytest.skip(f"this checkout has no commit {commit}")
    _, out, _ = exported
    d = shutil.copytree(out, tmp_path / commit)
    (d / MODELING_FILE).write_bytes(old.stdout)
    assert EARLIER_MODELING_SHA256[hashlib.sha256(old.stdout).hexdigest()] == commit
    ours = load_causal_lm(d, dtype=torch.float32).eval()
    assert type(ours).__module__ == "bonsai_lite.export_assets.modeling_bonsai"
    remote = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, dtype=torch.float32).eval()
    tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(ours(tokens).logits, remote(tokens).logits, atol=1e-5)


def test_every_earlier_modeling_file_is_known():
    """Each version of the modeling file in the history is today's or in EARLIER_MODELING_SHA256, so
    no export bonsai-lite wrote starts needing --trust-remote-code after a change to the file."""
    import subprocess
    from importlib import resources
    from pathlib import Path

    root, path = Path(__file__).resolve().parents[2], f"bonsai_lite/export_assets/{MODELING_FILE}"
    log = subprocess.run(["git", "log", "--format=%H", "--", path], cwd=root, capture_output=True, text=True)
    if log.returncode or not log.stdout.strip():
        pytest.skip("no git history here")
    ours = hashlib.sha256(resources.files("bonsai_lite.export_assets").joinpath(MODELING_FILE).read_bytes()).hexdigest()
    for commit in log.stdout.split():
        text = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=root, capture_output=True, check=True).stdout
        digest = hashlib.sha256(text).hexdigest()
        assert digest == ours or digest in EARLIER_MODELING_SHA256, f"add {digest} ({commit[:7]}) to the table"


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
