"""Child process of test_memory_budget.py: plan and evaluate under a CPU memory budget, report RSS growth.

    python budget_child.py MODEL_DIR WARMUP_DIR BUDGET MASKS SAMPLES TOKENS  -> one JSON line on stdout

Peak RSS growth is measured from this process's high-water mark (VmHWM in /proc/self/status), reset
through /proc/self/clear_refs after the baseline. `getrusage(RUSAGE_SELF).ru_maxrss` is reported too
but not trusted: Linux carries the pre-exec peak over into it, so a child started by a large pytest
process inherits that process's peak (seen here: a 13 MiB child reported an 813 MiB ru_maxrss).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import resource
import sys

import psutil
import torch

from bonsai_lite.io.model import StreamedModel
from bonsai_lite.search.engine import evaluate
from bonsai_lite.search.machine import detect_machine, parse_bytes
from bonsai_lite.search.planner import Work, make_plan
from bonsai_lite.structure import UnitLayout


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5": reset the peak RSS to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False  # VmHWM then includes import/warm-up peaks: an over-estimate, never an under-estimate


def _run(model: StreamedModel, masks_n: int, samples: int, tokens: int, plan):
    layout = UnitLayout.of(model.layers)
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(masks_n, layout.total, generator=g) > 0.3
    masks[0] = True
    ids = torch.randint(0, model.spec.vocab, (samples, tokens), generator=g)
    return evaluate(model, ids, masks, plan)


def main(argv: list[str]) -> None:
    model_dir, warm_dir, budget_text, k, n, t = argv
    k, n, t = int(k), int(n), int(t)
    # One thread: the test machine is shared, and oversubscribed OpenMP barriers made 2 threads 8x slower.
    torch.set_num_threads(1)
    budget = parse_bytes(budget_text)
    model = StreamedModel.open(model_dir)
    # The product path: detect_machine (which also bounds glibc's allocator on CPU) + make_plan.
    machine = detect_machine(device="cpu", budget=budget)
    plan = make_plan(model.spec, model.layers, Work(k, n, t), machine)
    # Warm-up on a tiny model with the same plan shape, so that code pages, thread pools and lazily
    # initialised kernels are resident before the baseline and not charged to the run.
    warm = StreamedModel.open(warm_dir)
    _run(warm, k, n, t, dataclasses.replace(plan, head_chunk=min(plan.head_chunk, warm.spec.vocab // 3)))
    del warm
    gc.collect()
    baseline = psutil.Process().memory_info().rss
    reset = _reset_high_water_mark()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    res = _run(model, k, n, t, plan)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    peak = _status_bytes("VmHWM")
    print(json.dumps({
        "budget": budget,
        "weights_bytes": model.ckpt.nbytes(),
        "plan": plan.to_json(),
        "baseline_rss": baseline,
        "hwm_reset": reset,
        "peak_growth": peak - baseline,
        "ru_maxrss_growth": ru1.ru_maxrss * 1024 - baseline,
        "minor_faults": ru1.ru_minflt - ru0.ru_minflt,
        "seconds": res.stats.seconds,
        "passes": res.stats.passes,
        "bytes_read": res.stats.bytes_read,
        "bytes_spilled": res.stats.bytes_spilled,
        "nll": res.nll.tolist(),
    }))


if __name__ == "__main__":
    main(sys.argv[1:])
