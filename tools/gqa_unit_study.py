"""Measure the GQA unit choice on a real model: query heads vs whole KV groups (docs/design.md).

For a subset of layers: the loss increase of removing each query head alone and each KV group
alone; how much of the per-head variation lies *within* groups (what group units cannot see); and
a head-to-head: remove the least important KV group per layer vs the same number of least
important individual heads. Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time

import torch

from bonsai_lite.calib.data import calibration_tokens, load_tokenizer, read_text, tokenize
from bonsai_lite.io.model import StreamedModel
from bonsai_lite.search.engine import evaluate
from bonsai_lite.search.machine import detect_machine
from bonsai_lite.search.planner import Work, make_plan
from bonsai_lite.structure import UnitLayout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--data", required=True)
    ap.add_argument("--layers", default="0,5,10,15,20,25")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    model = StreamedModel.open(a.model)
    spec, layout = model.spec, UnitLayout.of(model.layers)
    layers = [int(x) for x in a.layers.split(",")]
    tokens = calibration_tokens(tokenize(load_tokenizer(a.model), read_text(a.data)), samples=a.samples,
                                seq_len=a.seq_len, seed=a.seed)
    base = torch.ones(layout.total, dtype=torch.bool)
    masks, labels = [base.clone()], [("dense", -1, -1)]
    for l in layers:
        s = layout.heads[l]
        for h in range(s.stop - s.start):
            m = base.clone(); m[s.start + h] = False
            masks.append(m); labels.append(("head", l, h))
        kv = torch.tensor(model.layers[l].kv_of_head)
        for g in range(spec.n_kv):
            m = base.clone(); m[torch.arange(s.start, s.stop)[kv == g]] = False
            masks.append(m); labels.append(("group", l, g))
    masks = torch.stack(masks)
    plan = make_plan(spec, model.layers, Work(len(masks), a.samples, a.seq_len), detect_machine(device=None, budget=None))
    t0 = time.perf_counter()
    nll = evaluate(model, tokens, masks, plan).nll
    dense = nll[0].item()
    delta = {lab: nll[i].item() - dense for i, lab in enumerate(labels)}
    per_layer, within, total = {}, 0.0, 0.0
    worst_group_masks, worst_heads_masks = base.clone(), base.clone()
    group = spec.gqa_group
    for l in layers:
        hd = torch.tensor([delta[("head", l, h)] for h in range(spec.n_heads)])
        gd = torch.tensor([delta[("group", l, g)] for g in range(spec.n_kv)])
        by_group = hd.reshape(spec.n_kv, group)
        within += float(((by_group - by_group.mean(1, keepdim=True)) ** 2).sum())
        total += float(((hd - hd.mean()) ** 2).sum())
        s = layout.heads[l]
        worst_group_masks[torch.arange(s.start, s.stop)[torch.tensor(model.layers[l].kv_of_head) == int(gd.argmin())]] = False
        worst_heads_masks[s.start + torch.argsort(hd)[:group]] = False
        per_layer[l] = {"head_delta_nll": [round(x, 5) for x in hd.tolist()],
                        "group_delta_nll": [round(x, 5) for x in gd.tolist()]}
    pair = evaluate(model, tokens, torch.stack([worst_group_masks, worst_heads_masks]), plan).nll - dense
    head_p = 2 * spec.hidden * spec.head_dim
    kv_p = 2 * spec.hidden * spec.head_dim
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(json.dumps({
        "model": a.model, "layers": layers, "samples": a.samples, "seq_len": a.seq_len, "commit": commit,
        "hardware": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "dense_nll": dense, "seconds": time.perf_counter() - t0,
        "within_group_share_of_head_variance": within / total if total else None,
        "remove_one_group_per_layer": {"delta_nll": pair[0].item(),
                                       "params_removed_per_layer": group * head_p + kv_p},
        "remove_same_number_of_single_heads_per_layer": {"delta_nll": pair[1].item(),
                                                         "params_removed_per_layer_at_least": group * head_p},
        "per_layer": per_layer,
    }, indent=1))


if __name__ == "__main__":
    main()
