"""Silent wrong results and late failures turned into one clear line before any work (issue 11,
items 6-8 and 10-14).

Each case runs the CLI in-process on a tiny sharded model, expects exit 2 with one line (or a
warning, where the input is usable), checks that no forward pass ran where the error must come
first, and that the inputs and an earlier output and run state are byte-for-byte unchanged.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import bonsai_lite.export.safetensors as export_mod
import bonsai_lite.io.outdir as outdir_mod
import bonsai_lite.prune.loop as loop_mod
from bonsai_lite.adapt.merge import export_adapted
from bonsai_lite.cli.main import main
from bonsai_lite.export import export_pruned
from bonsai_lite.structure import load_spec
from conftest import make_tiny_model, observe
from test_bad_inputs import copy_model, done, fails, prune_args, snapshot, untouched  # noqa: F401 (fixtures)

pytestmark = pytest.mark.integration
torch.set_num_threads(1)
Q0 = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture
def no_forward(monkeypatch):
    """Fails the test if the search evaluates anything: every error here must come before the work."""
    def refuse(*a, **k):
        raise AssertionError("a forward pass ran before the error")
    monkeypatch.setattr(loop_mod, "evaluate", refuse)


def edit_config(model: Path, **changes) -> Path:
    cfg = json.loads((model / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (model / "config.json").write_text(json.dumps(cfg))
    return model


def edit_tensors(model: Path, fn) -> Path:
    """Apply fn(name -> tensor dict) to every shard, rewriting the index's weight map to match."""
    index = model / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"] = {}
    for f in sorted(model.glob("*.safetensors")):
        tensors = fn(dict(load_file(f)))
        save_file(tensors, str(f), metadata={"format": "pt"})
        doc["weight_map"].update({k: f.name for k in tensors})
    index.write_text(json.dumps(doc))
    return model


def in_shard_of(name, change):
    return lambda t: change(t) if name in t else t


# ---- item 6: resume of a model that changed at the same path ----------------------------------------

def test_resume_refuses_a_model_that_changed_shape(done, tmp_path, capsys, no_forward, monkeypatch):
    """Item 6: the model at the same path replaced by a wider one (MLP 96 -> 128) used to 'resume'
    from masks of the old one and export."""
    _, model, calib, _ = done
    m = copy_model(model, tmp_path / "m")
    out = tmp_path / "o"
    monkeypatch.undo()  # the first run searches for real
    assert main(prune_args(m, calib, out)) == 0
    monkeypatch.setattr(loop_mod, "evaluate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("forward")))
    wider = make_tiny_model(tmp_path / "wider", "llama-gqa-tied", shapes=dict(intermediate_size=128))
    for f in m.glob("*.safetensors"):
        f.unlink()
    for f in [*wider.glob("*.safetensors"), wider / "model.safetensors.index.json", wider / "config.json"]:
        shutil.copy(f, m / f.name)
    before = snapshot(m, out, Path(f"{out}.run"))
    fails(prune_args(m, calib, out, "--overwrite"), capsys, "different settings", "model_layout_sha256", "--restart")
    assert snapshot(m, out, Path(f"{out}.run")) == before


# ---- item 7: integer-quantised checkpoints ----------------------------------------------------------

def _int8_with_scales(t):
    t = dict(t)
    t[Q0] = t[Q0].clamp(-1, 1).mul(127).round().to(torch.int8)
    t[Q0.replace(".weight", ".SCB")] = torch.ones(t[Q0].shape[0])
    return t


@pytest.mark.parametrize("variant", ["quantization_config", "int8+SCB", "int8 only"])
def test_quantised_checkpoint_is_refused(done, untouched, tmp_path, capsys, no_forward, variant):
    """Item 7: integer weights (+ .SCB scales, + quantization_config) were read as floats and pruned."""
    _, model, calib, _ = done
    m = copy_model(model, tmp_path / "m")
    if variant == "quantization_config":
        edit_config(m, quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True})
    elif variant == "int8+SCB":
        edit_tensors(m, in_shard_of(Q0, _int8_with_scales))
    else:
        edit_tensors(m, in_shard_of(Q0, lambda t: {**t, Q0: t[Q0].mul(50).to(torch.int8)}))
    before = snapshot(m)
    fails(prune_args(m, calib, untouched), capsys, "dequantise it first",
          "not a float" if variant == "int8 only" else "quantised checkpoint")
    assert snapshot(m) == before


# ---- item 8: config and tensors that disagree ---------------------------------------------------------

@pytest.mark.parametrize("case,needles", [
    ("one matrix float16", ("is float16 while the other weight matrices are float32",)),
    ("intermediate_size smaller", ("config.json implies", "intermediate_size 64")),
    ("negative heads", ("num_attention_heads = -6",)),
], ids=["one matrix float16", "intermediate_size smaller than the tensors", "negative heads"])
def test_config_that_disagrees_with_the_tensors(done, tmp_path, capsys, case, needles):
    """Item 8: config.json and tensor headers that disagree used to give a perplexity and an export
    (eval, then prune)."""
    _, model, calib, _ = done
    m = copy_model(model, tmp_path / "m")
    if case == "one matrix float16":
        edit_tensors(m, in_shard_of(Q0, lambda t: {**t, Q0: t[Q0].half()}))
    elif case == "intermediate_size smaller":
        edit_config(m, intermediate_size=64)
    else:
        edit_config(m, num_attention_heads=-6)
    before = snapshot(m)
    for argv in (["eval", str(m), "--data", str(calib), "--seq-len", "16", "--device", "cpu"],
                 prune_args(m, calib, tmp_path / "new")):
        fails(argv, capsys, *needles)
    assert snapshot(m) == before and not (tmp_path / "new").exists()


# ---- item 10: nan, dropped tokens, text that is not text -------------------------------------------------

@pytest.mark.parametrize("flags,needle", [
    (["--seq-len", "1"], "--seq-len must be at least 2"),
    (["--seq-len", "16", "--max-tokens", "-5"], "--max-tokens must be at least --seq-len (16), got -5"),
], ids=["eval --seq-len 1 (printed nan)", "eval --max-tokens -5 (dropped 5 tokens)"])
def test_eval_arguments_that_gave_nan_or_dropped_tokens(done, capsys, flags, needle):
    _, model, calib, _ = done
    fails(["eval", str(model), "--data", str(calib), "--device", "cpu", *flags], capsys, needle)


def test_negative_rms_norm_eps(done, tmp_path, capsys):
    """Item 10: rms_norm_eps < 0 printed nan and exited 0."""
    _, model, calib, _ = done
    m = edit_config(copy_model(model, tmp_path / "m"), rms_norm_eps=-1e-6)
    fails(["eval", str(m), "--data", str(calib), "--seq-len", "16", "--device", "cpu"], capsys, "rms_norm_eps")


@pytest.mark.parametrize("kind", ["random bytes", "latin-1", "unknown words"])
def test_text_that_is_not_text_warns(done, tmp_path, caplog, kind):
    """Item 10: random bytes, Latin-1 text and text of unknown words were accepted without a word;
    now used with a warning."""
    _, model, calib, _ = done
    data = tmp_path / "data.txt"
    if kind == "random bytes":
        data.write_bytes(torch.randint(0, 256, (6000,), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
                         .numpy().tobytes())
    elif kind == "latin-1":
        # "café" appended too: the fixture's calibration text need not contain " the " (no shared/ data)
        text = calib.read_text()[:6000].replace(" the ", " café ") + " un café noir "
        data.write_bytes(text.encode("latin-1", errors="replace"))
    else:
        data.write_text(" ".join(f"zq{i}x" for i in range(2000)))
    with caplog.at_level("WARNING"):
        assert main(["eval", str(model), "--data", str(data), "--seq-len", "16", "--device", "cpu"]) == 0
    want = {"random bytes": "not valid UTF-8", "latin-1": "not valid UTF-8", "unknown words": "unknown or raw-byte"}
    assert want[kind] in caplog.text
    for r in caplog.records:
        if r.levelname == "WARNING":
            observe(f"warning: {r.getMessage()}")


def test_clean_text_does_not_warn(done, tmp_path, caplog):
    """The same check stays quiet on text made of the tokenizer's own words (the tiny word-level
    tokenizer knows only 210 words, so real prose is mostly unknown to it)."""
    from bonsai_lite.calib.data import load_tokenizer

    _, model, _, _ = done
    words = [w for w in load_tokenizer(model).convert_ids_to_tokens(list(range(1, 211))) if w.isalnum()]
    data = tmp_path / "clean.txt"
    data.write_text(" ".join(words * 20))
    with caplog.at_level("WARNING"):
        assert main(["eval", str(model), "--data", str(data), "--seq-len", "16", "--device", "cpu"]) == 0
    assert "UTF-8" not in caplog.text and "raw-byte" not in caplog.text


# ---- item 11: the destination and free space, before the search ------------------------------------------

@pytest.mark.parametrize("where", ["the model", "a file", "above the model", "run dir inside out"])
def test_bad_destination_is_refused_before_the_search(done, tmp_path, capsys, no_forward, where):
    """Item 11: prune --out onto the model, a file, a folder above the model, or around --run-dir
    was refused only after the search."""
    _, model, calib, _ = done
    root = tmp_path / "models"
    m = copy_model(model, root / "m")
    (tmp_path / "file").write_text("mine")
    out, extra = {"the model": (m, []), "a file": (tmp_path / "file", []), "above the model": (root, []),
                  "run dir inside out": (tmp_path / "o", ["--run-dir", str(tmp_path / "o" / "run")])}[where]
    before = snapshot(root, tmp_path / "file")
    needle = {"a file": "exists and is not a directory", "run dir inside out": "inside --out"}.get(
        where, "writing there would replace it")
    fails(prune_args(m, calib, out, "--overwrite", *extra), capsys, needle)
    assert snapshot(root, tmp_path / "file") == before
    assert not list(tmp_path.glob("*.run")) and not list(root.glob("*.run")) and not (tmp_path / "o").exists()


def test_too_little_disk_is_refused_before_the_search(done, tmp_path, capsys, no_forward, monkeypatch):
    """Item 11: free space for the export is checked before the search (1 byte free, simulated)."""
    _, model, calib, _ = done
    monkeypatch.setattr(outdir_mod.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1, 1))
    fails(prune_args(model, calib, tmp_path / "new"), capsys, "not enough disk space", "the pruned model")
    assert not (tmp_path / "new.run").exists()


def test_late_export_failure_says_how_to_export_from_the_saved_search(done, tmp_path, capsys, monkeypatch, caplog):
    """Item 11: a disk full during the export (simulated ENOSPC) names the run directory; following
    the advice (another --out with that --run-dir) exports without searching again."""
    _, model, calib, out = done
    new = tmp_path / "new"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(export_mod, "write_shard", full)
    line = fails(prune_args(model, calib, new), capsys, "disk full while exporting",
                 f"--run-dir {tmp_path / 'new.run'}", "re-run the same command to export again")
    assert "--out NEW_DIR" in line
    monkeypatch.undo()
    other = tmp_path / "elsewhere"
    with caplog.at_level("INFO"):  # the advice works: another --out with the saved run directory
        assert main(prune_args(model, calib, other, "--run-dir", str(tmp_path / "new.run"))) == 0
    assert "the search finished before" in caplog.text and (other / "config.json").is_file()


# ---- item 12: configs and flags that used to be tracebacks or silent ------------------------------------

CONFIG_CASES = {
    "KV heads not dividing": (dict(num_key_value_heads=4), "not a multiple of num_key_value_heads"),
    "zero KV heads": (dict(num_key_value_heads=0), "num_key_value_heads = 0"),
    "zero heads": (dict(num_attention_heads=0), "num_attention_heads = 0"),
    "odd head_dim": (dict(head_dim=7), "head_dim"),
    "head_dim mismatch": (dict(head_dim=24), "config.json implies"),
    "unknown hidden_act": (dict(hidden_act="swishy"), "unknown hidden_act 'swishy'"),
    "unknown rope type": (dict(rope_parameters={"rope_type": "bogus", "rope_theta": 10000.0}), "rope"),
    "vocab 0": (dict(vocab_size=0), "vocab_size = 0"),
    "10^9 layers": (dict(num_hidden_layers=10**9), "num_hidden_layers = 1000000000"),
    "string width": (dict(hidden_size="72"), "hidden_size = '72'"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_is_one_line(done, tmp_path, capsys, no_forward, case):
    """Item 12: configs that were tracebacks (or, with 10^9 layers, an 8 GB hang in `plan`): prune, then plan."""
    _, model, calib, _ = done
    changes, needle = CONFIG_CASES[case]
    m = edit_config(copy_model(model, tmp_path / "m"), **changes)
    before = snapshot(m)
    fails(prune_args(m, calib, tmp_path / "new"), capsys, needle)
    fails(["plan", str(m), "--memory-budget", "1GB"], capsys, needle) if case != "head_dim mismatch" else None
    assert snapshot(m) == before and not (tmp_path / "new.run").exists()


def test_shape_mismatched_tensor(done, tmp_path, capsys, no_forward):
    """Item 12: a tensor with fewer rows than the config implies was a traceback."""
    _, model, calib, _ = done
    m = edit_tensors(copy_model(model, tmp_path / "m"), in_shard_of(Q0, lambda t: {**t, Q0: t[Q0][:48].clone()}))
    fails(prune_args(m, calib, tmp_path / "new"), capsys, repr(Q0), "has shape [48, 72]", "implies [72, 72]")


FLAG_CASES = [
    (["--seq-len", "0"], "--seq-len must be at least 2"),
    (["--calib-samples", "0"], "--calib-samples must be at least 1"),
    (["--p-iter", "0.001"], "--p-iter 0.001 removes", "less than one unit of this model"),
    (["--device", "tpu:9"], "runs on cpu or cuda"),
    (["--memory-budget", "0"], "memory budget '0' is zero"),
    (["--sparsity", "0.999"], "--sparsity must be at most 0.9"),
    (["--keep-spread", "5"], "--keep-spread must be in [0, 1]"),
    # was "only 2 of 2 sub-models have a finite loss (at least 4 are needed)" after the first pass
    (["--method", "bonsai", "--masks-per-iter", "2"], "--masks-per-iter must be at least 4 for bonsai's regression"),
    (["--device", "cpu", "--allow-8bit"], "8-bit weights run on CUDA only", "drop --allow-8bit"),
]
if not torch.cuda.is_available():
    FLAG_CASES.append((["--device", "cuda"], "CUDA is not available here"))


@pytest.mark.parametrize("flags,needles", [(c[0], c[1:]) for c in FLAG_CASES], ids=[" ".join(c[0]) for c in FLAG_CASES])
def test_bad_flag_is_one_line_before_any_work(done, untouched, capsys, no_forward, flags, needles):
    """Item 12: flags that were tracebacks, late failures or silently ignored."""
    _, model, calib, _ = done
    fails(prune_args(model, calib, untouched, *flags), capsys, *needles)


def test_plan_refuses_8bit_weights_for_a_cpu(done, capsys):
    """`plan --allow-8bit` for a CPU printed a plan without them; it now refuses as `prune` does."""
    _, model, _, _ = done
    fails(["plan", str(model), "--memory-budget", "1GB", "--device", "cpu", "--allow-8bit"], capsys,
          "8-bit weights run on CUDA only", "--device cuda")
    assert main(["plan", str(model), "--memory-budget", "1GB", "--device", "cuda", "--allow-8bit"]) == 0


# ---- item 13: exported directories follow the umask -------------------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o002], ids=["umask 022", "umask 002"])
def test_exports_follow_the_umask(done, tmp_path, mask):
    """Item 13: prune and adapt exports were mode 0700 (mkdtemp) whatever the umask; now the same mode
    as a directory made with mkdir."""
    _, model, _, _ = done
    old = os.umask(mask)
    try:
        pruned = export_pruned(model, load_spec(model).layers, tmp_path / "pruned").out
        adapted = export_adapted(pruned, tmp_path / "adapted")
        plain = tmp_path / "plain"
        plain.mkdir()
    finally:
        os.umask(old)
    for d in (pruned, adapted):
        assert stat.S_IMODE(d.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o777 & ~mask, oct(mask)


# ---- item 14: a missing --calib path is never looked up on the hub ----------------------------------------

def test_missing_calib_path_is_not_a_dataset_lookup(done, untouched, capsys, monkeypatch, no_forward):
    """Item 14: a --calib path without a suffix that is not a file was looked up as a hub dataset;
    now only an explicit hf: name is (a fake `datasets` records the calls)."""
    _, model, _, _ = done
    calls = []
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(RuntimeError("offline"))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    for name in ("wikitext", "some/dir/calib"):
        fails(prune_args(model, name, untouched), capsys, f"{name}: text file not found", "hf:NAME")
    assert calls == []
    fails(prune_args(model, "hf:wikitext:wikitext-2-raw-v1", untouched), capsys, "could not load the dataset")
    assert calls == [("wikitext", "wikitext-2-raw-v1")]
