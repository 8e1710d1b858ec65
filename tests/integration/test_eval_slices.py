"""`eval --skip-tokens`: a held-out slice of the same file. The perplexity of two adjacent slices,
each evaluated on its own, must combine into that of the span they cover (equal window counts:
exp of the mean of the two mean NLLs), and the windows must be the tokens after the skipped ones."""
from __future__ import annotations

import json
import math

import pytest
import torch

from bonsai_lite.calib.data import windows
from bonsai_lite.cli.main import main
from bonsai_lite.errors import DataError
from bonsai_lite.eval.perplexity import perplexity
from conftest import prunable_model  # noqa: E402

pytestmark = pytest.mark.integration


def test_windows_start_after_the_skipped_tokens():
    ids = torch.arange(50)
    assert torch.equal(windows(ids, 4, max_tokens=8, skip_tokens=3), ids[3:11].reshape(2, 4))
    assert torch.equal(windows(ids, 4, skip_tokens=0), windows(ids, 4))
    with pytest.raises(DataError, match="--skip-tokens must be 0 or more"):
        windows(ids, 4, skip_tokens=-1)
    with pytest.raises(DataError, match="after skipping 48: fewer than one window of 4"):
        windows(ids, 4, skip_tokens=48)


def test_two_slices_combine_into_the_span(tiny_models, tmp_path, capsys):
    model, text = prunable_model(tiny_models["llama-gqa-tied"], tmp_path)
    kw = dict(text=text, seq_len=16, device="cpu")
    whole = perplexity(model, max_tokens=128, **kw)
    first = perplexity(model, max_tokens=64, **kw)
    second = perplexity(model, max_tokens=64, skip_tokens=64, **kw)
    assert first["windows"] == second["windows"] == 4 and whole["windows"] == 8
    assert abs(first["nll"] - second["nll"]) > 1e-4  # different tokens, or the check below proves nothing
    assert math.isclose(whole["nll"], (first["nll"] + second["nll"]) / 2, rel_tol=1e-6)
    assert main(["eval", str(model), "--data", str(text), "--seq-len", "16", "--max-tokens", "64",
                 "--skip-tokens", "64", "--device", "cpu", "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["skip_tokens"] == 64 and math.isclose(out["nll"], second["nll"], rel_tol=1e-9)
