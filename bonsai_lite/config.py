"""Typed run configuration: frozen dataclasses, one per concern. No argparse past the CLI."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from bonsai_lite.errors import BonsaiError

# Beyond this a pruned model is noise, and the iterative search cannot reach the target anyway
# (0.999 asked for ended at 73% on a tiny model, silently).
MAX_SPARSITY = 0.9
METHODS = ("bonsai", "bonsai-noregress", "wanda-sp", "flap", "magnitude", "random")
# Methods compensated by default: where it won on/off in docs/RESULTS.md (SmolLM2-135M, 35%, quick,
# seed 0: flap 250 vs 4,470, wanda-sp 1,219 vs 29,185; bonsai 142 on vs 126 off, so not bonsai).
# Methods not measured keep the behaviour they had before (off).
COMPENSATE_AUTO = frozenset({"flap", "wanda-sp"})
MIN_REGRESSION_MASKS = 4  # two (mask, complement) pairs: the fewest the pair-aware cross-validation can split
REGRESSIONS = ("unit", "allocation", "none", "best", "best-confirmed")
ALLOCATION_SPREAD = 0.5  # keep_spread the allocation model samples with unless one is given
# `--regression auto` (the CLI's default) keeps the paper's regression only when each sub-model is
# evaluated on at least this many tokens. Below it the sub-model losses were measured to add nothing
# over the prior (SmolLM2-135M, 4 x 128 tokens per sub-model, 3 seeds at 20/35/50%, with and without
# the refit; docs/RESULTS.md), for 2.5-5x the forward tokens; above it nothing was measured on a CPU.
REGRESSION_MIN_TOKENS = 2048


# `--allocation auto`: the allocation search on steps of at least this share. SmolLM2-135M, 3 seeds
# (docs/RESULTS.md, eighteenth round): `standard` 20% in one step 27.6 against 29.3 (std 0.07 / 0.22),
# `quick` in 10% steps 30.1 / 46.0 / 85.6 against 31.4 / 52.2 / 94.1 at 20 / 35 / 50%; on `standard`'s 5%
# steps the allocations' sub-model losses differ by less than their noise on 4 x 128 tokens, and 35/50%
# gave 42.0 / 63.4 against 42.5 / 64.1 with two to five times the spread, for 23-29% more forward tokens.
ALLOCATION_MIN_STEP = 0.1


def auto_allocation(method: str, prior: str, regression: str, step: float) -> str:
    """What `--allocation auto` runs: search (search/offsets.py) for bonsai ranking by a FLAP z-scored
    prior alone (--regression none) when its steps (`smallest_step`) remove at least ALLOCATION_MIN_STEP,
    else prior."""
    searches = method == "bonsai" and prior.startswith("flap") and regression == "none"
    return "search" if searches and step >= ALLOCATION_MIN_STEP - 1e-9 else "prior"


def smallest_step(schedule: tuple[float, ...]) -> float:
    """The smallest step of a removal schedule but the last, which only tops up to the target (the
    only step when there is one)."""
    steps = [b - a for a, b in zip((0.0,) + schedule[:-1], schedule)]
    return min(steps[:-1] or steps)


def auto_regression(method: str, samples: int, seq_len: int) -> str:
    """What `--regression auto` runs: the paper's per-unit regression when `samples` x `seq_len`
    tokens per sub-model reach REGRESSION_MIN_TOKENS, else none (Bonsai's frame on the prior alone)."""
    return "none" if method == "bonsai" and samples * seq_len < REGRESSION_MIN_TOKENS else "unit"


# `--first-step auto` (the CLI's default; prune.api resolves it once --fluctuation is known): Bonsai's
# frame on the prior alone with the residual metric prunes a target of at most ONE_STEP_SPARSITY in
# one step, its dense pass over the windows of the steps it replaces (`dense_scale`), which makes it
# FLAP given those windows. SmolLM2-135M, 3 seeds each (docs/RESULTS.md, eleventh round): at 20%,
# `standard` (residual metric) 30.35 in one step against 31.35 in four 5% steps, but `quick` (FLAP's
# variance: its dense pass is too small for the residual metric) 36.5 in one step against 35.3 in two
# 10% steps; a first step of 0.2 before 5% steps measured worse at 35% and 50%.
ONE_STEP_SPARSITY = 0.2
# `--prior-memory auto`: the weight of the earlier iterations' running average of the prior for
# bonsai ranking by FLAP's z-scored metric alone (--regression none, flap-parent or flap-anchored),
# 0 otherwise. SmolLM2 `standard`, the 128-window refit, 3 seeds (docs/RESULTS.md, sixteenth round):
# W = 1 measured lower in the mean than each iteration's own prior at 35% and 50% (5 of 6 seeds), at
# the same forward tokens (the memory reads no window); on held-out test tokens the mean gain is within
# the spread and the spread over seeds narrower (eighteenth round).
PRIOR_MEMORY_AUTO = 1.0


def auto_first_step(method: str, regression: str, prior: str, fluctuation: str, p_iter: float,
                    sparsity: float) -> float:
    """What `--first-step auto` runs: the whole target in one step (first_step = sparsity) for bonsai
    ranking by FLAP's residual metric alone (--regression none) when the target is above p_iter and
    at most ONE_STEP_SPARSITY; else 0, the paper's equal steps."""
    one = (method == "bonsai" and regression == "none" and prior.startswith("flap") and fluctuation == "residual"
           and p_iter < sparsity <= ONE_STEP_SPARSITY + 1e-9)
    return sparsity if one else 0.0


@dataclass(frozen=True)
class CalibConfig:
    text: str | None  # file or 'hf:' dataset name; None = sample text from the parent model
    samples: int = 32  # paper appendix A.2: 32 per iteration
    seq_len: int = 2048
    # Issue 10: one dense pass over its own, larger set of windows feeds the priors and the
    # compensation means, apart from the sub-model evaluations. 0 = reuse the search windows.
    prior_samples: int = 0
    prior_seq_len: int = 0  # 0 = seq_len

    def __post_init__(self):
        if self.samples < 1:
            raise BonsaiError(f"--calib-samples must be at least 1, got {self.samples}")
        if self.seq_len < 2:
            raise BonsaiError(f"--seq-len must be at least 2 (a token and the next to predict), got {self.seq_len}")


@dataclass(frozen=True)
class SearchConfig:
    method: str = "bonsai"
    sparsity: float = 0.5
    p_iter: float = 0.05  # paper appendix A.2
    # The first iteration's step (a fraction of the non-embedding parameters); 0 = p_iter, the paper's
    # equal steps. Pruning changes the activations the priors are measured on less at first than
    # later, so one larger first step costs little there and saves iterations (`removal_schedule`).
    # "auto": prune.api resolves it with --fluctuation (`auto_first_step`); unresolved it is 0.
    first_step: float | str = 0.0
    masks_per_iter: int = 200  # paper appendix A.2
    # "wanda" | "activation" (appendix F) | "flap": FLAP's fluctuation score, z-scored per (layer, kind)
    # so it ranks across groups as it stands; it assumes compensation, so "auto" turns that on with it.
    # "flap-parent": the same z-scored on the parent's per-group mean and std in every iteration.
    # "flap-anchored": flap-parent with each group's scores first divided by their median drift from
    # the parent's (the group-wide rescaling that upstream removals cause taken out).
    # "auto" (resolved at construction): flap-parent for bonsai, where it measured best (docs/RESULTS.md),
    # wanda for the others (wanda-sp is defined by it).
    prior: str = "auto"
    # What FLAP's metric (the flap* priors and the flap method) weighs a unit's output columns by:
    # "variance": its inputs' variance (FLAP: what a bias cannot recover when the unit goes);
    # "residual": what is left of that variance after the best affine prediction from the other kept
    # inputs (what the least-squares refit cannot recover; docs/search-maths.md). "auto": residual
    # when the run refits (prune.api resolves it with --refit auto; it measured better there), else variance.
    fluctuation: str = "auto"
    penalty: str = "l1"  # paper A.1: l1 for every experiment except Phi-2
    # "relevance" | "per-param": global ranking of Bonsai's beta (eq. 2); measured, docs/RESULTS.md.
    # "within": beta orders units inside each (layer, kind) group, where it is identified, and the
    # prior's values decide how many each group loses (select.within_group_order).
    # "auto": within for bonsai's unit regression, relevance otherwise.
    rank: str = "auto"
    keep_spread: float = 0.0  # 0 = paper (each mask keeps half the candidates); >0 varies the count
    # "unit": eq. 3, one beta per unit (the paper). "allocation": the prior orders units inside each
    # (layer, kind) group and the masks learn each group's scale (search/allocation.py); it ranks
    # per parameter removed and needs masks that vary each group's kept count (keep_spread 0.5 if 0).
    # "none": the ablation without sub-models: the same frame (candidates, iterations), ranked by
    # the group-normalised prior alone, so what the sub-model losses add can be measured.
    # "best": no regression; the iteration removes what its lowest-loss sub-model removed, the
    # prior's own proposal (what "none" removes) evaluated beside the sampled masks.
    # "best-confirmed": best, with the winner and the prior's proposal measured again on a fresh
    # draw of windows (as many as the step's); the lower of the two there is removed.
    regression: str = "unit"
    # Guard: the regression's betas rank the candidates only when their held-out pair tau beats the
    # prior's tau on the same pairs (the prior is fixed, nothing is fitted); else the prior ranks them.
    guard: bool = True
    # What the cross-validation and the guard score: "all": the whole pair difference (the paper's
    # CV); "within": only the order inside each group (group-centred betas and prior), which is all
    # --rank within uses. "auto": within with --rank within, all otherwise.
    cv_scope: str = "auto"
    # Which units an iteration perturbs and may remove: "layer" (the paper): the bottom 2 p_iter of
    # every (layer, kind) group by prior; "global": the units lowest on the prior's global scale
    # worth 2 p_iter of the parameters (sampling.global_candidates), so one group can lose more.
    # "auto": global for bonsai, layer otherwise.
    candidates: str = "auto"
    uniform: bool = False
    seed: int = 0
    # Compensation: masked units read as their calibration mean during the search, and removed
    # units' mean output is folded into the o_proj / down_proj bias, carried across iterations.
    # "auto" = on for flap (its definition) and for the methods where it measured better.
    compensate: str = "auto"

    @property
    def sampling_spread(self) -> float:
        return self.keep_spread or (ALLOCATION_SPREAD if self.regression == "allocation" else 0.0)

    @property
    def compensates(self) -> bool:
        if self.compensate == "auto":
            return self.method in COMPENSATE_AUTO or (self.method.startswith("bonsai") and self.prior.startswith("flap"))
        return self.compensate == "on"
    multiple_of: int = 1  # kept MLP units per layer rounded to a multiple of this (prune/align.py); 1 = off
    # "equal": every layer keeps the same number of query heads per key/value head (prune/align.py),
    # so GGUF/stock GQA kernels need no repeated K/V heads; "any": heads are chosen freely.
    gqa: str = "any"
    # Each iteration's prior averaged with the previous iterations' (on the parent's units): the
    # prior used is (this pass's + W x the running average) / (1 + W), so a step ranks on more windows
    # than its own dense pass read while still re-measuring the survivors. 0: off (each iteration's own).
    # FLAP's z-scored priors only (flap-parent, flap-anchored: one scale across iterations).
    # "auto" (resolved at construction): PRIOR_MEMORY_AUTO for bonsai on the prior alone (--regression
    # none) with a flap-parent/anchored prior, else 0.
    prior_memory: float | str = "auto"
    # How the removal splits between heads and MLP units and between edge and middle layers: "prior":
    # as the prior's global scale decides (FLAP's z-scores: about the same share of every group);
    # "search": each iteration evaluates the sub-models of a small grid of head / edge-layer offsets
    # to the prior and removes the best one's units, if fresh windows confirm it (search/offsets.py).
    # FLAP's z-scores only (offsets in z units). "auto": `auto_allocation` of the schedule (resolved at
    # construction, or with --first-step auto by prune.api once the first step is; unresolved it is prior).
    allocation: str = "auto"

    def __post_init__(self):
        if self.method not in METHODS:
            raise BonsaiError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        # "auto" settings become concrete here, so the resume key and the records say what ran.
        # Bonsai's defaults (flap prior, global candidates, within-group ranking, guard) are issue 10's
        # measured configuration; --prior wanda --candidates layer --rank relevance --no-guard is the paper's.
        bonsai = self.method == "bonsai" and self.regression != "allocation"  # allocation: the measured paper frame
        for name, value in (("prior", "flap-parent" if bonsai else "wanda"), ("candidates", "global" if bonsai else "layer"),
                            ("rank", "within" if bonsai and self.regression == "unit" else "relevance")):
            if getattr(self, name) == "auto":
                object.__setattr__(self, name, value)
        if self.cv_scope == "auto":
            object.__setattr__(self, "cv_scope", "within" if self.rank == "within" else "all")
        if self.prior_memory == "auto":
            remembers = (self.method == "bonsai" and self.regression == "none"
                         and self.prior in ("flap-parent", "flap-anchored"))
            object.__setattr__(self, "prior_memory", PRIOR_MEMORY_AUTO if remembers else 0.0)
        if self.allocation not in ("auto", "prior", "search"):
            raise BonsaiError(f"--allocation must be auto, prior or search, got {self.allocation!r}")
        if self.allocation == "search" and not (self.method == "bonsai" and self.prior.startswith("flap") and (
                self.regression == "none" or (self.regression == "unit" and self.rank == "within"))):
            raise BonsaiError("--allocation search shifts FLAP's z-scores: it needs --method bonsai with a flap prior "
                              "and --regression none (or unit with --rank within)")
        if not 0.0 < self.sparsity < 1.0:
            raise BonsaiError(f"--sparsity must be in (0, 1), got {self.sparsity}")
        if not 0.0 < self.p_iter <= self.sparsity:
            raise BonsaiError(f"--p-iter must be in (0, sparsity={self.sparsity}], got {self.p_iter}")
        if self.p_iter >= 0.5:
            raise BonsaiError(f"--p-iter must be below 0.5 (the sampler perturbs 2 x p_iter of each layer), got {self.p_iter}")
        if self.first_step != "auto" and (not 0.0 <= self.first_step <= self.sparsity or self.first_step >= 0.5):
            raise BonsaiError(f"--first-step must be 0 (= --p-iter) or in (0, sparsity={self.sparsity}] and below 0.5 "
                              f"(the sampler perturbs twice a step of each layer), got {self.first_step}")
        if not 0.0 <= self.keep_spread <= 1.0:
            raise BonsaiError(f"--keep-spread must be in [0, 1] (1: any kept count from none to all), "
                              f"got {self.keep_spread}")
        if self.sparsity > MAX_SPARSITY:
            raise BonsaiError(f"--sparsity must be at most {MAX_SPARSITY} (beyond it a model keeps too little of each "
                              f"layer to be useful, and the iterative search stops short of the target), got {self.sparsity}")
        if self.regression not in REGRESSIONS:
            raise BonsaiError(f"--regression must be one of {', '.join(REGRESSIONS)}, got {self.regression!r}")
        if self.compensate not in ("auto", "on", "off"):
            raise BonsaiError(f"--compensate must be auto, on or off, got {self.compensate!r}")
        if self.rank not in ("relevance", "per-param", "within"):
            raise BonsaiError(f"--rank must be relevance, per-param or within, got {self.rank!r}")
        if self.regression == "allocation" and self.prior.startswith("flap"):
            raise BonsaiError("--regression allocation scales a positive prior per group; FLAP's z-scores are not "
                              "positive: use --prior wanda or activation with it")
        if self.fluctuation not in ("auto", "variance", "residual"):
            raise BonsaiError(f"--fluctuation must be auto, variance or residual, got {self.fluctuation!r}")
        if self.cv_scope not in ("all", "within"):
            raise BonsaiError(f"--cv-scope must be all or within, got {self.cv_scope!r}")
        if self.candidates not in ("layer", "global"):
            raise BonsaiError(f"--candidates must be layer or global, got {self.candidates!r}")
        if self.prior not in ("wanda", "activation", "flap", "flap-parent", "flap-anchored"):
            raise BonsaiError(f"--prior must be wanda, activation, flap, flap-parent or flap-anchored, got {self.prior!r}")
        if self.prior_memory < 0 or (self.prior_memory and self.prior not in ("flap-parent", "flap-anchored")):
            raise BonsaiError(f"--prior-memory must be 0 (off) or positive with --prior flap-parent or flap-anchored "
                              f"(scores on the parent's scale in every iteration), got {self.prior_memory:g} with "
                              f"--prior {self.prior}")
        if self.gqa not in ("any", "equal"):
            raise BonsaiError(f"--gqa must be any or equal, got {self.gqa!r}")
        if self.multiple_of < 1:
            raise BonsaiError(f"--multiple-of must be at least 1 (1 turns alignment off), got {self.multiple_of}")
        if self.masks_per_iter < 2:
            raise BonsaiError("--masks-per-iter must be at least 2 (a mask and its complement)")
        if self.method == "bonsai" and self.regression != "none" and self.masks_per_iter < MIN_REGRESSION_MASKS:
            raise BonsaiError(f"--masks-per-iter must be at least {MIN_REGRESSION_MASKS} for bonsai's regression (it "
                              f"cross-validates on held-out mask pairs), got {self.masks_per_iter}")
        if self.allocation == "auto" and self.first_step != "auto":  # else prune.api resolves it with the first step
            object.__setattr__(self, "allocation", self.resolved_allocation())

    @property
    def iterations(self) -> int:
        return len(self.schedule)

    @property
    def schedule(self) -> tuple[float, ...]:
        return removal_schedule(self.sparsity, self.p_iter, self._first)

    @property
    def _first(self) -> float:
        return 0.0 if self.first_step == "auto" else self.first_step

    def resolved_allocation(self) -> str:
        """What --allocation auto resolves to on this schedule (`auto_allocation`)."""
        return auto_allocation(self.method, self.prior, self.regression, smallest_step(self.schedule))

    def step(self, iteration: int) -> float:
        """Share of the parent's non-embedding parameters iteration `iteration` removes."""
        s = self.schedule
        return s[iteration] - (s[iteration - 1] if iteration else 0.0)

    def dense_scale(self, iteration: int) -> int:
        """How many times --prior-samples windows iteration `iteration`'s dense pass draws (`dense_scale`)."""
        return dense_scale(self.method, self.step(iteration), self.p_iter, self._first)


def dense_scale(method: str, step: float, p_iter: float, first_step: float) -> int:
    """A step of k x p_iter gets k times the dense-pass windows (rounded, at least 1), so the priors
    cost the same forward tokens per parameter removed whatever the schedule: a first step of 0.2 at
    p_iter 0.05 measures its priors on 4x the windows, the tokens of the four steps it replaces.
    With equal steps (first_step 0) and for flap (one pass, whatever the schedule) it is 1."""
    if not first_step or method == "flap":
        return 1
    return max(1, round(step / p_iter))


def removal_schedule(sparsity: float, p_iter: float, first_step: float = 0.0) -> tuple[float, ...]:
    """Share of the parent's non-embedding parameters removed after each iteration: a first step of
    `first_step` (0: `p_iter`), then steps of `p_iter`, the last one cut at `sparsity`."""
    # tolerance: 0.5 / 0.05 is 10.000000000000002 in floating point
    if not first_step:  # (i + 1) p_iter, as runs before the setting computed it, to the last bit
        return tuple(min(sparsity, (i + 1) * p_iter) for i in range(math.ceil(sparsity / p_iter - 1e-9)))
    first = min(first_step, sparsity)
    rest = max(0, math.ceil((sparsity - first) / p_iter - 1e-9))
    return tuple(min(sparsity, first + i * p_iter) for i in range(rest + 1))


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
    # After the search: "ls" refits the kept columns of every pruned o_proj / down_proj to the dense
    # output on `refit_samples` windows of the prior's length (prune/refit.py); "off": biases only.
    # "loop": also after every iteration but the last, so the next iteration's priors and sub-models
    # see the refitted model (the one the user gets), not the bias-compensated one. "auto" (the
    # CLI's default): ls when its memory fits the budget, else off (prune.api resolves it).
    refit: str = "off"
    refit_samples: int = 0  # 0: auto (`refit.auto_refit_samples`, resolved by prune.api before the search)
    # The priors' and sub-models' passes may hold LLM.int8() weights (CUDA, bitsandbytes) where the
    # planner finds that faster, or the only plan under the budget (search/int8.py).
    allow_8bit: bool = False

    def __post_init__(self):
        if self.refit not in ("auto", "off", "ls", "loop"):
            raise BonsaiError(f"--refit must be auto, off, ls or loop, got {self.refit!r}")
        if self.refit_samples < 0:
            raise BonsaiError(f"--refit-samples must be at least 1 (or auto), got {self.refit_samples}")

    def resume_key(self) -> dict:
        """Settings that must match for a run directory to be resumed (paths to outputs excluded)."""
        d = asdict(self)
        d.pop("out")
        d.pop("spill_dir")
        d.pop("budget")  # a different budget changes speed, not results
        for name in ("first_step", "prior_memory"):  # runs from before the setting existed resume
            if not getattr(self.search, name):
                d["search"].pop(name)
        if self.search.allocation in ("prior", "auto"):  # unresolved "auto" runs as prior
            d["search"].pop("allocation")
        if not self.allow_8bit:  # runs from before the setting existed resume
            d.pop("allow_8bit")
        if self.refit != "loop":  # the refit follows the search: changing it re-exports a finished search
            d.pop("refit")
            d.pop("refit_samples")
        return d

    @property
    def refit_seq_len(self) -> int:
        return self.calib.prior_seq_len or self.calib.seq_len


PRESETS = {
    # Budgets for SmolLM2-135M at 50% on 2 CPU cores (issue 10): quick <= 5 min, standard <= 20 min.
    # quick: few short samples, few masks, big steps; the priors and compensation means come from a
    # separate dense pass over 16 windows of the search's length (12% more forward tokens than reusing
    # the 4 search windows; 35%, 3 seeds: 89.3 against 110.6, docs/RESULTS.md).
    "quick": dict(p_iter=0.1, masks_per_iter=24, samples=4, seq_len=128, prior_samples=16, prior_seq_len=0),
    # standard: the paper's p_iter, more sub-models, and a separate dense pass over 16 x 512 tokens
    # for the priors and compensation means (issue 10, item 5).
    "standard": dict(p_iter=0.05, masks_per_iter=32, samples=4, seq_len=128, prior_samples=16, prior_seq_len=512),
    # paper: appendix A.2
    "paper": dict(p_iter=0.05, masks_per_iter=200, samples=32, seq_len=2048, prior_samples=0, prior_seq_len=0),
}
