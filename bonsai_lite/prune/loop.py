"""Algorithm 1 (Bonsai) and its baselines, iterated to the target sparsity, resumable.

Per iteration: fresh calibration windows; priors from a streamed dense pass of the current model;
for `bonsai`: sample (mask, complement) pairs around the fixed top (1 - 2 p_iter) of each layer,
evaluate every sub-model's loss, regress loss on the masks; drop the lowest-scoring units worth
p_iter of the parent's non-embedding parameters (eq. 2); physically remove them.

Resumable (docs/RELIABILITY.md): the run state (prune/state.py) is committed after the priors and
sampled masks of an iteration, after every evaluated chunk of sub-models, and after every
iteration, so a kill loses at most one chunk. Every random draw is seeded from (seed, iteration,
purpose) rather than from a stateful generator, so a resumed run draws what the uninterrupted run
drew and ends bit-identical to it. `faults.checkpoint` marks the points a test kills the run at.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bonsai_lite.calib.data import calibration_tokens
from bonsai_lite.config import RunConfig
from bonsai_lite.errors import BonsaiError, BudgetError
from bonsai_lite.io.model import StreamedModel
from bonsai_lite.prune import scores as S
from bonsai_lite.prune.faults import checkpoint
from bonsai_lite.prune.align import align_drop
from bonsai_lite.prune.select import apply_drop, greedy_drop, uniform_drop, unit_costs
from bonsai_lite.prune.state import RunState
from bonsai_lite.search.engine import evaluate
from bonsai_lite.search.observe import StatsTap
from bonsai_lite.search.planner import Work, detect_machine, make_plan
from bonsai_lite.search.priors import flap_bias_compensation
from bonsai_lite.search.regression import fit_relevance
from bonsai_lite.search.sampling import sample_masks
from bonsai_lite.structure import LayerStructure, UnitLayout

log = logging.getLogger(__name__)

# Upper bound on the predicted time of one evaluated chunk of sub-models, i.e. on the work a kill
# can lose. A layer-major plan evaluates all masks in one pass (one read of the weights); on a 7B
# model that pass can take an hour, so it is split into chunks of at most this many seconds, at the
# cost of one extra read of the weights per chunk (seconds against minutes of compute).
CHECKPOINT_SECONDS = 600.0


@dataclass
class PruneOutcome:
    layers: tuple[LayerStructure, ...]
    extra_biases: dict
    history: list[dict]


def _layers_to_json(layers) -> list[dict]:
    return [{"heads": list(s.heads), "kv_of_head": list(s.kv_of_head), "mlp": list(s.mlp)} for s in layers]


def _layers_from_json(data) -> tuple[LayerStructure, ...]:
    return tuple(LayerStructure(tuple(d["heads"]), tuple(d["kv_of_head"]), tuple(d["mlp"])) for d in data)


def _seed(cfg: RunConfig, iteration: int, salt: int) -> int:
    # Derived, not stateful: a resumed run draws exactly what the uninterrupted run drew.
    return (cfg.search.seed * 1_000_003 + iteration * 7919 + salt) % (2**63 - 1)


class Pruner:
    def __init__(self, cfg: RunConfig, *, ids: torch.Tensor, state: RunState, progress=None,
                 checkpoint_masks: int | None = None):
        self.cfg, self.ids, self.state, self.progress = cfg, ids, state, progress or (lambda **kw: None)
        self.checkpoint_masks = checkpoint_masks
        self.parent = StreamedModel.open(cfg.model)
        self.machine = detect_machine(device=cfg.device, budget=cfg.budget, spill_dir=cfg.spill_dir)
        self.dense_params = self.parent.spec.non_embedding_params()

    # ---- helpers -----------------------------------------------------------------------------
    def _plan(self, model, masks: int, samples: int):
        return make_plan(model.spec, model.layers, Work(masks, samples, self.cfg.calib.seq_len), self.machine,
                         dtype=self.cfg.dtype)

    def _tokens(self, iteration: int) -> torch.Tensor:
        c = self.cfg.calib
        return calibration_tokens(self.ids, samples=c.samples, seq_len=c.seq_len, seed=_seed(self.cfg, iteration, 1))

    def _target_removed(self, iteration: int) -> float:
        s = self.cfg.search
        frac = s.sparsity if s.method == "flap" else min(s.sparsity, (iteration + 1) * s.p_iter)
        return frac * self.dense_params

    def _chunk(self, plan, n_masks: int, n_samples: int) -> int:
        """Sub-models per commit: one pass of the plan, capped by CHECKPOINT_SECONDS and --checkpoint-masks."""
        chunk = max(1, plan.group_rows // n_samples)
        per_mask = plan.predicted_seconds / n_masks
        if per_mask > 0:
            chunk = min(chunk, max(1, int(CHECKPOINT_SECONDS / per_mask)))
        if self.checkpoint_masks:
            chunk = min(chunk, self.checkpoint_masks)
        return min(chunk, n_masks)

    def _evaluate_masks(self, model, tokens, masks, *, tap=None) -> torch.Tensor:
        """Losses of all masks, committing after every chunk so a kill loses at most one chunk.

        With a tap (bonsai-noregress) the statistics live in memory only, so all masks are
        evaluated in one call and a resumed run evaluates them again.
        """
        st = self.state
        plan = self._plan(model, len(masks), len(tokens))
        log.info(plan.describe())
        chunk = len(masks) if tap is not None else self._chunk(plan, len(masks), len(tokens))
        losses = st.tensors.get("losses")
        if losses is None or len(losses) != len(masks) or tap is not None:
            losses, done = torch.full((len(masks),), float("nan"), dtype=torch.float64), 0
        else:
            losses, done = losses.clone(), int(st.meta.get("masks_done", 0))
        for k0 in range(done, len(masks), chunk):
            k1 = min(len(masks), k0 + chunk)
            sub = plan if chunk == len(masks) else self._plan(model, k1 - k0, len(tokens))
            res = evaluate(model, tokens, masks[k0:k1], sub, tap=tap, spill_dir=self.cfg.spill_dir)
            losses[k0:k1] = self._finite_or_retry(model, tokens, masks[k0:k1], res.nll, dtype=sub.dtype, first=k0)
            st.tensors["losses"] = losses
            st.meta["masks_done"] = k1
            st.commit()
            checkpoint("evaluate")
            self.progress(stage="evaluate", done=k1, total=len(masks))
        return losses

    def _finite_or_retry(self, model, tokens, masks, nll: torch.Tensor, *, dtype: str, first: int = 0) -> torch.Tensor:
        """Appendix G: fp16 sub-models can overflow; re-evaluate those in fp32, else leave them NaN (dropped)."""
        bad = ~torch.isfinite(nll)
        if bad.any() and dtype != "float32":
            log.warning("%d sub-model losses are NaN/inf in %s; re-evaluating them in float32", int(bad.sum()), dtype)
            try:
                plan = make_plan(model.spec, model.layers, Work(int(bad.sum()), len(tokens), self.cfg.calib.seq_len),
                                 self.machine, dtype="float32")
            except BudgetError as e:
                log.warning("float32 does not fit the memory budget (%s)", e)
            else:
                nll = nll.clone()
                nll[bad] = evaluate(model, tokens, masks[bad], plan, spill_dir=self.cfg.spill_dir).nll
                bad = ~torch.isfinite(nll)
        if bad.any():
            which = [first + int(i) for i in torch.nonzero(bad).flatten()]
            log.warning("sub-models %s have a NaN/inf loss even in float32; they are left out of the regression",
                        which[:10])
            nll = torch.where(bad, torch.full_like(nll, float("nan")), nll)
        return nll

    def _priors(self, model, tokens):
        """Dense pass with activation statistics; repeated in float32 if the compute dtype overflowed."""
        layout = UnitLayout.of(model.layers)
        kind = "wanda" if self.cfg.search.prior == "wanda" else "activation"
        plan = self._plan(model, 1, len(tokens))
        while True:
            tap = StatsTap(len(model.layers), n_samples=len(tokens))
            dense = evaluate(model, tokens, None, plan, tap=tap, spill_dir=self.cfg.spill_dir)
            prior = S.prior_scores(model, tap.stats, layout, kind=kind)
            if torch.isfinite(dense.nll).all() and torch.isfinite(prior).all():
                return dense, tap, prior
            if plan.dtype == "float32":
                raise BonsaiError("the dense model's activations or loss are NaN/inf even in float32; "
                                  "check the checkpoint's weights (a corrupt or badly converted download?)")
            log.warning("dense pass overflowed in %s; repeating it in float32", plan.dtype)
            plan = make_plan(model.spec, model.layers, Work(1, len(tokens), self.cfg.calib.seq_len), self.machine,
                             dtype="float32")

    def _sampled(self, it: int, model, tokens, layout):
        """Priors and sampled masks of iteration `it`: from the run state when a killed run got that far."""
        st, s = self.state, self.cfg.search
        pending = st.meta.get("pending") or {}
        if pending.get("iteration") == it and "masks" in st.tensors:
            log.info("iteration %d: priors and %d sampled masks taken from the run state; %d already evaluated",
                     it + 1, len(st.tensors["masks"]), int(st.meta.get("masks_done", 0)))
            return dict(pending["info"]), st.tensors["prior"], st.tensors["masks"], st.tensors["candidates"]
        dense, _, prior = self._priors(model, tokens)
        g = torch.Generator().manual_seed(_seed(self.cfg, it, 3))
        sample = sample_masks(prior, groups=layout.groups(), p_iter=s.p_iter, n_masks=s.masks_per_iter, generator=g,
                                  keep_spread=s.keep_spread)
        info = {"iteration": it, "dense_nll": float(dense.nll[0])}
        st.meta.update(pending={"iteration": it, "info": info}, masks_done=0)
        st.tensors.update(prior=prior, masks=sample.masks, candidates=sample.candidates)
        st.tensors.pop("losses", None)
        st.commit()
        checkpoint("priors")
        self.progress(stage="priors", done=1, total=1)
        return dict(info), prior, sample.masks, sample.candidates

    # ---- one iteration -------------------------------------------------------------------------
    def iteration(self, it: int, layers) -> tuple[tuple[LayerStructure, ...], dict, dict]:
        cfg, s = self.cfg, self.cfg.search
        model = self.parent.with_layers(layers)
        layout = UnitLayout.of(layers)
        tokens = self._tokens(it)
        t0 = time.perf_counter()
        extra: dict = {}
        if s.method in ("bonsai", "bonsai-noregress"):
            info, prior, masks, candidates = self._sampled(it, model, tokens, layout)
            if s.method == "bonsai":
                losses = self._evaluate_masks(model, tokens, masks)
                ok = torch.isfinite(losses)
                if ok.sum() < 4:
                    raise BonsaiError(f"only {int(ok.sum())} of {len(losses)} sub-models have a finite loss (at least "
                                      "4 are needed); use --dtype float32 or more --masks-per-iter")
                checkpoint("regression")
                reg = fit_relevance(masks[ok], losses[ok], penalty=s.penalty, seed=_seed(cfg, it, 4))
                checkpoint("regressed")
                beta = reg.beta.double()
                if s.rank == "per-param":
                    head_p, mlp_p = model.spec.unit_params()
                    beta = beta / unit_costs(layout, head_params=head_p, mlp_params=mlp_p)
                scores = torch.where(reg.estimated, beta, torch.full_like(beta, math.inf))
                info.update(cv_kendall_tau=reg.cv_kendall_tau, regression=reg.best_params, masks_used=int(ok.sum()),
                            masks_dropped=int((~ok).sum()), loss_mean=float(losses[ok].mean()),
                            loss_std=float(losses[ok].std()))
            else:  # bonsai-noregress
                ntap = StatsTap(len(layers), n_samples=len(tokens), n_masks=len(masks))
                self._evaluate_masks(model, tokens, masks, tap=ntap)
                agg = S.noregress_scores(model, ntap, layout, masks)
                scores = torch.where(candidates, agg, torch.full_like(agg, math.inf))
        else:
            dense, tap, prior = self._priors(model, tokens)
            self.progress(stage="priors", done=1, total=1)
            info = {"iteration": it, "dense_nll": float(dense.nll[0])}
            if s.method == "random":
                g = torch.Generator().manual_seed(_seed(cfg, it, 2))
                scores = torch.rand(layout.total, generator=g, dtype=torch.float64)
            elif s.method == "magnitude":
                scores = S.prior_scores(model, tap.stats, layout, kind="magnitude")
            elif s.method == "wanda-sp":
                # Figure 2's "no perturbation, no regression" bar: the same iterative frame as Bonsai
                # (top 1 - 2 p_iter of every layer fixed by the prior), ranked by the prior alone.
                # A global ranking of raw module-level Wanda scores is not comparable across layers
                # (activation scale grows with depth) and strips whole layers.
                g = torch.Generator().manual_seed(_seed(cfg, it, 3))
                perturbable = sample_masks(prior, groups=layout.groups(), p_iter=s.p_iter, n_masks=2,
                                           generator=g).candidates
                scores = torch.where(perturbable, prior, torch.full_like(prior, math.inf))
            else:  # flap
                scores, _ = S.flap_unit_scores(model, tap.stats, layout)
        head_p, mlp_p = model.spec.unit_params()
        costs = unit_costs(layout, head_params=head_p, mlp_params=mlp_p)
        need = self._target_removed(it) - (self.dense_params - model.spec.non_embedding_params(layers))
        drop = greedy_drop(scores, costs, need) if need > 0 else torch.zeros(layout.total, dtype=torch.bool)
        if s.uniform:
            drop = uniform_drop(scores, drop, layout, layers)
        drop = align_drop(scores, drop, layout, s.multiple_of)
        new_layers = apply_drop(layers, layout, drop)
        if s.method == "flap":  # FLAP's bias compensation for the removed channels' mean output
            for l, (h, m) in enumerate(zip(layout.heads, layout.mlp)):
                o, d = S.output_projections(model, l)
                names = model.spec.adapter.block_tensor_names(l)
                hd = model.spec.head_dim
                keep_cols = (~drop[h]).repeat_interleave(hd)
                if (l, "heads") in tap.stats and not keep_cols.all():
                    extra[names["o_b"]] = flap_bias_compensation(o, tap.stats[(l, "heads")], keep_columns=keep_cols)
                if (l, "mlp") in tap.stats and drop[m].any():
                    extra[names["down_b"]] = flap_bias_compensation(d, tap.stats[(l, "mlp")], keep_columns=~drop[m])
        info.update(removed_units=int(drop.sum()), seconds=time.perf_counter() - t0,
                    params_non_embedding=model.spec.non_embedding_params(new_layers))
        return new_layers, extra, info


def run_pruning(cfg: RunConfig, *, ids: torch.Tensor, run_dir: str | Path, restart: bool = False,
                progress=None, checkpoint_masks: int | None = None) -> PruneOutcome:
    """Run (or resume) the search; returns the final structure. Export is the caller's next step.

    `checkpoint_masks` caps the sub-models evaluated between two commits of the run state (speed
    versus work lost to a kill; results do not depend on it beyond floating-point rounding).
    """
    state = RunState(run_dir)
    key = {**_jsonable(cfg.resume_key()), "calib_tokens_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest()}
    n_iter = 1 if cfg.search.method == "flap" else cfg.search.iterations
    if state.exists and not restart:
        state.load()
        diff = _differences(state.meta.get("config", {}), key)
        if diff:
            raise BonsaiError(f"{run_dir} holds a run with different settings ({'; '.join(diff)}); pass --restart "
                              "to start over or use another --run-dir")
        if state.meta["iteration"] >= n_iter:
            log.info("resuming %s: the search finished before (%d iterations); exporting", run_dir, n_iter)
        else:
            log.info("resuming %s at iteration %d/%d (%d sub-models of it already evaluated)", run_dir,
                     state.meta["iteration"] + 1, n_iter, int(state.meta.get("masks_done", 0)))
    else:
        if state.exists:
            log.info("--restart: discarding the run state in %s", run_dir)
        state.meta = {"config": key, "iteration": 0, "history": [], "layers": None}
        state.tensors = {}
    pruner = Pruner(cfg, ids=ids, state=state, progress=progress, checkpoint_masks=checkpoint_masks)
    layers = _layers_from_json(state.meta["layers"]) if state.meta["layers"] else pruner.parent.layers
    while state.meta["iteration"] < n_iter:
        it = state.meta["iteration"]
        layers, extra, info = pruner.iteration(it, layers)
        log.info("iteration %d/%d: %s", it + 1, n_iter, {k: v for k, v in info.items() if k != "regression"})
        for name, bias in extra.items():
            state.tensors[f"bias:{name}"] = bias
        state.meta.update(iteration=it + 1, layers=_layers_to_json(layers), masks_done=0, pending=None)
        state.meta["history"].append(info)
        for name in ("losses", "prior", "masks", "candidates"):
            state.tensors.pop(name, None)
        state.commit()
        checkpoint("iteration")
        if progress:
            progress(stage="iteration", done=it + 1, total=n_iter)
    extra = {k.split(":", 1)[1]: v for k, v in state.tensors.items() if k.startswith("bias:")}
    return PruneOutcome(layers=layers, extra_biases=extra, history=state.meta["history"])


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'search.sparsity: 0.3 -> 0.5' for every leaf setting that differs."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            if k.endswith("sha256"):  # a digest: its first characters tell the two apart
                a, b = (v[:12] if isinstance(v, str) else v for v in (a, b))
            out.append(f"{prefix}{k}: {a} -> {b}")
    return out


def _jsonable(x):
    import json

    return json.loads(json.dumps(x, default=str))
