"""Algorithm 1 (Bonsai) and its baselines, iterated to the target sparsity, resumable.

Per iteration: fresh calibration windows; priors from a streamed dense pass of the current model;
for `bonsai`: choose the candidates (the bottom 2 p_iter of each layer by prior, the paper's, or of
the whole model on the prior's global scale), sample (mask, complement) pairs over them, evaluate
every sub-model's loss, regress loss on the masks; rank the candidates by the betas (globally, or
inside each group with the prior's allocation) unless the guard finds the prior predicts the pairs
as well; drop the lowest-scoring units worth p_iter of the parent's non-embedding parameters
(eq. 2); physically remove them.

This module is one iteration (`Pruner.iteration`); `prune.run.run_pruning` iterates it to the
target sparsity and resumes it. The run state (prune/state.py) is committed after the priors and
sampled masks of an iteration and after every evaluated chunk of sub-models, so a kill loses at
most one chunk. Every random draw is seeded from (seed, iteration, purpose) rather than from a
stateful generator, so a resumed run draws what the uninterrupted run drew and ends bit-identical
to it. `faults.checkpoint` marks the points a test kills the run at.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace

import torch

from bonsai_lite.calib.data import calibration_tokens
from bonsai_lite.config import RunConfig
from bonsai_lite.errors import BonsaiError, BudgetError
from bonsai_lite.io.model import StreamedModel
from bonsai_lite.progress import NullProgress
from bonsai_lite.prune import compensation as C
from bonsai_lite.prune import scores as S
from bonsai_lite.prune.faults import checkpoint
from bonsai_lite.io.checkpoint import Checkpoint
from bonsai_lite.prune.align import align_drop, equal_groups_drop
from bonsai_lite.prune.ranking import regress_and_rank
from bonsai_lite.prune.select import (apply_drop, comparable_prior, greedy_drop, normalised_prior, uniform_drop,
                                      unit_costs)
from bonsai_lite.prune.state import RunState, group_key, layers_from_json, layers_to_json
from bonsai_lite.search.engine import evaluate
from bonsai_lite.search.observe import StatsTap
from bonsai_lite.search.offsets import allocation_grid, allocation_offsets, distinct
from bonsai_lite.search.machine import detect_machine, page_cache_now
from bonsai_lite.search.pass_costs import column_norm_seconds, refit_seconds, second_moment_seconds
from bonsai_lite.search.planner import Work, make_plan
from bonsai_lite.search.sampling import global_candidates, sample_masks
from bonsai_lite.structure import LayerStructure, UnitLayout, positions_in_parent

log = logging.getLogger(__name__)

# Upper bound on the predicted time of one evaluated chunk of sub-models, i.e. on the work a kill
# can lose. A layer-major plan evaluates all masks in one pass (one read of the weights); on a 7B
# model that pass can take an hour, so it is split into chunks of at most this many seconds, at the
# cost of one extra read of the weights per chunk (seconds against minutes of compute).
CHECKPOINT_SECONDS = 600.0
LOOP_REFIT_DIR = "loop-refit"  # --refit loop: one folder of refitted projections per iteration, in the run dir


@dataclass
class PruneOutcome:
    layers: tuple[LayerStructure, ...]
    extra_biases: dict
    history: list[dict]


def _seed(cfg: RunConfig, iteration: int, salt: int) -> int:
    # Derived, not stateful: a resumed run draws exactly what the uninterrupted run drew.
    return (cfg.search.seed * 1_000_003 + iteration * 7919 + salt) % (2**63 - 1)


class Pruner:
    def __init__(self, cfg: RunConfig, *, ids: torch.Tensor | None, state: RunState | None, progress=None,
                 checkpoint_masks: int | None = None, ranks=None):
        self.cfg, self.ids, self.state = cfg, ids, state
        self.progress = progress if progress is not None else NullProgress()
        self.it = 0  # the iteration in progress, for the metrics lines
        self.checkpoint_masks = checkpoint_masks
        self.ranks = ranks  # prune.distributed.Ranks on rank 0 of a torchrun job: chunks are split across ranks
        self.parent = StreamedModel.open(cfg.model)
        self.machine = detect_machine(device=cfg.device, budget=cfg.budget, spill_dir=cfg.spill_dir,
                                      checkpoint=cfg.model)
        self.dense_params = self.parent.spec.non_embedding_params()
        self.column_norms = S.ColumnNorms()  # the parent's o/down column norms, read at the first prior
        self._planned = False  # no pass of this process has streamed the checkpoint yet
        self._overlay = None  # the --refit loop overlay the column norms were read from

    # ---- helpers -----------------------------------------------------------------------------
    def _plan(self, model, masks: int, samples: int, seq_len: int | None = None):
        self.machine = page_cache_now(self.machine, self.cfg.model, streamed=self._planned)
        self._planned = True  # every plan is for a pass over the model, which follows at once
        return make_plan(model.spec, model.layers, Work(masks, samples, seq_len or self.cfg.calib.seq_len),
                         self.machine, dtype=self.cfg.dtype, allow_8bit=self.cfg.allow_8bit)

    def _tokens(self, iteration: int) -> torch.Tensor:
        c = self.cfg.calib
        return calibration_tokens(self.ids, samples=c.samples, seq_len=c.seq_len, seed=_seed(self.cfg, iteration, 1))

    def _prior_tokens(self, iteration: int, tokens: torch.Tensor) -> torch.Tensor:
        """Windows of the dense pass (priors, compensation means): their own draw when configured."""
        c = self.cfg.calib
        if not c.prior_samples:
            return tokens
        seq = c.prior_seq_len or c.seq_len
        # a larger step draws more windows (config.dense_scale), as many as the text holds (prune.api
        # checked it holds --prior-samples)
        n = min(c.prior_samples * self.cfg.search.dense_scale(iteration), max(c.prior_samples, self.ids.numel() // seq))
        return calibration_tokens(self.ids, samples=n, seq_len=seq, seed=_seed(self.cfg, iteration, 5))

    def _target_removed(self, iteration: int) -> float:
        s = self.cfg.search
        frac = s.sparsity if s.method == "flap" else s.schedule[min(iteration, s.iterations - 1)]
        return frac * self.dense_params

    def _need(self, iteration: int, model) -> float:
        """Non-embedding parameters this iteration must remove from `model` (eq. 2's p_iter step)."""
        return self._target_removed(iteration) - (self.dense_params - model.spec.non_embedding_params(model.layers))

    def _chunk(self, plan, n_masks: int, n_samples: int) -> int:
        """Sub-models per commit: one pass of the plan, capped by CHECKPOINT_SECONDS and --checkpoint-masks."""
        chunk = max(1, plan.group_rows // n_samples)
        per_mask = plan.predicted_seconds / n_masks
        if per_mask > 0:
            chunk = min(chunk, max(1, int(CHECKPOINT_SECONDS / per_mask)))
        if self.ranks is not None:  # every rank evaluates one such share per commit
            chunk *= self.ranks.world
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
        log.info("iteration %d plan: %s", self.it + 1, plan.summary())
        log.debug(plan.describe())
        chunk = len(masks) if tap is not None else self._chunk(plan, len(masks), len(tokens))
        losses = st.tensors.get("losses")
        if losses is None or len(losses) != len(masks) or tap is not None:
            losses, done = torch.full((len(masks),), float("nan"), dtype=torch.float64), 0
        else:
            losses, done = losses.clone(), int(st.meta.get("masks_done", 0))
        # The bar advances per block of each pass (the engine's callback), in units of sub-models.
        per_call = 1.0 / (len(tokens) * len(model.layers))
        left = 1 - done / len(masks)
        with self.progress.stage("evaluate", total=len(masks), predicted=plan.predicted_seconds * left,
                                 iteration=self.it, masks=len(masks) - done) as bar:
            bar.advance(done)
            for k0 in range(done, len(masks), chunk):
                k1 = min(len(masks), k0 + chunk)
                if self.ranks is not None and tap is None:  # split across torchrun ranks
                    losses[k0:k1] = self.ranks.evaluate(layers_to_json(model.layers), tokens, masks[k0:k1],
                                                        first=k0, local=self.evaluate_share,
                                                        extra=C.model_tensors(model))
                    bar.advance(k1 - k0)
                    bar.tokens += (k1 - k0) * tokens.numel()
                else:
                    sub = plan if chunk == len(masks) else self._plan(model, k1 - k0, len(tokens))
                    res = evaluate(model, tokens, masks[k0:k1], sub, tap=tap, spill_dir=self.cfg.spill_dir,
                                   progress=lambda rows: bar.advance(rows * per_call))
                    losses[k0:k1] = self._finite_or_retry(model, tokens, masks[k0:k1], res.nll, dtype=sub.dtype,
                                                          first=k0)
                    bar.tokens += res.stats.tokens
                st.tensors["losses"] = losses
                st.meta["masks_done"] = k1
                st.commit()
                checkpoint("evaluate")
        return losses

    def evaluate_share(self, layers: list, tokens, masks, *, first: int, extra: dict | None = None) -> torch.Tensor:
        """One rank's share of a distributed chunk, planned for this rank's own device and budget; `extra`
        carries the compensation biases and fills of the model rank 0 evaluates (`compensation.model_tensors`)."""
        model = C.with_model_tensors(self.parent.with_layers(layers_from_json(layers)), extra or {})
        plan = self._plan(model, len(masks), len(tokens), tokens.shape[1])
        res = evaluate(model, tokens, masks, plan, spill_dir=self.cfg.spill_dir)
        return self._finite_or_retry(model, tokens, masks, res.nll, dtype=plan.dtype, first=first)

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
        kind = self.cfg.search.prior
        seq = tokens.shape[1]
        plan = self._plan(model, 1, len(tokens), seq)
        log.debug(plan.describe())
        predicted = plan.predicted_seconds
        observe = None  # FLAP's column norms from this pass's own weights, where they are the checkpoint's
        if kind.startswith("flap") and not self.column_norms.loaded:
            if not plan.weights_8bit and S.whole_projections(model, getattr(torch, plan.dtype)):
                observe = self.column_norms.observe
            predicted += column_norm_seconds(model.spec, self.machine, read=observe is None)
        residual = self._residual_groups(model)
        if residual:
            predicted += second_moment_seconds(model.spec, model.layers, tokens.numel(), self.machine)
        while True:
            tap = StatsTap(len(model.layers), n_samples=len(tokens), residual=residual)
            with self.progress.stage("priors", total=len(model.layers), predicted=predicted,
                                     iteration=self.it) as bar:
                dense = evaluate(model, tokens, None, plan, tap=tap, spill_dir=self.cfg.spill_dir,
                                 progress=lambda rows: bar.advance(rows / len(tokens)), on_weights=observe)
                if kind in ("flap-parent", "flap-anchored"):  # z-scores on the parent's group scale
                    prior = self._flap_parent(model, tap.stats, layout, anchored=kind == "flap-anchored")
                else:
                    prior = S.prior_scores(model, tap.stats, layout, kind=kind, columns_of=self.column_norms,
                                           fluctuation=self.cfg.search.fluctuation)
                bar.tokens += dense.stats.tokens
            if torch.isfinite(dense.nll).all() and torch.isfinite(prior).all():
                return dense, tap, prior
            if plan.dtype == "float32":
                raise BonsaiError("the dense model's activations or loss are NaN/inf even in float32; "
                                  "check the checkpoint's weights (a corrupt or badly converted download?)")
            log.warning("dense pass overflowed in %s; repeating it in float32", plan.dtype)
            plan = make_plan(model.spec, model.layers, Work(1, len(tokens), seq), self.machine, dtype="float32")
            predicted = plan.predicted_seconds

    def _residual_groups(self, model) -> dict[str, int] | None:
        """The tap's group sizes when FLAP's metric is computed on residual covariances, else None."""
        s = self.cfg.search
        if s.fluctuation != "residual" or not (s.method == "flap" or s.prior.startswith("flap")):
            return None
        return {"heads": model.spec.head_dim, "mlp": 1}

    def _flap_parent(self, model, stats, layout, *, anchored: bool = False) -> torch.Tensor:
        """FLAP scores standardised with the parent's per-group mean and std, kept in the run state;
        ``anchored`` first divides each group by its drift from the parent's column scores.

        Re-standardising every iteration re-centres each group on its survivors, so a group whose
        weak units went first looks weak again and the iterations drift towards a uniform split:
        iterative FLAP at 20% gave 45.9 against one-shot FLAP's 40.7 (SmolLM2, seed 2). The parent's
        scale still lets a group's whole score level move as upstream removals rescale its
        activations; the anchor takes that group-wide move out (docs/RESULTS.md measures both)."""
        st = self.state
        saved = {group_key(k): (float(v[0]), float(v[1])) for k, v in st.tensors.items() if k.startswith("flapnorm:")}
        anchor = {group_key(k): (st.tensors["flapcol:" + k[len("flapval:"):]], v) for k, v in st.tensors.items()
                  if k.startswith("flapval:")} if anchored and saved else None
        scores, own, columns = S.flap_unit_scores(model, stats, layout, norms=saved or None, anchor=anchor,
                                                  columns_of=self.column_norms, fluctuation=self.cfg.search.fluctuation)
        if not saved:
            st.tensors.update({f"flapnorm:{l}:{k}": torch.tensor(v, dtype=torch.float64) for (l, k), v in own.items()})
            if anchored:
                for (l, k), (cols, vals) in columns.items():
                    st.tensors.update({f"flapcol:{l}:{k}": cols, f"flapval:{l}:{k}": vals})
        return scores

    def _sampled(self, it: int, model, tokens, layout):
        """Priors, compensation means and sampled masks of iteration `it`: from the run state when a
        killed run got that far."""
        st, s = self.state, self.cfg.search
        pending = st.meta.get("pending") or {}
        if pending.get("iteration") == it and "masks" in st.tensors:
            log.info("iteration %d: priors and %d sampled masks taken from the run state; %d already evaluated",
                     it + 1, len(st.tensors["masks"]), int(st.meta.get("masks_done", 0)))
            means = {group_key(k): v for k, v in st.tensors.items() if k.startswith("mean:")}
            return dict(pending["info"]), st.tensors["prior"], st.tensors["masks"], st.tensors["candidates"], means
        dense, tap, prior = self._priors(model, self._prior_tokens(it, tokens))
        prior = self._remembered(prior, model.layers)
        means = C.column_means(tap)
        g = torch.Generator().manual_seed(_seed(self.cfg, it, 3))
        chosen = None
        if s.candidates == "global":
            head_p, mlp_p = model.spec.unit_params()
            chosen = global_candidates(comparable_prior(prior, layout.groups(), s.prior),
                                       unit_costs(layout, head_params=head_p, mlp_params=mlp_p),
                                       2 * s.step(it) * self.dense_params, layout.groups())
        sample = sample_masks(prior, groups=layout.groups(), p_iter=s.step(it), n_masks=s.masks_per_iter, generator=g,
                              keep_spread=s.sampling_spread, candidates=chosen)
        masks = sample.masks
        if s.regression.startswith("best"):  # the prior's own proposal is evaluated beside the sampled masks, last
            masks = torch.cat([masks, self._prior_proposal(model, layout, prior, sample.candidates, it)[None]])
        info = {"iteration": it, "dense_nll": float(dense.nll[0])}
        st.meta.update(pending={"iteration": it, "info": info}, masks_done=0)
        st.tensors.update(prior=prior, masks=masks, candidates=sample.candidates)
        st.tensors.update({f"mean:{l}:{kind}": v for (l, kind), v in means.items()})
        st.tensors.pop("losses", None)
        st.commit()
        checkpoint("priors")
        return dict(info), prior, masks, sample.candidates, means

    def _remembered(self, prior: torch.Tensor, layers) -> torch.Tensor:
        """`--prior-memory W`: this pass's prior averaged with the running average of the earlier ones
        (kept on the parent's units in the run state, committed with this iteration's prior)."""
        w = self.cfg.search.prior_memory
        if not w:
            return prior
        at = positions_in_parent(layers, self.parent.layers)
        memory = self.state.tensors.get("prior_memory")
        if memory is None:
            memory = torch.full((UnitLayout.of(self.parent.layers).total,), math.nan, dtype=torch.float64)
        else:
            prior = (prior + w * memory[at].to(prior.dtype)) / (1 + w)
            memory = memory.clone()
        memory[at] = prior.to(torch.float64)
        self.state.tensors["prior_memory"] = memory
        return prior

    def _prior_proposal(self, model, layout, prior, candidates, it: int) -> torch.Tensor:
        """Keep-mask of what `--regression none` would remove this iteration (before alignment)."""
        head_p, mlp_p = model.spec.unit_params()
        ranked = torch.where(candidates, comparable_prior(prior, layout.groups(), self.cfg.search.prior),
                             torch.full_like(prior, math.inf))
        drop = greedy_drop(ranked, unit_costs(layout, head_params=head_p, mlp_params=mlp_p),
                           max(self._need(it, model), 0.0), tiebreak=normalised_prior(prior, layout.groups()))
        return ~drop

    def _searched(self):
        """The parent the iterations search: with `--refit loop`, its refitted projections from the
        last iteration's refit (an overlay folder named in the run state) read in place of its own."""
        name = self.state.meta.get("refit_overlay") if self.state is not None else None
        if not name:
            return self.parent
        if self._overlay != name:  # the kept columns' weights changed: their norms must be read again
            self._overlay, self.column_norms = name, S.ColumnNorms()
        return replace(self.parent, ckpt=Checkpoint(self.parent.root, overlay=self.state.dir / LOOP_REFIT_DIR / name))

    def refit(self, it: int, layers) -> tuple[str, dict]:
        """`--refit loop`: refit the structure after iteration `it` into a fresh overlay folder; returns
        the refitted biases. The run state names the folder once the caller commits it."""
        from bonsai_lite.prune.refit import refit_model

        cfg = self.cfg
        tokens = calibration_tokens(self.ids, samples=cfg.refit_samples, seq_len=cfg.refit_seq_len, seed=cfg.search.seed)
        name = f"{it + 1:04d}"
        predicted = refit_seconds(self.parent.spec, layers, tokens.numel(), tokens.shape[1], self.machine)
        with self.progress.stage("refit", total=len(layers), predicted=predicted, tokens=tokens.numel(),
                                 iteration=it) as bar:
            biases = refit_model(self.parent, layers, tokens, self.state.dir / LOOP_REFIT_DIR / name,
                                 device=self.machine.device, progress=lambda _l: bar.advance())
        return name, biases

    # ---- one iteration -------------------------------------------------------------------------
    def iteration(self, it: int, layers, biases: dict | None = None) -> tuple[tuple[LayerStructure, ...], dict, dict]:
        """One iteration on the model with `layers` and the compensation `biases` folded in so far;
        returns the new layers, the biases updated by this iteration's removals, and its record."""
        cfg, s = self.cfg, self.cfg.search
        model = self._searched().with_layers(layers).with_biases(biases or {})
        layout = UnitLayout.of(layers)
        tokens = self._tokens(it)
        self.it = it
        t0 = time.perf_counter()
        search_model = model
        head_p, mlp_p = model.spec.unit_params()
        costs = unit_costs(layout, head_params=head_p, mlp_params=mlp_p)
        if s.method in ("bonsai", "bonsai-noregress"):
            info, prior, masks, candidates, means = self._sampled(it, model, tokens, layout)
            search_model = model.with_fills(C.fills(means, layers, model.spec.head_dim)) if s.compensates else model
            ranked_prior = torch.where(candidates, comparable_prior(prior, layout.groups(), s.prior),
                                       torch.full_like(prior, math.inf))
            if s.method == "bonsai" and s.regression == "none":  # ablation: the prior alone, no sub-models
                scores = ranked_prior
            elif s.method == "bonsai" and s.regression.startswith("best"):
                scores = self._best_measured(search_model, tokens, masks, ranked_prior, candidates, info)
            elif s.method == "bonsai":
                losses = self._evaluate_masks(search_model, tokens, masks)
                checkpoint("regression")
                with self.progress.stage("regression", total=0, iteration=it, masks=int(torch.isfinite(losses).sum())):
                    scores, fitted = regress_and_rank(masks, losses, prior=prior, ranked_prior=ranked_prior,
                                                      candidates=candidates, groups=layout.groups(), search=s,
                                                      seed=_seed(cfg, it, 4), costs=costs)
                checkpoint("regressed")
                info.update(fitted)
            else:  # bonsai-noregress
                ntap = StatsTap(len(layers), n_samples=len(tokens), n_masks=len(masks))
                self._evaluate_masks(search_model, tokens, masks, tap=ntap)
                agg = S.noregress_scores(model, ntap, layout, masks)
                scores = torch.where(candidates, agg, torch.full_like(agg, math.inf))
        else:
            dense, tap, prior = self._priors(model, self._prior_tokens(it, tokens))
            means = C.column_means(tap)
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
                perturbable = sample_masks(prior, groups=layout.groups(), p_iter=s.step(it), n_masks=2,
                                           generator=g).candidates
                scores = torch.where(perturbable, prior, torch.full_like(prior, math.inf))
            else:  # flap
                scores = S.flap_unit_scores(model, tap.stats, layout, columns_of=self.column_norms,
                                            fluctuation=s.fluctuation)[0]
        need = self._need(it, model)
        tiebreak = normalised_prior(prior, layout.groups())  # ties (e.g. beta all 0) go by the prior

        def select(ranked: torch.Tensor) -> torch.Tensor:
            drop = (greedy_drop(ranked, costs, need, tiebreak=tiebreak) if need > 0
                    else torch.zeros(layout.total, dtype=torch.bool))
            if s.uniform:
                drop = uniform_drop(ranked, drop, layout, layers, tiebreak=tiebreak)
            if s.gqa == "equal" and not s.uniform:  # uniform_drop already keeps groups equal
                drop = equal_groups_drop(ranked, drop, layout, layers, tiebreak)
            return align_drop(ranked, drop, layout, s.multiple_of)

        if s.allocation == "search" and need > 0:
            drop = self._allocated(search_model, tokens, scores, select, layout, info)
        else:
            drop = select(scores)
        new_layers = apply_drop(layers, layout, drop)
        new_biases = dict(biases or {})
        if s.compensates:  # FLAP's bias compensation, for every method: removed units' mean output
            new_biases.update(C.compensated_biases(model, layout, drop, means))
        info["compensated_biases"] = len(new_biases)
        # Forward tokens spent (the compute a user pays): the dense pass plus every sub-model x window.
        n_masks = len(masks) if s.method in ("bonsai", "bonsai-noregress") and s.regression != "none" else 0
        info["forward_tokens"] = (self._prior_tokens(it, tokens).numel() + n_masks * tokens.numel()
                                  + info.get("confirm_tokens", 0) + info.get("allocation_tokens", 0))
        info.update(removed_units=int(drop.sum()), seconds=time.perf_counter() - t0,
                    removed_heads=[int(drop[h].sum()) for h in layout.heads],
                    removed_mlp=[int(drop[m].sum()) for m in layout.mlp],
                    params_non_embedding=model.spec.non_embedding_params(new_layers))
        return new_layers, new_biases, info

    def _best_measured(self, model, tokens, masks, ranked_prior, candidates, info: dict) -> torch.Tensor:
        """`--regression best`: scores under which the removal is what the lowest-loss sub-model
        removed (the prior's proposal, the last row, included), the prior ordering within each side."""
        losses = self._evaluate_masks(model, tokens, masks)
        best = int(torch.nan_to_num(losses, nan=math.inf).argmin())
        ok = losses[torch.isfinite(losses)]
        info.update(best_mask=best, best_is_prior=best == len(masks) - 1, loss_best=float(losses[best]),
                    loss_prior=float(losses[-1]), loss_mean=float(ok.mean()), loss_std=float(ok.std()))
        if self.cfg.search.regression == "best-confirmed" and best != len(masks) - 1:
            # the winner of many noisy measurements is biased low on its own windows: it must beat
            # the proposal again on windows it was not chosen on, else the proposal is removed
            fresh = self._confirm_tokens(self.it, tokens)
            pair = self._confirm_losses(model, fresh, masks[[best, len(masks) - 1]], "confirm")
            info.update(confirm_best=float(pair[0]), confirm_prior=float(pair[1]), confirm_tokens=2 * fresh.numel(),
                        confirmed=bool(pair[0] < pair[1]))
            if not pair[0] < pair[1]:
                best = len(masks) - 1
        finite = ranked_prior[candidates]
        lift = float(finite.max() - finite.min()) + 1.0 if finite.numel() else 0.0
        return torch.where(masks[best].bool() & candidates, ranked_prior + lift, ranked_prior)

    def _allocated(self, model, tokens, scores, select, layout, info: dict) -> torch.Tensor:
        """`--allocation search`: the removal of the candidate allocation (search/offsets.py) whose
        sub-model has the lowest loss on the step's windows, kept only if it beats the prior's own
        allocation again on a fresh draw of windows (as `best-confirmed`); else the prior's."""
        grid = allocation_grid()
        drops = [select(scores + allocation_offsets(layout, a, e)) for a, e in grid]
        tried = distinct(drops)  # the prior's allocation, grid[0], is always the first
        losses = self._confirm_losses(model, tokens, torch.stack([~drops[i] for i in tried]), "allocation")
        best = tried[int(torch.nan_to_num(losses, nan=math.inf).argmin())]
        spent = len(tried) * tokens.numel()
        info.update(allocation_losses={f"{grid[i][0]:g},{grid[i][1]:g}": float(x) for i, x in zip(tried, losses)})
        if best != 0:
            fresh = self._confirm_tokens(self.it, tokens, salt=7)
            pair = self._confirm_losses(model, fresh, torch.stack([~drops[best], ~drops[0]]), "allocation")
            spent += 2 * fresh.numel()
            info.update(allocation_confirm=[float(pair[0]), float(pair[1])], allocation_confirmed=bool(pair[0] < pair[1]))
            if not pair[0] < pair[1]:
                best = 0
        info.update(allocation=list(grid[best]), allocation_tokens=spent)
        return drops[best]

    def _confirm_tokens(self, iteration: int, tokens: torch.Tensor, salt: int = 6) -> torch.Tensor:
        """`best-confirmed`'s (and the allocation search's) windows: a draw of their own, shaped like the step's."""
        return calibration_tokens(self.ids, samples=len(tokens), seq_len=tokens.shape[1],
                                  seed=_seed(self.cfg, iteration, salt))

    def _confirm_losses(self, model, tokens, masks, stage: str) -> torch.Tensor:
        """Losses of the few sub-models `best-confirmed` and the allocation search compare (at most the
        offset grid's 9; not checkpointed: a killed run evaluates them again), timed as `stage` in the
        run's metrics (no bar of their own)."""
        plan = self._plan(model, len(masks), len(tokens), tokens.shape[1])
        with self.progress.stage(stage, total=0, predicted=plan.predicted_seconds, iteration=self.it,
                                 masks=len(masks)) as st:
            res = evaluate(model, tokens, masks, plan, spill_dir=self.cfg.spill_dir)
            st.tokens = res.stats.tokens
        return self._finite_or_retry(model, tokens, masks, res.nll, dtype=plan.dtype)
