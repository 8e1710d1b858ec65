"""Least-squares refit of the output projections once the structure is chosen (forward passes only).

A pruned layer's o_proj and down_proj keep some of their input columns. Bias compensation (FLAP's)
folds the removed columns' mean contribution into the bias; the refit goes further and solves, on
calibration windows, for the kept columns and the bias whose output on the kept inputs best matches
the dense projection's output on all of them: a ridge regression on the inputs' second moments,
shrunk towards the original weights (docs/search-maths.md, "Refit"). Layers go in order, each on
the already-refitted model's activations, and within a layer the MLP sees the refitted attention,
so each step corrects what the steps before it left. Statistics come from the unpruned block (all
heads and units are computed, the removed ones only as regressors' targets).

`refit_projection` is the maths; `refit_model` streams the parent block by block (BlockLoader),
writes each refitted layer's weights (the parent's full shape and dtype, removed columns zero, so
the usual slicing cuts them) to its own safetensors file for `Checkpoint(..., overlay=folder)`, and
returns the new biases (small; they go where the compensation biases go).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from bonsai_lite.ops import attention, mlp, rms_norm, rotary_cos_sin
from bonsai_lite.search.priors import RIDGE_DAMP
from bonsai_lite.structure import LayerStructure

# Ridge weight, times the mean diagonal of the kept inputs' second moments. 0.01 is SparseGPT's
# dampening; 0.1 shrinks too far (SmolLM2-135M, 20%, seed 0: 31.0 against FLAP's bias alone 40.2;
# docs/RESULTS.md). Defined beside the residual fluctuation, which damps its covariances the same way.
DAMP = RIDGE_DAMP
OUT_BLOCK = 256  # output rows of a projection per step of normal_equations' right-hand side
COL_BLOCK = 2048  # columns of a second-moment tile product (its float32 temporary is k x COL_BLOCK)


def refit_projection(moments: tuple[torch.Tensor, torch.Tensor], weight: torch.Tensor, kept: torch.Tensor, *,
                     damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a projection that keeps the input columns `kept`, fitted to the dense output.

    `moments` holds what `_kept_moments` sums over the calibration tokens (it is consumed: the solve
    reuses its memory). The new weight has the parent's shape with the removed columns zero; both
    come back in float32, solved in float64."""
    return solve_refit(*normal_equations(moments, weight, kept, damp=damp), weight, kept)


def normal_equations(moments: tuple[torch.Tensor, torch.Tensor], weight: torch.Tensor, kept: torch.Tensor, *,
                     damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """The ridge's (A, B^T) for `refit_projection`, with Z = [X_kept, 1] and Y the dense output:
    A = Z^T Z + lambda on the kept inputs' diagonal, B = Z^T Y + lambda [W_kept, 0]^T (shrunk towards
    the original weights, not towards zero). Both are made in place in the moments (consumed), the
    ridge's term added a block of output rows at a time, so no float64 copy of the weight is made."""
    a, rhs_t = moments
    k = a.shape[0] - 1
    kept = kept.to(a.device)
    lam = damp * a.diagonal()[:-1].mean() if k else 0.0
    a.diagonal()[:-1] += lam
    for r in range(0, weight.shape[0], OUT_BLOCK):
        rhs_t[r:r + OUT_BLOCK, :k] += lam * weight[r:r + OUT_BLOCK].to(a.device).index_select(1, kept).double()
    return a, rhs_t


def _cholesky_solve_(a: torch.Tensor, rhs_t: torch.Tensor) -> torch.Tensor:
    """Solve A X = B for symmetric positive definite A, given B^T, into B^T's memory (X^T), A's
    memory holding the factor: no copy of either (A^T = A is the same matrix in column-major order,
    which LAPACK factors in place; the two triangular solves work in place on X = (B^T)^T)."""
    lower = a.mT
    torch.linalg.cholesky(lower, out=lower)
    x = rhs_t.mT
    torch.linalg.solve_triangular(lower, x, upper=False, out=x)
    torch.linalg.solve_triangular(lower.mT, x, upper=True, out=x)
    return rhs_t


def solve_refit(a: torch.Tensor, rhs_t: torch.Tensor, weight: torch.Tensor, kept: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve A beta = B (`normal_equations`) into float32 (weight, bias); A and B^T are overwritten."""
    beta_t = _cholesky_solve_(a, rhs_t)
    del a
    new = torch.zeros(weight.shape, dtype=torch.float32, device=beta_t.device)
    new[:, kept.to(beta_t.device)] = beta_t[:, :-1].float()
    return new, beta_t[:, -1].float()


def widest_input(spec) -> int:
    """Input width of the widest output projection (o_proj: heads x head_dim; down_proj: MLP units)."""
    return max(spec.n_heads * spec.head_dim, max(len(s.mlp) for s in spec.layers))


RESIDUAL_TOKENS_PER_INPUT = 4  # --fluctuation auto: dense-pass tokens per input of the widest projection


def residual_peak_bytes(spec) -> int:
    """What --fluctuation residual holds beside the dense pass: one float32 block, and the widest
    projection's input second moments with two float64 copies (their inverse, a solve's)."""
    width = widest_input(spec)
    return max(spec.block_params(s) for s in spec.layers) * 4 + 3 * width * width * 8


def residual_fits(spec, rows: int, budget: int) -> bool:
    """Whether --fluctuation auto picks the residual metric for a dense pass of `rows` tokens (in a
    run that refits): its memory fits `budget`, and there are RESIDUAL_TOKENS_PER_INPUT rows per
    input of the widest projection; a covariance of `width` inputs from fewer says more about its
    damping than about the inputs (a 7-8B MLP is 14,336 wide)."""
    return residual_peak_bytes(spec) <= budget and rows >= RESIDUAL_TOKENS_PER_INPUT * widest_input(spec)


def refit_peak_bytes(spec, tokens: int, seq_len: int, *, batch: int = 8) -> int:
    """What `refit_model` holds at its peak, about: one unpruned block in float32, the windows'
    hidden states twice (before and after the attention), the refitted projection's kept inputs over
    all windows (kept so the block is not computed twice), one batch's MLP activations, and for the
    widest projection its normal equations in float64 (`_kept_moments`: Z^T Z and the right-hand
    side, solved in place), a block of output rows' float64 temporaries, a tile product's float32
    one and the new weight in float32 (counted for a layer that keeps all of that projection's
    inputs: the structure is not known when this is asked)."""
    width = widest_input(spec) + 1
    block = max(spec.block_params(s) for s in spec.layers) * 4
    return (block + 2 * tokens * spec.hidden * 4 + tokens * width * 4 + 3 * batch * seq_len * width * 4
            + (width * width + width * spec.hidden + 2 * OUT_BLOCK * width) * 8 + (spec.hidden + COL_BLOCK) * width * 4)


# --refit-samples auto (the default): the most windows of this ladder whose refit fits the memory
# budget (and, under --refit auto, its time). More windows kept paying at every count measured:
# SmolLM2-135M, `standard`, windows of 512, 32 / 64 / 128: FLAP 35% 47.6 / 46.0 / 45.0, Bonsai 50%
# 68.0 / 65.9 / 64.2 (seed 0); 32 -> 128 over 3 seeds: Bonsai 45.7 -> 43.3 (35%), 72.7 -> 68.4 (50%),
# every seed lower (docs/RESULTS.md, fourteenth round). 16 is for budgets 32 does not fit (not
# measured on its own; `quick`'s 32 x 128-token refit, fewer tokens, measured far better than none).
REFIT_SAMPLES_LADDER = (128, 64, 32, 16)


def auto_refit_samples(spec, seq_len: int, budget: int, fits_time=lambda n: True) -> int:
    """The largest count of REFIT_SAMPLES_LADDER whose `refit_peak_bytes` fits `budget` and that
    `fits_time(n)` accepts; the smallest when none does (the caller's checks then say why)."""
    for n in REFIT_SAMPLES_LADDER:
        if refit_peak_bytes(spec, n * seq_len, seq_len) <= budget and fits_time(n):
            return n
    return REFIT_SAMPLES_LADDER[-1]


def _columns(kept: LayerStructure, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    heads = torch.tensor([s * head_dim + i for s in kept.heads for i in range(head_dim)], dtype=torch.long)
    return heads, torch.tensor(kept.mlp, dtype=torch.long)


def _kept_moments(weight: torch.Tensor, bias: torch.Tensor | None, kept: torch.Tensor, device
                  ) -> tuple[tuple[torch.Tensor, torch.Tensor], callable]:
    """What the refit of the projection (weight [h, d], bias) on its inputs `kept` reads of the
    calibration tokens, with Z = [X_kept, 1] and Y = X W^T + b its dense output: Z^T Z, (k + 1) x
    (k + 1), and (Z^T Y)^T, h x (k + 1), which become the normal equations in place; and the tap that
    adds a tile to them: float32 products of COL_BLOCK columns at a time summed in float64 (as the
    priors' residual covariances are), which the ridge's 1% damping leaves no trace of (a float64
    product was 1.7-5x slower on a CPU). Computing Y per tile costs 2 d h float32 flops a token and
    saves the float64 product G[K, :] [W, b]^T, 2 k d h flops a projection (and the (k + 1) x (d - k)
    cross moments it needs): ~7x less on 4,096 tokens of a 14,336-wide MLP, half kept."""
    d, k = weight.shape[1], len(kept)
    kept = kept.to(device)
    weight = weight.to(device, torch.float32)
    bias = None if bias is None else bias.to(device, torch.float32)
    a = torch.zeros(k + 1, k + 1, dtype=torch.float64, device=device)
    zy_t = torch.zeros(weight.shape[0], k + 1, dtype=torch.float64, device=device)

    def add(_kind, x):
        x = x.reshape(-1, d).float()
        xk = x.index_select(1, kept)
        y = F.linear(x, weight, bias)
        gram = a[:k, :k]
        for c in range(0, k, COL_BLOCK):
            gram[:, c:c + COL_BLOCK] += xk.T @ xk[:, c:c + COL_BLOCK]
        for r in range(0, len(zy_t), COL_BLOCK):
            zy_t[r:r + COL_BLOCK, :k] += y[:, r:r + COL_BLOCK].T @ xk
        sums = xk.sum(0, dtype=torch.float64)
        a[k, :k] += sums
        a[:k, k] += sums
        a[k, k] += len(x)
        zy_t[:, k] += y.sum(0, dtype=torch.float64)
        return xk

    return (a, zy_t), add


def _kept_inputs(add, inputs: list):
    """A tap that feeds `add` and keeps each tile's kept inputs (what `add` returns), to apply the
    refitted weight to: its removed columns are zero, so the kept ones give the whole output."""
    def tap(kind, x):
        inputs.append(add(kind, x).view(*x.shape[:-1], -1))

    return tap


@torch.no_grad()
def refit_model(parent, layers: tuple[LayerStructure, ...], tokens: torch.Tensor, folder: str | Path, *,
                damp: float = DAMP, device="cpu", batch: int = 8, progress=None) -> dict:
    """Refit every layer that lost units; `parent` is the unpruned StreamedModel, `tokens` [n, T].

    Writes the new o_proj / down_proj weights of those layers under `folder` (its old refit files
    are replaced) and returns {bias name: float32 bias}. Runs in float32, one block at a time: the
    attention over all windows, its o_proj refitted, then the MLP on the refitted attention's output
    and its down_proj refitted; each projection's kept inputs are computed once and kept until it is refitted."""
    from safetensors.torch import save_file
    from transformers.activations import ACT2FN

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("refit-*.safetensors"):
        old.unlink()
    spec = parent.spec
    loader = parent.with_layers(spec.layers).with_biases({}).with_fills({}).loader(device=device, dtype=torch.float32)
    n, t = tokens.shape
    inv_freq, scaling = parent.rope(seq_len=t)
    cos, sin = rotary_cos_sin(inv_freq, scaling, torch.arange(t, device=device), torch.float32)
    act = ACT2FN[spec.act]
    hs = [loader.embedding_rows(tokens[b:b + batch].reshape(-1)).view(-1, t, spec.hidden).to(device)
          for b in range(0, n, batch)]
    biases = {}
    for l, kept in enumerate(layers):
        w = loader.block(l)
        names = spec.adapter.block_tensor_names(l)
        window = spec.window(l)
        heads, units = _columns(kept, spec.head_dim)
        pruned = len(kept.heads) < len(spec.layers[l].heads) or len(kept.mlp) < len(spec.layers[l].mlp)
        if not pruned:
            mids = [h + attention(w, rms_norm(h, w.attn_norm, spec.eps), cos, sin, window=window) for h in hs]
            hs = [h + mlp(w, rms_norm(h, w.mlp_norm, spec.eps), act) for h in mids]
        else:  # each projection's inputs are computed once: its statistics, then the refitted output
            bare = replace(w, o_w=w.o_w[:0], o_b=None, down_w=w.down_w[:0], down_b=None)  # inputs only
            g, add = _kept_moments(w.o_w, w.o_b, heads, device)
            inputs: list[torch.Tensor] = []
            for h in hs:
                attention(bare, rms_norm(h, w.attn_norm, spec.eps), cos, sin, window=window, tap=_kept_inputs(add, inputs))
            system = normal_equations(g, w.o_w, heads, damp=damp)
            del g, add
            o_w, o_b = solve_refit(*system, w.o_w, heads)
            del system
            w.o_w, w.o_b = o_w, o_b
            o_kept = w.o_w[:, heads.to(device)]
            mids = [h + F.linear(a, o_kept, w.o_b) for h, a in zip(hs, inputs)]
            del o_kept
            g, add = _kept_moments(w.down_w, w.down_b, units, device)
            inputs = []
            for h in mids:
                mlp(bare, rms_norm(h, w.mlp_norm, spec.eps), act, tap=_kept_inputs(add, inputs))
            system = normal_equations(g, w.down_w, units, damp=damp)
            del g, add
            down_w, down_b = solve_refit(*system, w.down_w, units)
            del system
            w.down_w, w.down_b = down_w, down_b
            down_kept = w.down_w[:, units.to(device)]
            hs = [h + F.linear(m, down_kept, w.down_b) for h, m in zip(mids, inputs)]
            del down_kept
            del inputs
            dtype = {k: parent.ckpt.info(names[k]).dtype for k in ("o_w", "down_w")}
            save_file({names["o_w"]: o_w.to("cpu", dtype["o_w"]).contiguous(),
                       names["down_w"]: down_w.to("cpu", dtype["down_w"]).contiguous()},
                      str(folder / f"refit-{l:05d}.safetensors"))
            biases[names["o_b"]], biases[names["down_b"]] = o_b.cpu(), down_b.cpu()
        del w, mids
        if progress is not None:
            progress(l)
    return biases
