"""The search's compute dtype when none is given (machine.search_dtype): resolved once, before the
search, into the run's settings, so a run resumed on another machine computes as it started; the
automatic bf16 search is the same search as an explicit `--dtype bfloat16` (auto vs explicit)."""
from __future__ import annotations

import pytest

from bonsai_lite.search import machine
from conftest import prunable_model, prune_small  # noqa: E402

pytestmark = pytest.mark.integration


def _run(model, calib, tmp_path, name, dtype=None):
    return prune_small(model, calib, tmp_path, name, dtype=dtype)


@pytest.fixture
def model(tiny_models, tmp_path):
    return prunable_model(tiny_models["llama-gqa-tied"], tmp_path)


def test_auto_bf16_search_equals_explicit_bf16(model, tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "cpu_bf16_factor", lambda: 5.0)  # an AMX CPU
    monkeypatch.setattr(machine, "BF16_SEARCH_MIN_PARAMS", 0)  # the tiny model counts as large
    auto, auto_key = _run(*model, tmp_path, "auto")
    explicit, explicit_key = _run(*model, tmp_path, "explicit", dtype="bfloat16")
    assert auto_key["dtype"] == explicit_key["dtype"] == "bfloat16"
    assert [h["removed_heads"] for h in auto["history"]] == [h["removed_heads"] for h in explicit["history"]]
    assert [h["removed_mlp"] for h in auto["history"]] == [h["removed_mlp"] for h in explicit["history"]]
    assert [h["loss_mean"] for h in auto["history"]] == [h["loss_mean"] for h in explicit["history"]]
    # and bf16 is not float32: the sub-model losses differ
    fp32, fp32_key = _run(*model, tmp_path, "fp32", dtype="float32")
    assert fp32_key["dtype"] == "float32"
    assert [h["loss_mean"] for h in fp32["history"]] != [h["loss_mean"] for h in auto["history"]]


def test_no_bf16_search_where_it_is_not_faster(model, tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "cpu_bf16_factor", lambda: 0.5)  # a CPU without fast bf16
    monkeypatch.setattr(machine, "BF16_SEARCH_MIN_PARAMS", 0)
    _, key = _run(*model, tmp_path, "slow")
    assert key["dtype"] is None  # the planner's choice: float32 on a CPU
