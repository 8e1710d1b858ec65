"""progress: a stage's peak is its own, and the whole process's peak survives the per-stage resets."""
from __future__ import annotations

import numpy as np
import pytest

from bonsai_lite import progress


def test_process_peak_survives_the_stage_resets():
    if progress.peak_rss_bytes() is None:
        pytest.skip("no /proc/self/status here")
    progress.reset_peaks()
    big = np.ones(256 << 20, dtype=np.uint8)  # 256 MiB, every page written
    high = progress.peak_rss_bytes()
    del big
    progress.reset_peaks()  # the next stage: VmHWM starts again from the RSS now
    if progress.peak_rss_bytes() > high - (128 << 20):
        pytest.skip("this kernel does not let a process reset its VmHWM (/proc/self/clear_refs)")
    slack = 16 << 20  # the kernel's RSS counters are per-thread and synced lazily (pages, not MiB)
    assert progress.process_peak_rss_bytes() >= high - slack
    with progress.NullProgress().stage("after"):
        pass
    assert progress.process_peak_rss_bytes() >= high - slack  # and after another stage's reset
