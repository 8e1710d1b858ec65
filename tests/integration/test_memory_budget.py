"""Acceptance: on CPU, evaluating many masks of a model 4x larger than --memory-budget stays inside it.

A child process (budget_child.py) plans with the real machine probe and evaluates K = 16 masks x 2
samples x 64 tokens of a random fp32 Llama whose weights are ~178 MiB, under a 36 MiB budget.

Why these sizes: one decoder block is 14.5 MiB (hidden 512, MLP 2048), so a streamed plan needs
about one block, the copies of its largest tensor, a tile of activations and the fixed overhead:
the planner's minimum is ~33 MiB. 36 MiB leaves the planner a little choice, and 12 blocks make
the weights ~5x the budget. 16 x 2 x 64 tokens keep the child under ~15 s on one shared core.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_tiny_model

pytestmark = pytest.mark.integration

BUDGET = 36 * 2**20
MASKS, SAMPLES, TOKENS = 16, 2, 64
ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("budget_child.py")


def test_peak_memory_growth_stays_under_budget(tmp_path):
    big = make_tiny_model(tmp_path / "big", "llama-gqa-tied", shard="20MB", shapes=dict(
        hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=2048))
    warm = make_tiny_model(tmp_path / "warm", "llama-gqa-tied", shard="20KB", shapes=dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(CHILD), str(big), str(warm), str(BUDGET), str(MASKS), str(SAMPLES),
                          str(TOKENS)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    plan = r["plan"]
    report = (f"growth {r['peak_growth'] / 2**20:.1f} MiB, predicted {plan['predicted_peak_bytes'] / 2**20:.1f} MiB, "
              f"budget {BUDGET / 2**20:.0f} MiB, plan {plan['order']}/{plan['cache']} tile {plan['tile_rows']} "
              f"group {plan['group_rows']}, baseline {r['baseline_rss'] / 2**20:.0f} MiB, hwm reset {r['hwm_reset']}")
    print(report)
    # The setting is what the acceptance criterion asks for.
    assert r["weights_bytes"] >= 4 * BUDGET, r["weights_bytes"]
    assert plan["order"] != "resident", plan  # it must stream the weights
    assert r["bytes_read"] >= r["weights_bytes"] * 0.9  # and did read (nearly) all of them
    assert len(r["nll"]) == MASKS >= 16 and all(v == v and abs(v) < 1e4 for v in r["nll"])
    # The criterion, and the planner's own promise (its prediction bounds what happened).
    assert r["peak_growth"] < BUDGET, report
    assert r["peak_growth"] <= plan["predicted_peak_bytes"], report
