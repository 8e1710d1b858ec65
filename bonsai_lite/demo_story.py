"""The demo's story: parent vs pruned vs pruned + a short adaptation, measured the same way.

For each model: perplexity on the first tokens of an evaluation text, parameters, bytes on disk,
greedy decode tokens/s and the text it generates from one prompt. The report is a dict (the
`--json` output, also written to `demo.json`), rendered as a table by `render`, and drawn as
perplexity and speed against size next to the outputs (`demo.png`, when matplotlib is installed).

Settings are sized for 2 CPU cores and a 5-minute budget (docs/demo.md has the measurements
behind them); every field can be changed by the caller.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

REPORT_NAME = "demo.json"
PLOT_NAME = "demo.png"


@dataclass(frozen=True)
class DemoSettings:
    method: str = "bonsai"
    sparsity: float = 0.2
    # Search: one iteration (p_iter = sparsity) of few short calibration windows and few
    # sub-models: the smallest search that still regresses on perturbed sub-models.
    p_iter: float = 0.2
    masks_per_iter: int = 16
    calib_samples: int = 2
    calib_seq_len: int = 128
    # The priors and compensation means from their own 16 windows (2,048 tokens, a few seconds):
    # 2 windows are too few for FLAP's fluctuation score (the quick preset measured the same).
    prior_samples: int = 16
    # The least-squares refit of the kept o_proj / down_proj columns after the search, as
    # `bonsai-lite prune` does by default (--refit auto: where its memory fits), on 32 windows of 128
    # (prune's --refit-samples auto would take 128: a better model, 4x the refit's time).
    refit: str = "auto"
    refit_samples: int = 32
    # Adaptation: a few LoRA steps of plain next-token loss. Distillation (the paper's lambda =
    # 0.01) would first cost a parent forward over all the adaptation text for a small term.
    adapt_steps: int = 8
    adapt_batch: int = 2
    adapt_seq_len: int = 256
    adapt_rank: int = 16
    adapt_lr: float = 5e-4
    adapt_distill: float = 0.0
    # Evaluation and generation.
    eval_tokens: int = 2048
    eval_seq_len: int = 512
    prompt: str = "The history of the Roman Empire"
    new_tokens: int = 32
    seed: int = 0


def _model_row(name: str, path: Path, *, eval_text, s: DemoSettings, tokenizer) -> dict:
    import torch

    from bonsai_lite.eval.perplexity import perplexity
    from bonsai_lite.eval.speed import generation_speed

    t0 = time.perf_counter()
    ppl = perplexity(path, text=eval_text, seq_len=s.eval_seq_len, max_tokens=s.eval_tokens)
    prompt = tokenizer(s.prompt, return_tensors="pt", add_special_tokens=False).input_ids
    if tokenizer.bos_token_id is not None:
        prompt = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), prompt], 1)
    stop = tuple(i for i in (tokenizer.eos_token_id,) if i is not None)
    gen = generation_speed(path, prompt=prompt, new_tokens=s.new_tokens, stop_ids=stop)
    text = s.prompt + tokenizer.decode(gen["ids"], skip_special_tokens=True)
    row = {"name": name, "dir": str(path), "perplexity": ppl["perplexity"], "eval_tokens": ppl["tokens"],
           "params": ppl["params"], "bytes": sum(f.stat().st_size for f in path.glob("*.safetensors")),
           "decode_tokens_per_s": gen["tokens_per_s"], "text": text}
    log.info("%s: perplexity %.2f, %.1f decode tokens/s (%.0f s)", name, row["perplexity"],
             row["decode_tokens_per_s"], time.perf_counter() - t0)
    return row


def run_demo(parent: str | Path, workdir: str | Path, *, calib: str | Path | None, eval_text: str | Path,
             adapt_text: str | Path, settings: DemoSettings = DemoSettings(), show_progress: bool = False,
             plot: bool = True) -> dict:
    """Prune `parent`, adapt the pruned model, measure all three; write demo.json (and demo.png) in `workdir`.

    Outputs of an earlier demo in `workdir` (the two model directories and their run states) are
    replaced: they are this function's own outputs.
    """
    from bonsai_lite.adapt.train import AdaptConfig, adapt
    from bonsai_lite.calib.data import load_tokenizer
    from bonsai_lite.config import CalibConfig, RunConfig, SearchConfig
    from bonsai_lite.progress import step_bar
    from bonsai_lite.prune.api import prune

    s, parent, work = settings, Path(parent).resolve(), Path(workdir).resolve()
    load_start = os.getloadavg()
    work.mkdir(parents=True, exist_ok=True)
    tag = f"{s.method}-{int(round(s.sparsity * 100))}"
    pruned, adapted = work / f"pruned-{tag}", work / f"pruned-{tag}-adapted"
    timings = {}

    t0 = time.perf_counter()
    cfg = RunConfig(model=str(parent), out=str(pruned),
                    calib=CalibConfig(text=str(calib) if calib else None, samples=s.calib_samples,
                                      seq_len=s.calib_seq_len, prior_samples=s.prior_samples),
                    search=SearchConfig(method=s.method, sparsity=s.sparsity, p_iter=s.p_iter,
                                        masks_per_iter=s.masks_per_iter, seed=s.seed),
                    refit=s.refit, refit_samples=s.refit_samples)
    pruned_info = prune(cfg, overwrite=True, restart=True, show_progress=show_progress)
    timings["prune_seconds"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    acfg = AdaptConfig(pruned=str(pruned), out=str(adapted), data=str(adapt_text),
                       parent=str(parent) if s.adapt_distill else None,
                       seq_len=s.adapt_seq_len, batch_size=s.adapt_batch, max_steps=s.adapt_steps,
                       max_tokens=s.adapt_steps * s.adapt_batch * s.adapt_seq_len, rank=s.adapt_rank, lr=s.adapt_lr,
                       distill_weight=s.adapt_distill,
                       seed=s.seed, trust_remote_code=True, save_every=max(1, s.adapt_steps))
    adapt_info = adapt(acfg, overwrite=True, restart=True, progress=step_bar("  adapt") if show_progress else None)
    timings["adapt_seconds"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tok = load_tokenizer(parent)
    rows = [_model_row(name, path, eval_text=eval_text, s=s, tokenizer=tok)
            for name, path in (("parent", parent), ("pruned", pruned), ("pruned+adapted", adapted))]
    timings["measure_seconds"] = time.perf_counter() - t0
    report = {"settings": asdict(s), "hardware": _hardware(),
              "load_average": {"start": load_start, "end": os.getloadavg()}, "eval_text": str(eval_text), "calib_text": str(calib) if calib else None,
              "adapt_text": str(adapt_text), "models": rows, **timings,
              "prune": {"run_dir": pruned_info["run_dir"], "iterations": pruned_info["iterations"]},
              "adapt": {"steps": adapt_info["steps"], "train_loss": adapt_info["train_loss"]}}
    report["plot"] = None
    if plot:
        from bonsai_lite.plots import size_tradeoff

        drawn = size_tradeoff(rows, work / PLOT_NAME,
                              title=f"{parent.name}: {s.method} at {s.sparsity:.0%}, then {s.adapt_steps} LoRA steps")
        report["plot"] = str(drawn) if drawn else None
    (work / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n")
    return report


def _hardware() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__}


def render(report: dict) -> str:
    """The closing table, the generated texts and where the plot is."""
    rows, s = report["models"], report["settings"]
    base = rows[0]
    out = [f"{'':16}{'perplexity':>11}{'params':>14}{'size MB':>9}{'decode tok/s':>14}{'vs parent':>11}"]
    for r in rows:
        speed = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        out.append(f"{r['name']:16}{r['perplexity']:11.2f}{r['params']:14,d}{r['bytes'] / 1e6:9.1f}"
                   f"{r['decode_tokens_per_s']:14.1f}{speed:10.2f}x")
    out.append(f"(perplexity on the first {base['eval_tokens']:,} tokens of {Path(report['eval_text']).name} at "
               f"seq {s['eval_seq_len']}; {s['method']} at {s['sparsity']:.0%} of non-embedding parameters, pruned in "
               f"{report['prune_seconds']:.0f} s; {s['adapt_steps']} LoRA steps of {s['adapt_batch']} x "
               f"{s['adapt_seq_len']} tokens{' with distillation' if s['adapt_distill'] else ''} in "
               f"{report['adapt_seconds']:.0f} s)")
    out.append("")
    out.append(f"Greedy continuations of {s['prompt']!r}:")
    for r in rows:
        out.append(f"  {r['name']}: {' '.join(r['text'].split())}")
    out.append("")
    out.append(f"plot: {report['plot']}" if report.get("plot") else
               "plot: not drawn (pip install 'bonsai-lite[plots]')")
    return "\n".join(out)
