"""The version bounds CI tests are the bounds pyproject.toml declares."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
tomllib = pytest.importorskip("tomllib")


def _bounds() -> dict[str, tuple[str, str]]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+),<=([0-9.]+)", dep.replace(" ", ""))
        if m:
            out[m[1]] = (m[2], m[3])
    return out


@pytest.mark.unit
def test_lowest_txt_pins_the_lower_bounds_of_every_bounded_dependency():
    lowest = dict(line.split("==") for line in (ROOT / ".ci" / "lowest.txt").read_text().split()
                  if "==" in line and not line.startswith("#"))
    bounds = _bounds()
    assert {"transformers", "peft", "gguf"} <= set(bounds)
    assert lowest == {name: low for name, (low, _) in bounds.items()}
