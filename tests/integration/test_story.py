"""The demo's code path, `bonsai-lite report` and the progress/metrics plumbing on a tiny model.

Reference paths: the demo's perplexities and greedy continuations against whole-model
transformers; the report's parent widths against the parent checkpoint; the metrics file's stages
against what the run state says happened.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from bonsai_lite.demo_story import PLOT_NAME, REPORT_NAME, DemoSettings, render, run_demo
from bonsai_lite.plots import is_png
from tests.conftest import make_tiny_model, prunable_model

pytestmark = pytest.mark.integration
matplotlib = pytest.importorskip("matplotlib")

SETTINGS = DemoSettings(sparsity=0.3, p_iter=0.15, masks_per_iter=6, calib_samples=2, calib_seq_len=16,
                        adapt_steps=3, adapt_batch=2, adapt_seq_len=16, adapt_rank=4, eval_tokens=160,
                        eval_seq_len=32, prompt="the", new_tokens=6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("story")
    return prunable_model(make_tiny_model(root / "parent", "llama-gqa-tied", seed=3), root)


@pytest.fixture(scope="module")
def demo(tiny, tmp_path_factory):
    model, text = tiny
    work = tmp_path_factory.mktemp("work")
    return work, run_demo(model, work, calib=text, eval_text=text, adapt_text=text, settings=SETTINGS)


def _reference_ppl(model_dir, text, s: DemoSettings) -> float:
    from transformers import AutoModelForCausalLM

    from bonsai_lite.calib.data import load_tokenizer, read_text, tokenize, windows

    ids = windows(tokenize(load_tokenizer(model_dir), read_text(text)), s.eval_seq_len, max_tokens=s.eval_tokens)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=True).eval()
    with torch.no_grad():
        nll = [model(w[None], labels=w[None]).loss.item() for w in ids]
    return math.exp(sum(nll) / len(nll))


def test_demo_table_json_and_plot(demo, tiny):
    work, report = demo
    names = [r["name"] for r in report["models"]]
    assert names == ["parent", "pruned", "pruned+adapted"]
    parent, pruned, adapted = report["models"]
    assert pruned["params"] < parent["params"] and adapted["params"] == pruned["params"]
    assert pruned["bytes"] < parent["bytes"]
    assert json.loads((work / REPORT_NAME).read_text()) == json.loads(json.dumps(report))
    assert report["plot"] == str(work / PLOT_NAME) and is_png(report["plot"])
    table = render(report)
    for r in report["models"]:
        assert f"{r['perplexity']:.2f}" in table and f"{r['params']:,d}" in table
        assert " ".join(r["text"].split()) in table
    assert table.splitlines()[-1] == f"plot: {report['plot']}"


def test_demo_measures_like_transformers(demo, tiny):
    """The streamed perplexity and the cached greedy decoder against whole-model transformers."""
    from transformers import AutoModelForCausalLM

    from bonsai_lite.calib.data import load_tokenizer

    _, report = demo
    _, text = tiny
    for row in report["models"]:
        assert row["perplexity"] == pytest.approx(_reference_ppl(row["dir"], text, SETTINGS), rel=1e-4)
    tok = load_tokenizer(report["models"][0]["dir"])
    prompt = tok(SETTINGS.prompt, return_tensors="pt", add_special_tokens=False).input_ids
    for row in report["models"]:
        model = AutoModelForCausalLM.from_pretrained(row["dir"], dtype=torch.float32, trust_remote_code=True).eval()
        ids = prompt
        with torch.no_grad():  # greedy without a cache: the whole sequence again for every token
            for _ in range(SETTINGS.new_tokens):
                ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
        want = SETTINGS.prompt + tok.decode(ids[0, prompt.shape[1]:], skip_special_tokens=True)
        assert row["text"] == want, row["name"]


def test_report_of_the_demo_run(demo, tiny, capsys):
    """Parent widths rebuilt from the run directory alone equal the parent checkpoint's."""
    from bonsai_lite.cli import main as cli
    from bonsai_lite.io.model import StreamedModel

    work, report = demo
    run_dir = report["prune"]["run_dir"]
    assert cli.main(["report", run_dir, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    parent = StreamedModel.open(tiny[0])
    pruned = StreamedModel.open(report["models"][1]["dir"])
    assert rep["widths_before"] == {"heads": [len(s.heads) for s in parent.layers],
                                    "mlp": [len(s.mlp) for s in parent.layers]}
    assert rep["widths_after"] == {"heads": [len(s.heads) for s in pruned.layers],
                                   "mlp": [len(s.mlp) for s in pruned.layers]}
    assert len(rep["history"]) == report["prune"]["iterations"] == 2
    assert set(rep["stage_seconds"]) == {"0", "1", "-"} and set(rep["stage_seconds"]["-"]) == {"refit", "export"}
    assert {"priors", "evaluate", "regression"} <= set(rep["stage_seconds"]["0"])
    assert is_png(rep["plot"])
    assert cli.main(["report", run_dir, "--no-plot"]) == 0
    text = capsys.readouterr().out
    assert "iter" in text and f"{parent.layers[0].heads.__len__():>3} -> " in text


def test_metrics_file_lists_every_stage(demo):
    _, report = demo
    lines = [json.loads(x) for x in (open(f"{report['prune']['run_dir']}/metrics.jsonl").read().splitlines())]
    stages = [(m["stage"], m.get("iteration")) for m in lines]
    assert stages == [("priors", 0), ("evaluate", 0), ("regression", 0), ("iteration", 0),
                      ("priors", 1), ("evaluate", 1), ("regression", 1), ("iteration", 1), ("refit", None),
                      ("export", None)]
    for m in lines:
        if m["stage"] in ("priors", "evaluate", "refit"):
            assert m["seconds"] > 0 and m["tokens"] > 0 and m["predicted_seconds"] > 0
            assert m["peak_rss_bytes"] is None or m["peak_rss_bytes"] > 0
    # each iteration's time left is the planner's rest scaled by the pace of the stages before it
    planned = [m for m in lines if m.get("predicted_seconds")]
    iters = [(i, m) for i, m in enumerate(lines) if m["stage"] == "iteration"]
    for i, m in iters:
        before = [p for p in planned if lines.index(p) < i]
        assert m["pace"] == pytest.approx(sum(p["seconds"] for p in before) / sum(p["predicted_seconds"] for p in before),
                                          rel=0.05)
    rest = [m["predicted_seconds_left"] / m["pace"] for _, m in iters]  # per unit of pace: shrinks as the run goes
    assert rest[0] > rest[1] > 0  # the second iteration and the refit, then the refit alone
    adapted = report["models"][2]["dir"]
    lines = [json.loads(x) for x in open(f"{adapted}.run/metrics.jsonl").read().splitlines()]
    assert [m["stage"] for m in lines] == ["train", "export"]  # no teacher: the demo adapts without distillation
    s = SETTINGS
    assert lines[0]["steps"] == s.adapt_steps and lines[0]["tokens"] == s.adapt_steps * s.adapt_batch * s.adapt_seq_len


def test_report_refuses_a_directory_without_a_run(tmp_path, capsys):
    from bonsai_lite.cli import main as cli

    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no state.json" in err[0]


@pytest.mark.parametrize("command", ["prune", "demo"])
def test_json_stdout_is_clean(tiny, tmp_path, capsys, command):
    """--json: the last stdout line parses and no bar reaches stdout; without it bars go to stderr only."""
    from bonsai_lite.cli import main as cli

    model, text = tiny
    if command == "prune":
        argv = lambda out: ["prune", str(model), "--sparsity", "0.2", "--out", str(out), "--calib", str(text),  # noqa: E731
                            "--preset", "quick", "--masks-per-iter", "4", "--calib-samples", "2", "--seq-len", "16",
                            "--regression", "unit"]
    else:
        argv = lambda out: ["demo", "--model", str(model), "--workdir", str(out), "--calib", str(text),  # noqa: E731
                            "--masks-per-iter", "4", "--adapt-steps", "2", "--eval-tokens", "1024", "--no-plot"]
    assert cli.main(argv(tmp_path / "a") + ["--json"]) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert isinstance(json.loads(lines[-1]), dict)
    for stream in (out, err):
        assert "%|" not in stream and "\r" not in stream
    assert cli.main(argv(tmp_path / "b")) == 0
    out, err = capsys.readouterr()
    assert "%|" not in out and "\r" not in out
    assert "evaluate" in err and "%|" in err  # the bars were drawn, on stderr
    assert cli.main(argv(tmp_path / "c") + ["--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "%|" not in out + err  # --quiet: no bars


def test_default_prune_of_a_small_target_is_flap_on_the_replaced_steps_windows(tiny, tmp_path, capsys):
    # `prune --preset standard --sparsity 0.2` as a user runs it: --regression auto (no sub-models at 4 x 128
    # tokens each) and --first-step auto (one step with the residual metric, its dense pass over the four
    # replaced steps' windows) rank as `--method flap` given those windows; --allocation auto then picks the
    # split among the offsets' sub-models: with --allocation prior the export is exactly FLAP's, and the
    # default's is too exactly when the prior's own allocation won
    from safetensors.torch import load_file

    from bonsai_lite.cli import main as cli

    model, text = tiny
    common = ["--sparsity", "0.2", "--calib", str(text), "--preset", "standard", "--prior-seq-len", "32",
              "--refit-samples", "4", "--device", "cpu", "--json"]
    runs = {}
    for name, extra in (("default", []), ("prior", ["--allocation", "prior"]),
                        ("flap", ["--method", "flap", "--prior-samples", "64"])):
        assert cli.main(["prune", str(model), "--out", str(tmp_path / name), *extra, *common]) == 0
        runs[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (searched,), (prior,) = runs["default"]["history"], runs["prior"]["history"]
    assert prior["forward_tokens"] == 4 * 16 * 32 and "allocation" not in prior
    assert searched["forward_tokens"] == 4 * 16 * 32 + searched["allocation_tokens"] > 4 * 16 * 32

    def weights(d):
        return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}

    flap = weights(tmp_path / "flap")
    for name in ("prior", "default") if searched["allocation"] == [0.0, 0.0] else ("prior",):
        ours = weights(tmp_path / name)
        assert ours.keys() == flap.keys()
        for k in ours:
            torch.testing.assert_close(ours[k], flap[k], rtol=0, atol=0)
    if searched["allocation"] != [0.0, 0.0]:  # another split: within a group the order is the prior's
        assert (searched["removed_heads"], searched["removed_mlp"]) != (prior["removed_heads"], prior["removed_mlp"])
