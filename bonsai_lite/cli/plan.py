"""`bonsai-lite plan`: will it fit? Works from config.json alone, before downloading weights."""
from __future__ import annotations

import logging

from bonsai_lite.cli.main import emit_json
from bonsai_lite.search.int8 import require_cuda
from bonsai_lite.search.machine import detect_machine, nominal_machine, parse_bytes, search_dtype
from bonsai_lite.search.planner import Work, make_plan
from bonsai_lite.structure import load_spec

log = logging.getLogger("bonsai_lite.plan")


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="the execution plan for a memory budget, from config.json alone")
    p.add_argument("model_dir", help="a directory with config.json (weights not needed)")
    p.add_argument("--memory-budget", required=True, help="e.g. 8GB")
    p.add_argument("--masks", type=int, default=200, help="sub-models evaluated together (default 200, the paper's)")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--device", default=None, help="cpu or cuda (default: this machine's)")
    p.add_argument("--gpu-name", default="", help="describe a GPU you do not have, e.g. H100, 4090")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--allow-8bit", action="store_true", help="consider 8-bit evaluation weights (CUDA)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run)


def run(args) -> int:
    spec = load_spec(args.model_dir)
    budget = parse_bytes(args.memory_budget)
    if args.device or args.gpu_name:
        machine = nominal_machine(device=args.device or "cuda", budget=budget, gpu_name=args.gpu_name)
    else:
        machine = detect_machine(device=None, budget=budget)
    if args.allow_8bit:  # refused for a CPU, as `prune --allow-8bit` refuses it (no bitsandbytes needed here)
        require_cuda(machine.device, "plan for a GPU with --device cuda [--gpu-name NAME], or drop --allow-8bit")
    work = Work(args.masks, args.calib_samples, args.seq_len)
    dtype = args.dtype or search_dtype(machine, spec)  # what `prune` would compute in here
    plan = make_plan(spec, spec.layers, work, machine, dtype=dtype, allow_8bit=args.allow_8bit)
    log.info(plan.describe())
    if args.json:
        emit_json(plan.to_json())
    return 0
