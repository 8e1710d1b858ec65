"""Test hook: die at a named point of a run, to prove that a resumed run loses nothing.

`BONSAI_LITE_FAULT="stage:count"` makes the process SIGKILL itself (no cleanup, no `finally`, as
an OOM kill or a power cut would) the `count`-th time `checkpoint(stage)` is reached in this
process (`count` defaults to 1). `stage:count@rank` kills only the process whose RANK (torchrun's
environment) is `rank`; ranks other than 0 reach `evaluate` when their share of a chunk is evaluated,
before sending it. Points, in the order a run reaches them:

- `priors`      an iteration's priors and sampled masks are committed to the run state
- `evaluate`    a chunk of sub-model losses is committed
- `regression`  all losses of the iteration are in; the regression is about to run
- `regressed`   the regression ran; the iteration's result is not committed yet
- `iteration`   the iteration's result (pruned units) is committed
- `export`      an output shard is written (the export is half done)

Unset (always, outside tests) `checkpoint` costs one environment lookup.
"""
from __future__ import annotations

import os
import signal

ENV = "BONSAI_LITE_FAULT"
_reached: dict[str, int] = {}


def checkpoint(stage: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    spec, _, rank = spec.partition("@")
    name, _, count = spec.partition(":")
    if name != stage or (rank and os.environ.get("RANK", "0") != rank):
        return
    _reached[stage] = _reached.get(stage, 0) + 1
    if _reached[stage] == int(count or 1):
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
