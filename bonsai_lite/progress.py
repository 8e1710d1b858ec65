"""Progress of a run: one bar per stage under an outer iteration bar, and a JSONL metrics file.

Bars go to stderr and are drawn only when asked (a CLI run without --quiet/--json); log records
are routed above them (`logging_redirect_tqdm`), so a "plan: ..." line never lands inside a
half-drawn bar. Every finished stage appends one JSON line (stage, iteration, seconds, the
planner's predicted seconds, tokens, peak memory) to `metrics.jsonl` in the run directory, drawn
or not. The library calls `stage()` / `iteration()` on whatever it is given; `NullProgress` is
the default and does nothing but time.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
import warnings
from pathlib import Path

METRICS_NAME = "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict]:
    """The lines of a metrics file (none when it is absent; a line cut short by a kill is skipped)."""
    path, out = Path(path), []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def fmt_duration(seconds: float) -> str:
    """'45 s', '12 min', '1.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def peak_rss_bytes() -> int | None:
    """The process's RSS high-water mark (VmHWM), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# The process's peak before the last reset_peaks: resetting VmHWM also resets what the kernel reports
# as the process's ru_maxrss (getrusage, wait4, `/usr/bin/time -v`), so the whole run's peak is kept here.
_EARLIER_PEAK = 0


def process_peak_rss_bytes() -> int | None:
    """The process's RSS high-water mark over its whole life, across reset_peaks; None off Linux."""
    now = peak_rss_bytes()
    return None if now is None else max(now, _EARLIER_PEAK)


def reset_peaks() -> None:
    global _EARLIER_PEAK
    _EARLIER_PEAK = process_peak_rss_bytes() or 0
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS, so a stage's peak is its own
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def _peak_gpu_bytes() -> int | None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_reserved())
    return None


class _Stage:
    """Handed to the body of a `stage()` block: advance the bar, add tokens to the record."""

    def __init__(self, bar):
        self.bar, self.tokens = bar, 0

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)


class NullProgress:
    """Records metrics (when given a file) and draws nothing."""

    def __init__(self, metrics_path: str | Path | None = None):
        self.metrics_path = Path(metrics_path) if metrics_path else None
        self.planned = self.spent = 0.0  # over the finished stages that had a prediction

    def pace(self) -> float | None:
        """Measured seconds per planned second over the finished stages with a prediction (None before
        the first): how much slower (>1) or faster this machine runs than the planner said."""
        return self.spent / self.planned if self.planned > 0 else None

    def start_over(self) -> None:
        """A new run in this run directory: the metrics of the run it replaces go, so that what reads
        the file (`bonsai-lite report`, tools/bench_prune.py) does not sum their stages with its own."""
        if self.metrics_path is not None:
            with contextlib.suppress(OSError):
                self.metrics_path.unlink(missing_ok=True)

    def record(self, **fields) -> None:
        if self.metrics_path is None:
            return
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields}, default=str)
        with contextlib.suppress(OSError):  # metrics are a courtesy: never fail a run over them
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "a") as f:
                f.write(line + "\n")

    def _bar(self, name: str, total: int, predicted: float | None):
        return None

    @contextlib.contextmanager
    def stage(self, name: str, *, total: int = 1, predicted: float | None = None, **fields):
        """Time a stage; on success append its metrics line. `fields` go into the line as given."""
        reset_peaks()
        bar = self._bar(name, total, predicted)
        st = _Stage(bar)
        st.tokens = fields.pop("tokens", 0)  # known up front, or counted by the body
        t0 = time.perf_counter()
        try:
            yield st
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - t0
        if predicted:
            self.planned, self.spent = self.planned + predicted, self.spent + seconds
        self.record(stage=name, **fields, seconds=round(seconds, 6),
                    predicted_seconds=None if predicted is None else round(predicted, 6),
                    tokens=st.tokens or None, peak_rss_bytes=peak_rss_bytes(), peak_gpu_bytes=_peak_gpu_bytes())

    def iteration(self, done: int, total: int, info: str | None = None) -> None:
        pass

    def close(self) -> None:
        pass


class BarProgress(NullProgress):
    """Stage bars on stderr under an outer `iterations` bar; log lines printed above them."""

    def __init__(self, metrics_path: str | Path | None = None, *, stream=None):
        super().__init__(metrics_path)
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._tqdm, self.stream = tqdm, stream or sys.stderr
        self._outer = None
        self._redirect = logging_redirect_tqdm(loggers=[logging.getLogger()], tqdm_class=tqdm)
        self._redirect.__enter__()

    def _bar(self, name: str, total: int, predicted: float | None):
        if total <= 0:  # a stage with nothing to count (or its own bar): timed and recorded only
            return None
        # Percent, not counts: the engine advances a stage by fractions of a sub-model.
        bar = self._tqdm(total=total, desc=f"  {name}", leave=False, file=self.stream,
                         position=1 if self._outer is not None else 0, dynamic_ncols=True,
                         bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}")
        if predicted is not None:
            bar.set_postfix_str(f"planned {predicted:.0f} s", refresh=False)
        return bar

    def iteration(self, done: int, total: int, info: str | None = None) -> None:
        if self._outer is None:
            self._outer = self._tqdm(total=total, desc="iterations", unit="it", file=self.stream, position=0,
                                     dynamic_ncols=True)
        if info:
            self._outer.set_postfix_str(info, refresh=False)
        self._outer.update(done - self._outer.n)
        if done >= total:  # the search is over: what follows (export) prints below a finished bar
            self._outer.close()

    def close(self) -> None:
        if self._outer is not None:
            self._outer.close()
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None


def step_bar(desc: str):
    """`update(done, total, loss)` for a loop of steps (adaptation); `update(close=True)` ends it.

    Closes itself after the last step; log lines are printed above it while it is open.
    """
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    bars: list = []
    redirect = [logging_redirect_tqdm(loggers=[logging.getLogger()])]
    redirect[0].__enter__()

    def update(done=0, total=0, loss=None, close=False):
        if not close:
            if not bars:
                bars.append(tqdm(total=total, initial=max(0, done - 1), desc=desc, unit="step", leave=False))
            if loss is not None:
                bars[0].set_postfix(loss=f"{loss:.4f}", refresh=False)
            bars[0].update(done - bars[0].n)
        if close or done == total:
            for b in bars:
                b.close()
            bars.clear()
            if redirect:  # once: the redirect restores the original log handlers on exit
                redirect.pop().__exit__(None, None, None)

    return update


def make_progress(*, show: bool, metrics_path: str | Path | None = None) -> NullProgress:
    return BarProgress(metrics_path) if show else NullProgress(metrics_path)


def quiet_third_party(*, debug: bool = False) -> None:
    """Silence library chatter that does not concern a user of the CLI (kept with --debug)."""
    if debug:
        return
    for name in ("transformers", "accelerate", "peft", "torch", "safetensors", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for module in ("transformers", "torch", "peft", "accelerate", "huggingface_hub"):
        warnings.filterwarnings("ignore", module=module)
    warnings.filterwarnings("ignore", category=FutureWarning)
    # scipy's kendalltau on a cross-validation fold too small to rank: tau is reported as NaN anyway
    warnings.filterwarnings("ignore", message="One or more sample arguments is too small")
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
