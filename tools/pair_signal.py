"""How much signal one iteration's sub-model losses carry: the paper's regression only helps if the
loss difference between a mask and its complement is reproducible.

Draws one iteration's priors and (mask, complement) pairs exactly as `bonsai-lite prune` would
(same preset, seed and calibration text), evaluates every sub-model on several disjoint sets of
calibration windows, and prints one JSON object: per token set the pair differences
loss(mask) - loss(complement); their Spearman correlation between token sets (split-half
reliability; Spearman-Brown gives the tokens per sub-model a reliability of 0.8 would need); and
how well the prior predicts them.

    python tools/pair_signal.py --model /work/smollm2 --calib ../shared/data/wikitext2-valid.txt \\
        --preset standard --sparsity 0.2 --seed 0 --sets 4x128,4x128,16x128
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import commit, hardware  # noqa: E402

from bonsai_lite.calib.data import calibration_tokens  # noqa: E402
from bonsai_lite.config import PRESETS, CalibConfig, RunConfig, SearchConfig  # noqa: E402
from bonsai_lite.prune import compensation as C  # noqa: E402
from bonsai_lite.prune import loop as L  # noqa: E402
from bonsai_lite.prune.api import calibration_ids  # noqa: E402
from bonsai_lite.prune.select import comparable_prior  # noqa: E402
from bonsai_lite.prune.state import RunState  # noqa: E402
from bonsai_lite.structure import UnitLayout  # noqa: E402


def _sets(text: str) -> list[tuple[int, int]]:
    try:
        out = [tuple(int(v) for v in part.split("x")) for part in text.split(",")]
    except ValueError:
        out = []
    if len(out) < 2 or any(len(s) != 2 or min(s) < 1 for s in out):
        raise argparse.ArgumentTypeError(f"--sets takes two or more SAMPLESxSEQ entries, e.g. 4x128,4x128; got {text!r}")
    return out


def pair_differences(losses: torch.Tensor) -> torch.Tensor:
    """loss(mask) - loss(complement) per pair; sample_masks puts pairs in rows 2k, 2k+1."""
    return (losses[0::2] - losses[1::2]).double()


def predicted_differences(scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """What a keep-score predicts for each pair: the mask keeps sum(score * kept), so the pair whose
    mask keeps more score should have the lower loss (higher = keep, as for the prior and beta)."""
    m = masks.double()
    return -((m[0::2] - m[1::2]) * scores.double()).sum(1)


def length_factor(r: float, target: float = 0.8) -> float:
    """How many times longer a measurement with split-half correlation r must be to reach the
    `target` reliability: Spearman-Brown, k r / (1 + (k - 1) r) = target, solved for k."""
    return target * (1 - r) / (r * (1 - target))


def _rho(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Spearman correlation; None where it is undefined (a constant input)."""
    if a.unique().numel() < 2 or b.unique().numel() < 2:
        return None
    return float(spearmanr(a.numpy(), b.numpy()).statistic)


def measure(args) -> dict:
    q = {**PRESETS[args.preset]}
    cfg = RunConfig(model=str(Path(args.model).resolve()), out=str(Path(tempfile.gettempdir()) / "pair_signal-out"),
                    calib=CalibConfig(text=str(Path(args.calib).resolve()), samples=q["samples"], seq_len=q["seq_len"],
                                      prior_samples=q["prior_samples"], prior_seq_len=q["prior_seq_len"]),
                    search=SearchConfig(method="bonsai", sparsity=args.sparsity, p_iter=min(q["p_iter"], args.sparsity),
                                        masks_per_iter=args.masks or q["masks_per_iter"], seed=args.seed),
                    device="cpu")
    ids = calibration_ids(cfg, cfg.model)
    with tempfile.TemporaryDirectory() as run_dir:
        state = RunState(run_dir)
        state.meta, state.tensors = {"iteration": 0, "history": [], "layers": None}, {}
        pruner = L.Pruner(cfg, ids=ids, state=state)
        model = pruner.parent
        layout = UnitLayout.of(model.layers)
        pruner.it = 0
        t0 = time.perf_counter()
        _, prior, masks, candidates, means = pruner._sampled(0, model, pruner._tokens(0), layout)
        search_model = model.with_fills(C.fills(means, model.layers, model.spec.head_dim))
        losses = []
        for i, (samples, seq) in enumerate(args.sets):  # disjoint draws: their own seed per set
            tokens = calibration_tokens(ids, samples=samples, seq_len=seq, seed=1_000_003 * (i + 1) + args.seed)
            state.tensors.pop("losses", None)
            losses.append(pruner._evaluate_masks(search_model, tokens, masks).double())
        seconds = time.perf_counter() - t0
    diffs = [pair_differences(x) for x in losses]
    prior_keep = torch.where(candidates, comparable_prior(prior, layout.groups(), cfg.search.prior), torch.zeros_like(prior))
    out = {"sets": [], "between_sets": []}
    for (samples, seq), d, loss in zip(args.sets, diffs, losses):
        out["sets"].append({"samples": samples, "seq_len": seq, "tokens": samples * seq,
                            "mean_loss": float(loss.mean()), "pair_diff_sd": float(d.std()),
                            "prior_rho": _rho(predicted_differences(prior_keep, masks), d)})
    for i in range(len(diffs)):  # (betas fitted on one set reproduce its own pair order: nothing to add)
        for j in range(i + 1, len(diffs)):
            r = _rho(diffs[i], diffs[j])
            row = {"a": i, "b": j, "rho": r}
            if args.sets[i] == args.sets[j] and r is not None and 0 < r < 1:  # same size: a split half
                row["tokens_for_reliability_0.8"] = round(args.sets[i][0] * args.sets[i][1] * length_factor(r))
            out["between_sets"].append(row)
    return {"kind": "pair_signal", "model": Path(args.model).name, "preset": args.preset, "sparsity": args.sparsity,
            "seed": args.seed, "masks": len(masks), "candidates": int(candidates.sum()), "seconds": round(seconds, 1),
            **out, "commit": commit(), "hardware": hardware()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--preset", default="standard", choices=sorted(PRESETS))
    ap.add_argument("--sparsity", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--masks", type=int, default=0, help="sub-models (pairs x 2); 0: the preset's")
    ap.add_argument("--sets", type=_sets, default=_sets("4x128,4x128,16x128"),
                    help="token sets, SAMPLESxSEQ, comma-separated; the first two of equal size give the split half")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    rec = measure(args)
    text = json.dumps(rec, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
