"""Typed run configuration: frozen dataclasses, one per concern. No argparse past the CLI."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from bonsai_lite.errors import BonsaiError

METHODS = ("bonsai", "bonsai-noregress", "wanda-sp", "flap", "magnitude", "random")


@dataclass(frozen=True)
class CalibConfig:
    text: str | None  # file or dataset name; None = sample text from the parent model
    samples: int = 32  # paper appendix A.2: 32 per iteration
    seq_len: int = 2048


@dataclass(frozen=True)
class SearchConfig:
    method: str = "bonsai"
    sparsity: float = 0.5
    p_iter: float = 0.05  # paper appendix A.2
    masks_per_iter: int = 200  # paper appendix A.2
    prior: str = "wanda"  # "wanda" | "activation"
    penalty: str = "l1"  # paper A.1: l1 for every experiment except Phi-2
    rank: str = "relevance"  # "relevance" | "per-param": global ranking of Bonsai's beta (eq. 2); measured, docs/RESULTS.md
    keep_spread: float = 0.0  # 0 = paper (each mask keeps half the candidates); >0 varies the count
    uniform: bool = False
    seed: int = 0
    multiple_of: int = 1  # kept MLP units per layer rounded to a multiple of this (prune/align.py); 1 = off

    def __post_init__(self):
        if self.method not in METHODS:
            raise BonsaiError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not 0.0 < self.sparsity < 1.0:
            raise BonsaiError(f"--sparsity must be in (0, 1), got {self.sparsity}")
        if not 0.0 < self.p_iter <= self.sparsity:
            raise BonsaiError(f"--p-iter must be in (0, sparsity={self.sparsity}], got {self.p_iter}")
        if self.p_iter >= 0.5:
            raise BonsaiError(f"--p-iter must be below 0.5 (the sampler perturbs 2 x p_iter of each layer), got {self.p_iter}")
        if self.multiple_of < 1:
            raise BonsaiError(f"--multiple-of must be at least 1 (1 turns alignment off), got {self.multiple_of}")
        if self.masks_per_iter < 2:
            raise BonsaiError("--masks-per-iter must be at least 2 (a mask and its complement)")

    @property
    def iterations(self) -> int:
        # tolerance: 0.5 / 0.05 is 10.000000000000002 in floating point
        return math.ceil(self.sparsity / self.p_iter - 1e-9)


@dataclass(frozen=True)
class RunConfig:
    model: str
    out: str
    calib: CalibConfig
    search: SearchConfig
    budget: int | None = None
    device: str | None = None
    dtype: str | None = None
    spill_dir: str | None = None
    extra: dict = field(default_factory=dict)

    def resume_key(self) -> dict:
        """Settings that must match for a run directory to be resumed (paths to outputs excluded)."""
        d = asdict(self)
        d.pop("out")
        d.pop("spill_dir")
        d.pop("budget")  # a different budget changes speed, not results
        return d


PRESETS = {
    # minutes on a 2-core CPU for SmolLM2-135M: few short samples, few masks, big steps
    "quick": dict(p_iter=0.1, masks_per_iter=24, samples=4, seq_len=128),
    "paper": dict(p_iter=0.05, masks_per_iter=200, samples=32, seq_len=2048),
}
