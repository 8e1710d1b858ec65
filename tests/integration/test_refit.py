"""The least-squares refit (prune/refit.py): the streamed refit equals a transformers reference
(tools/refit_probe.py, which refits a whole transformers model in place), and the export that reads
it through the checkpoint overlay computes what the refitted transformers model computes."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from bonsai_lite.errors import BonsaiError, CheckpointError
from bonsai_lite.export import export_pruned
from bonsai_lite.io.checkpoint import Checkpoint
from bonsai_lite.io.model import StreamedModel
from bonsai_lite.prune.refit import DAMP, refit_model
from bonsai_lite.prune.select import apply_drop
from bonsai_lite.search.engine import evaluate
from bonsai_lite.structure import UnitLayout

from test_engine import plan  # noqa: E402

pytestmark = pytest.mark.integration
TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _pruned(model, seed=5, share=0.3):
    layout = UnitLayout.of(model.layers)
    drop = torch.rand(layout.total, generator=torch.Generator().manual_seed(seed)) < share
    return apply_drop(model.layers, layout, drop)


@pytest.mark.parametrize("case", ["llama-gqa-tied", "qwen2-gqa-bias"])
def test_streamed_refit_equals_the_transformers_reference(tiny_models, tiny_tokens, case, tmp_path):
    sys.path.insert(0, str(TOOLS))
    from refit_probe import compensate

    parent = StreamedModel.open(tiny_models[case])
    layers = _pruned(parent)
    biases = refit_model(parent, layers, tiny_tokens, tmp_path / "refit", batch=2)
    ref = AutoModelForCausalLM.from_pretrained(tiny_models[case], dtype=torch.float32).eval()
    compensate(ref, [{"heads": list(s.heads), "mlp": list(s.mlp)} for s in layers], tiny_tokens, mode="ls", damp=DAMP)
    ckpt = Checkpoint(tiny_models[case], overlay=tmp_path / "refit")
    for l, layer in enumerate(ref.model.layers):
        names = parent.spec.adapter.block_tensor_names(l)
        for key, proj in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj)):
            assert torch.allclose(ckpt.read(names[f"{key}_w"]), proj.weight, atol=2e-4, rtol=1e-3), (l, key)
            assert torch.allclose(biases[names[f"{key}_b"]], proj.bias, atol=2e-4, rtol=1e-3), (l, key)

    # the export reads the overlay (weights) and the biases: it computes what the refitted reference computes
    out = export_pruned(tiny_models[case], layers, tmp_path / "out", extra_biases=biases, overlay=tmp_path / "refit").out
    with torch.no_grad():
        logits = ref(tiny_tokens).logits[:, :-1].float()
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tiny_tokens[:, 1:].reshape(-1),
                                             reduction="none").reshape(tiny_tokens.shape[0], -1).mean(1)
    got = evaluate(StreamedModel.open(out), tiny_tokens, None, plan()).row_nll[0].float()
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got, want)


def test_the_refit_fits_the_dense_output_better_than_the_bias(tiny_models, tiny_tokens, tmp_path):
    # On its calibration windows the refitted model stays closer to the parent than the model that
    # keeps the original columns: its loss moves less from the parent's (a refit that fitted nothing,
    # or fitted towards zero, fails this).
    parent = StreamedModel.open(tiny_models["llama-gqa-tied"])
    layers = _pruned(parent, share=0.4)
    dense = evaluate(parent, tiny_tokens, None, plan()).nll.item()
    cut = evaluate(parent.with_layers(layers), tiny_tokens, None, plan()).nll.item()
    biases = refit_model(parent, layers, tiny_tokens, tmp_path / "refit")
    refitted = StreamedModel.open(tiny_models["llama-gqa-tied"])
    refitted = type(refitted)(root=refitted.root, spec=refitted.spec, layers=layers, biases=biases,
                              ckpt=Checkpoint(refitted.root, overlay=tmp_path / "refit"))
    fit = evaluate(refitted, tiny_tokens, None, plan()).nll.item()
    assert abs(fit - dense) < 0.5 * abs(cut - dense), (dense, cut, fit)


def test_an_overlay_of_another_model_is_refused(tiny_models, tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "refit").mkdir()
    save_file({"model.layers.0.mlp.down_proj.weight": torch.zeros(3, 3)}, str(tmp_path / "refit" / "refit-00000.safetensors"))
    with pytest.raises(CheckpointError, match="same shape"):
        Checkpoint(tiny_models["llama-gqa-tied"], overlay=tmp_path / "refit")


def test_a_finished_search_is_refitted_on_re_export_and_the_budget_is_checked_first(tiny_models, tmp_path, monkeypatch):
    # --refit is not part of the run's settings: the same run directory, asked again with --refit ls,
    # resumes the finished search (no sub-model evaluated again) and exports refitted projections.
    from dataclasses import replace

    from conftest import prunable_model

    from bonsai_lite.config import CalibConfig, RunConfig, SearchConfig
    from bonsai_lite.errors import BudgetError
    from bonsai_lite.prune.api import prune

    model, text = prunable_model(tiny_models["llama-gqa-tied"], tmp_path)
    cfg = RunConfig(model=str(model), out=str(tmp_path / "out"), calib=CalibConfig(text=str(text), samples=2, seq_len=16),
                    search=SearchConfig(method="bonsai", sparsity=0.4, p_iter=0.2, masks_per_iter=8, seed=1), device="cpu",
                    refit_samples=4)
    first = prune(cfg, run_dir=tmp_path / "run")
    plain = Checkpoint(tmp_path / "out")
    name = "model.layers.0.mlp.down_proj.weight"
    before = plain.read(name).clone()
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().count('"evaluate"')
    second = prune(replace(cfg, refit="ls"), run_dir=tmp_path / "run", overwrite=True)
    assert second["history"] == first["history"]
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count('"evaluate"') == metrics  # no search again
    after = Checkpoint(tmp_path / "out").read(name)
    assert after.shape == before.shape and not torch.allclose(after, before)
    assert "refit" in (tmp_path / "run" / "metrics.jsonl").read_text()

    # the refit's memory is checked with the other inputs, before the search: a model whose refit
    # needs more than the budget (monkeypatched: a tiny model's refit always fits) is refused at once
    from bonsai_lite.prune import refit as R

    spec = StreamedModel.open(model).spec
    assert R.refit_peak_bytes(spec, 64, 16) < R.refit_peak_bytes(spec, 6400, 16)
    monkeypatch.setattr(R, "refit_peak_bytes", lambda *a, **k: 10**15)
    with pytest.raises(BudgetError, match="--refit ls needs about"):
        prune(replace(cfg, refit="ls", out=str(tmp_path / "out2")), run_dir=tmp_path / "run2")
    assert not (tmp_path / "run2").exists() and not (tmp_path / "out2").exists()


def test_refit_loop_searches_the_refitted_model_and_resumes_bit_identical(tiny_models, tmp_path):
    # --refit loop refits after every iteration but the last. Killed right after iteration 1 is
    # committed, the run directory holds that iteration's refit, equal to refit_model run directly
    # on the committed structure; resumed, the run ends bit-identical to an uninterrupted one, and
    # its second iteration saw another model than --refit ls's (whose dense loss differs).
    import os
    import signal
    import subprocess

    from safetensors.torch import load_file

    from conftest import prunable_model
    from bonsai_lite.calib.data import calibration_tokens
    from bonsai_lite.prune.loop import LOOP_REFIT_DIR
    from bonsai_lite.prune.state import RunState, layers_from_json

    model, text = prunable_model(tiny_models["llama-gqa-tied"], tmp_path)
    repo = Path(__file__).resolve().parents[2]

    def run(out, refit="loop", fault=None):
        argv = [sys.executable, "-m", "bonsai_lite.cli.main", "prune", str(model), "--sparsity", "0.4", "--p-iter", "0.2",
                "--masks-per-iter", "8", "--calib-samples", "2", "--seq-len", "16", "--calib", str(text), "--out",
                str(out), "--device", "cpu", "--seed", "3", "--refit", refit, "--refit-samples", "3", "--regression", "unit"]
        env = {k: v for k, v in os.environ.items() if k != "BONSAI_LITE_FAULT"}
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(repo), TQDM_DISABLE="1", **({"BONSAI_LITE_FAULT": fault} if fault else {}))
        return subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=300)

    killed = run(tmp_path / "out", fault="iteration:1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    meta = RunState(tmp_path / "out.run").load().meta
    assert meta["iteration"] == 1 and meta["refit_overlay"] == "0001"
    from bonsai_lite.calib.data import load_tokenizer, read_text, tokenize

    tokens = calibration_tokens(tokenize(load_tokenizer(str(model)), read_text(str(text))), samples=3, seq_len=16, seed=3)
    parent = StreamedModel.open(model)
    refit_model(parent, layers_from_json(meta["layers"]), tokens, tmp_path / "direct")
    direct = load_file(tmp_path / "direct" / "refit-00000.safetensors")
    looped = load_file(tmp_path / "out.run" / LOOP_REFIT_DIR / "0001" / "refit-00000.safetensors")
    assert direct.keys() == looped.keys()
    for name in direct:
        torch.testing.assert_close(looped[name], direct[name], rtol=0, atol=0)

    assert run(tmp_path / "out").returncode == 0
    ref = run(tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    a = {k: v for f in sorted((tmp_path / "ref").glob("*.safetensors")) for k, v in load_file(f).items()}
    b = {k: v for f in sorted((tmp_path / "out").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert list((tmp_path / "ref.run" / LOOP_REFIT_DIR).iterdir()) == [tmp_path / "ref.run" / LOOP_REFIT_DIR / "0001"]

    ls = run(tmp_path / "ls", refit="ls")
    assert ls.returncode == 0, ls.stderr[-2000:]
    loop_hist = RunState(tmp_path / "ref.run").load().meta["history"]
    ls_hist = RunState(tmp_path / "ls.run").load().meta["history"]
    assert loop_hist[0]["dense_nll"] == ls_hist[0]["dense_nll"]  # the same parent in iteration 1
    assert loop_hist[1]["dense_nll"] != ls_hist[1]["dense_nll"]  # iteration 2 searched the refitted model


def test_refit_auto_refits_with_the_residual_prior_when_it_fits_the_budget(tiny_models, monkeypatch):
    # the CLI's defaults: --refit auto is ls when the refit fits --memory-budget, and --fluctuation auto
    # is residual when the run refits; under a budget the refit does not fit, both fall back
    from bonsai_lite.config import CalibConfig, RunConfig, SearchConfig
    from bonsai_lite.prune import api
    from bonsai_lite.prune import refit as R

    spec = StreamedModel.open(tiny_models["llama-gqa-tied"]).spec
    cfg = RunConfig(model="m", out="o", calib=CalibConfig(text=None, samples=2, seq_len=16, prior_samples=64),
                    search=SearchConfig(method="bonsai", sparsity=0.4, p_iter=0.2, masks_per_iter=8), refit="auto",
                    refit_samples=32)
    assert cfg.search.fluctuation == "auto"
    big = api._resolve_refit(cfg, spec, 10**12)
    assert (big.refit, big.search.fluctuation) == ("auto", "residual")  # the text's length decides the rest
    # the length check: 2 search windows of 16 tokens, refit windows of 64 (the prior pass's length)
    text = api._resolve_refit(replace_cfg(cfg, calib=CalibConfig(text=None, samples=2, seq_len=16, prior_seq_len=64)),
                              spec, 10**12)
    assert text.refit == "auto" and text.refit_seq_len == 64
    assert api._check_length(text, torch.zeros(10**5, dtype=torch.long)).refit == "ls"
    short = api._check_length(text, torch.zeros(3 * 64 + 1, dtype=torch.long))
    assert (short.refit, short.refit_samples) == ("ls", 3)  # as many refit windows as the text holds
    assert api._check_length(text, torch.zeros(40, dtype=torch.long)).refit == "off"  # not one: no refit
    with pytest.raises(BonsaiError, match="too short for the refit"):  # an explicit --refit ls needs them all
        api._check_length(replace_cfg(text, refit="ls"), torch.zeros(3 * 64, dtype=torch.long))
    need = R.refit_peak_bytes(spec, cfg.refit_samples * cfg.refit_seq_len, cfg.refit_seq_len)
    small = api._resolve_refit(cfg, spec, need - 1)
    assert (small.refit, small.search.fluctuation) == ("off", "variance")
    explicit = api._resolve_refit(replace_search(cfg, fluctuation="variance"), spec, 10**12)
    assert (explicit.refit, explicit.search.fluctuation) == ("auto", "variance")  # an explicit choice is kept
    off = api._resolve_refit(replace_cfg(cfg, refit="off"), spec, 10**12)
    assert (off.refit, off.search.fluctuation) == ("off", "variance")
    resumed = api._resolve_refit(cfg, spec, 10**12, earlier="variance")  # a run searched without the refit
    assert (resumed.refit, resumed.search.fluctuation) == ("auto", "variance")
    few = replace_cfg(cfg, calib=CalibConfig(text=None, samples=2, seq_len=16))  # 32 rows for a 64-wide MLP
    assert R.widest_input(spec) * R.RESIDUAL_TOKENS_PER_INPUT > 32
    assert api._resolve_refit(few, spec, 10**12).search.fluctuation == "variance"


def replace_cfg(cfg, **kw):
    from dataclasses import replace

    return replace(cfg, **kw)


def replace_search(cfg, **kw):
    from dataclasses import replace

    return replace(cfg, search=replace(cfg.search, **kw))


def test_refit_auto_leaves_out_a_refit_predicted_to_take_much_longer_than_the_search(tiny_models, tmp_path, monkeypatch):
    # an 8B model's float32 refit on a small CPU takes hours: --refit auto runs it only when the planner
    # predicts at most REFIT_TIME_RATIO x the search's time (an explicit --refit ls always runs it)
    from dataclasses import replace

    from conftest import prunable_model

    from bonsai_lite.config import CalibConfig, RunConfig, SearchConfig
    from bonsai_lite.prune import api
    from bonsai_lite.search import machine, pass_costs

    model, text = prunable_model(tiny_models["llama-gqa-tied"], tmp_path)
    cfg = RunConfig(model=str(model), out=str(tmp_path / "out"), calib=CalibConfig(text=str(text), samples=2, seq_len=16),
                    search=SearchConfig(method="bonsai", sparsity=0.4, p_iter=0.2, masks_per_iter=8), device="cpu",
                    refit="auto", refit_samples=4)
    spec = StreamedModel.open(model).spec
    ratio = api.REFIT_TIME_RATIO
    assert api._resolve_refit(cfg, spec, 10**12, seconds=(10.0, 10.0 * ratio)).refit == "auto"
    assert api._resolve_refit(cfg, spec, 10**12, seconds=(10.0, 10.0 * ratio + 0.1)).refit == "off"
    search, refit = api._search_and_refit_seconds(cfg, spec, machine.detect_machine(device="cpu", budget=None))
    assert search > 0 and refit > 0
    assert api._check_inputs(cfg, overwrite=False)[0].refit == "ls"  # the tiny model's refit is cheap
    monkeypatch.setattr(pass_costs, "refit_seconds", lambda *a, **k: 1.01 * ratio * search * 100)
    assert api._check_inputs(cfg, overwrite=False)[0].refit == "off"
    assert api._check_inputs(replace(cfg, refit="ls"), overwrite=False)[0].refit == "ls"


def test_refit_samples_auto_takes_the_most_windows_that_fit(tiny_models, tmp_path):
    # --refit-samples auto (the default): the largest count of the ladder whose refit fits the memory
    # budget (and the time test it is given); in a run, no more windows than the text holds, where an
    # explicit count the text cannot hold is refused before any work
    import json

    from conftest import prunable_model

    from bonsai_lite.calib.data import load_tokenizer, read_text, tokenize
    from bonsai_lite.config import CalibConfig, RunConfig, SearchConfig
    from bonsai_lite.prune import refit as R
    from bonsai_lite.prune.api import prune

    spec = StreamedModel.open(tiny_models["llama-gqa-tied"]).spec
    peak = lambda n: R.refit_peak_bytes(spec, n * 64, 64)  # noqa: E731
    assert R.REFIT_SAMPLES_LADDER[0] == 128 and peak(128) > peak(64) > peak(32)
    assert R.auto_refit_samples(spec, 64, 10**15) == 128
    assert R.auto_refit_samples(spec, 64, peak(64)) == 64
    assert R.auto_refit_samples(spec, 64, peak(64) - 1) == 32
    assert R.auto_refit_samples(spec, 64, 1) == R.REFIT_SAMPLES_LADDER[-1]  # none fits: the caller refuses it
    assert R.auto_refit_samples(spec, 64, 10**15, lambda n: n <= 32) == 32

    model, text = prunable_model(tiny_models["llama-gqa-tied"], tmp_path)
    held = tokenize(load_tokenizer(str(model)), read_text(str(text))).numel() // 64
    assert 0 < held < 128
    cfg = RunConfig(model=str(model), out=str(tmp_path / "out"), device="cpu", refit="ls",
                    calib=CalibConfig(text=str(text), samples=2, seq_len=16, prior_samples=4, prior_seq_len=64),
                    search=SearchConfig(method="bonsai", sparsity=0.4, p_iter=0.2, masks_per_iter=8, seed=1))
    with pytest.raises(BonsaiError, match="too short for the refit: 128 windows"):
        prune(replace_cfg(cfg, refit_samples=128), run_dir=tmp_path / "explicit")
    assert not (tmp_path / "explicit").exists()
    prune(cfg, run_dir=tmp_path / "run")
    stages = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [s["tokens"] for s in stages if s.get("stage") == "refit"] == [held * 64]
