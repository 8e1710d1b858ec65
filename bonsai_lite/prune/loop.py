"""Algorithm 1 (Bonsai) and its baselines, iterated to the target sparsity, resumable.

Per iteration: fresh calibration windows; priors from a streamed dense pass of the current model;
for `bonsai`: sample (mask, complement) pairs around the fixed top (1 - 2 p_iter) of each layer,
evaluate every sub-model's loss, regress loss on the masks; drop the lowest-scoring units worth
p_iter of the parent's non-embedding parameters (eq. 2); physically remove them. State is
committed after every stage and every evaluated chunk of masks (prune/state.py).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bonsai_lite.calib.data import calibration_tokens
from bonsai_lite.config import RunConfig
from bonsai_lite.errors import BonsaiError
from bonsai_lite.io.model import StreamedModel
from bonsai_lite.prune import scores as S
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
    def __init__(self, cfg: RunConfig, *, ids: torch.Tensor, state: RunState, progress=None):
        self.cfg, self.ids, self.state, self.progress = cfg, ids, state, progress or (lambda **kw: None)
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

    def _evaluate_masks(self, model, tokens, masks, *, tap=None) -> torch.Tensor:
        """Losses of all masks, committing after every chunk so a kill loses at most one chunk."""
        st = self.state
        plan = self._plan(model, len(masks), len(tokens))
        log.info(plan.describe())
        chunk = max(1, plan.group_rows // len(tokens)) if tap is None else len(masks)
        losses = st.tensors.get("losses", torch.full((len(masks),), float("nan"), dtype=torch.float64))
        done = int(st.meta.get("masks_done", 0))
        for k0 in range(done, len(masks), chunk):
            k1 = min(len(masks), k0 + chunk)
            res = evaluate(model, tokens, masks[k0:k1], plan if chunk == len(masks) else
                           self._plan(model, k1 - k0, len(tokens)), tap=tap, spill_dir=self.cfg.spill_dir)
            losses[k0:k1] = self._finite_or_retry(model, tokens, masks[k0:k1], res.nll)
            st.tensors["losses"] = losses
            st.meta["masks_done"] = k1
            st.commit()
            self.progress(stage="evaluate", done=k1, total=len(masks))
        return losses

    def _finite_or_retry(self, model, tokens, masks, nll: torch.Tensor) -> torch.Tensor:
        """Appendix G: fp16 sub-models can overflow; re-evaluate those in fp32, else mark NaN (dropped)."""
        bad = ~torch.isfinite(nll)
        if bad.any() and (self.cfg.dtype or "") != "float32" and self.machine.is_cuda:
            log.warning("%d sub-model losses not finite; re-evaluating them in float32", int(bad.sum()))
            plan = make_plan(model.spec, model.layers, Work(int(bad.sum()), len(tokens), self.cfg.calib.seq_len),
                             self.machine, dtype="float32")
            nll = nll.clone()
            nll[bad] = evaluate(model, tokens, masks[bad], plan, spill_dir=self.cfg.spill_dir).nll
            bad = ~torch.isfinite(nll)
        if bad.any():
            log.warning("dropping %d sub-models whose loss is NaN/inf from the regression", int(bad.sum()))
        return nll

    # ---- one iteration -------------------------------------------------------------------------
    def iteration(self, it: int, layers) -> tuple[tuple[LayerStructure, ...], dict, dict]:
        cfg, s, st = self.cfg, self.cfg.search, self.state
        model = self.parent.with_layers(layers)
        layout = UnitLayout.of(layers)
        tokens = self._tokens(it)
        t0 = time.perf_counter()
        tap = StatsTap(len(layers), n_samples=len(tokens))
        dense = evaluate(model, tokens, None, self._plan(model, 1, len(tokens)), tap=tap, spill_dir=cfg.spill_dir)
        self.progress(stage="priors", done=1, total=1)
        info = {"iteration": it, "dense_nll": float(dense.nll[0])}
        prior = S.prior_scores(model, tap.stats, layout, kind="wanda" if s.prior == "wanda" else "activation")
        extra: dict = {}
        if s.method == "random":
            g = torch.Generator().manual_seed(_seed(cfg, it, 2))
            scores = torch.rand(layout.total, generator=g, dtype=torch.float64)
        elif s.method == "magnitude":
            scores = S.prior_scores(model, tap.stats, layout, kind="magnitude")
        elif s.method == "wanda-sp":
            scores = prior
        elif s.method == "flap":
            scores, _ = S.flap_unit_scores(model, tap.stats, layout)
        else:
            g = torch.Generator().manual_seed(_seed(cfg, it, 3))
            sample = sample_masks(prior, groups=layout.groups(), p_iter=s.p_iter, n_masks=s.masks_per_iter, generator=g)
            masks = sample.masks
            if s.method == "bonsai":
                losses = self._evaluate_masks(model, tokens, masks)
                ok = torch.isfinite(losses)
                if ok.sum() < 4:
                    raise BonsaiError("fewer than 4 sub-models have a finite loss; use --dtype float32")
                reg = fit_relevance(masks[ok], losses[ok], penalty=s.penalty, seed=_seed(cfg, it, 4))
                beta = reg.beta.double()
                if s.rank == "per-param":
                    head_p, mlp_p = model.spec.unit_params()
                    beta = beta / unit_costs(layout, head_params=head_p, mlp_params=mlp_p)
                scores = torch.where(reg.estimated, beta, torch.full_like(beta, math.inf))
                info.update(cv_kendall_tau=reg.cv_kendall_tau, regression=reg.best_params,
                            loss_mean=float(losses[ok].mean()), loss_std=float(losses[ok].std()))
            else:  # bonsai-noregress
                ntap = StatsTap(len(layers), n_samples=len(tokens), n_masks=len(masks))
                self._evaluate_masks(model, tokens, masks, tap=ntap)
                agg = S.noregress_scores(model, ntap, layout, masks)
                scores = torch.where(sample.candidates, agg, torch.full_like(agg, math.inf))
        head_p, mlp_p = model.spec.unit_params()
        costs = unit_costs(layout, head_params=head_p, mlp_params=mlp_p)
        need = self._target_removed(it) - (self.dense_params - model.spec.non_embedding_params(layers))
        drop = greedy_drop(scores, costs, need) if need > 0 else torch.zeros(layout.total, dtype=torch.bool)
        if s.uniform:
            drop = uniform_drop(scores, drop, layout, layers)
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
                progress=None) -> PruneOutcome:
    """Run (or resume) the search; returns the final structure. Export is the caller's next step."""
    state = RunState(run_dir)
    key = cfg.resume_key()
    if state.exists and not restart:
        state.load()
        old = state.meta.get("config", {})
        diff = sorted(k for k in set(old) | set(key) if old.get(k) != _jsonable(key.get(k)))
        if diff:
            raise BonsaiError(f"{run_dir} holds a run with different settings ({', '.join(diff)}); "
                              "pass --restart to start over or use another --run-dir")
        log.info("resuming %s at iteration %d", run_dir, state.meta["iteration"])
    else:
        state.meta = {"config": _jsonable(key), "iteration": 0, "history": [], "layers": None, "extra_biases": []}
        state.tensors = {}
    pruner = Pruner(cfg, ids=ids, state=state, progress=progress)
    layers = _layers_from_json(state.meta["layers"]) if state.meta["layers"] else pruner.parent.layers
    n_iter = 1 if cfg.search.method == "flap" else cfg.search.iterations
    while state.meta["iteration"] < n_iter:
        it = state.meta["iteration"]
        layers, extra, info = pruner.iteration(it, layers)
        log.info("iteration %d/%d: %s", it + 1, n_iter, {k: v for k, v in info.items() if k != "regression"})
        for name, bias in extra.items():
            state.tensors[f"bias:{name}"] = bias
        state.meta.update(iteration=it + 1, layers=_layers_to_json(layers), masks_done=0)
        state.meta["history"].append(info)
        state.tensors.pop("losses", None)
        state.commit()
        if progress:
            progress(stage="iteration", done=it + 1, total=n_iter)
    extra = {k.split(":", 1)[1]: v for k, v in state.tensors.items() if k.startswith("bias:")}
    return PruneOutcome(layers=layers, extra_biases=extra, history=state.meta["history"])


def _jsonable(x):
    import json

    return json.loads(json.dumps(x, default=str))
