"""Pure tensor maths of a pre-norm GQA decoder block with per-row unit masks, and a chunked LM loss.

These functions mirror transformers' Llama/Mistral/Qwen2 modules numerically (same op order, fp32
RMSNorm statistics) so the streamed engine reproduces whole-model transformers to ~1e-6 in fp32.
Different rows of one batch may carry different masks: that is how many sub-models share a batch.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F


@dataclass
class BlockWeights:
    """One decoder block's tensors on the compute device, already sliced to the kept units."""

    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor
    q_w: torch.Tensor
    k_w: torch.Tensor
    v_w: torch.Tensor
    o_w: torch.Tensor
    gate_w: torch.Tensor
    up_w: torch.Tensor
    down_w: torch.Tensor
    kv_map: torch.Tensor  # [n_heads] position of each head's key/value head
    head_dim: int
    # Whether kv_map is the stock GQA layout (head h reads h // (n_heads / n_kv)), known on the host
    # when the block is loaded; None: derived from kv_map in each call (a device sync on a GPU).
    kv_equal: bool | None = None
    q_b: torch.Tensor | None = None
    k_b: torch.Tensor | None = None
    v_b: torch.Tensor | None = None
    o_b: torch.Tensor | None = None
    gate_b: torch.Tensor | None = None
    up_b: torch.Tensor | None = None
    down_b: torch.Tensor | None = None
    # Compensation during the search: a masked unit's output is replaced by its calibration mean
    # (o_proj input columns [n_heads * head_dim], down_proj input columns [width]) instead of zero,
    # which is what bias folding makes of it at removal.
    head_fill: torch.Tensor | None = None
    mlp_fill: torch.Tensor | None = None

    @property
    def n_heads(self) -> int:
        return self.q_w.shape[0] // self.head_dim

    @property
    def n_kv(self) -> int:
        return self.k_w.shape[0] // self.head_dim

    @property
    def width(self) -> int:
        return self.gate_w.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for f in fields(self) if isinstance(t := getattr(self, f.name), torch.Tensor))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rotary_cos_sin(inv_freq: torch.Tensor, scaling: float, positions: torch.Tensor, dtype: torch.dtype):
    freqs = positions[:, None].float() * inv_freq[None, :].to(positions.device, torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def _causal_window_mask(t: int, window: int, device) -> torch.Tensor:
    i = torch.arange(t, device=device)
    return (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)


def equal_kv_groups(kv_map: list[int], n_kv: int) -> bool:
    """True when head h reads key/value head h // (heads / n_kv): the stock GQA layout."""
    n_heads = len(kv_map)
    return n_kv > 0 and n_heads % n_kv == 0 and kv_map == [h // (n_heads // n_kv) for h in range(n_heads)]


def attention(w: BlockWeights, h: torch.Tensor, cos, sin, *, head_mask=None, window: int | None = None, tap=None):
    """Self-attention output *before* the residual add; `head_mask` [B, n_heads] zeroes head outputs."""
    b, t, _ = h.shape
    d = w.head_dim
    q = F.linear(h, w.q_w, w.q_b).view(b, t, -1, d).transpose(1, 2)
    k = F.linear(h, w.k_w, w.k_b).view(b, t, -1, d).transpose(1, 2)
    v = F.linear(h, w.v_w, w.v_b).view(b, t, -1, d).transpose(1, 2)
    q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
    n_heads, n_kv = q.shape[1], k.shape[1]
    uniform = w.kv_equal if w.kv_equal is not None else equal_kv_groups(w.kv_map.tolist(), n_kv)
    if not uniform:  # pruned GQA: groups of unequal size, gather each head's key/value
        k, v = k.index_select(1, w.kv_map.to(k.device)), v.index_select(1, w.kv_map.to(v.device))
    mask = _causal_window_mask(t, window, h.device) if window is not None and t > window else None
    a = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=d**-0.5, enable_gqa=uniform and n_kv != n_heads
    )
    if head_mask is not None:  # zero pruned heads' outputs before o_proj (paper section 3.1)
        hm = head_mask[:, :, None, None].to(a.dtype)
        a = a * hm
        if w.head_fill is not None:  # ... or replace them by their calibration mean
            a = a + (1 - hm) * w.head_fill.view(1, n_heads, 1, d).to(a.dtype)
    a = a.transpose(1, 2).reshape(b, t, n_heads * d)
    if tap is not None:  # priors observe o_proj's input (appendix F)
        tap("heads", a)
    return F.linear(a, w.o_w, w.o_b)


def mlp(w: BlockWeights, h: torch.Tensor, act, *, unit_mask=None, tap=None) -> torch.Tensor:
    m = act(F.linear(h, w.gate_w, w.gate_b)) * F.linear(h, w.up_w, w.up_b)
    if unit_mask is not None:  # zero pruned intermediate units before down_proj
        um = unit_mask[:, None, :].to(m.dtype)
        m = m * um
        if w.mlp_fill is not None:  # ... or replace them by their calibration mean
            m = m + (1 - um) * w.mlp_fill.to(m.dtype)
    if tap is not None:  # priors observe down_proj's input
        tap("mlp", m)
    return F.linear(m, w.down_w, w.down_b)


def block_forward(w: BlockWeights, x, cos, sin, *, eps: float, act, head_mask=None, mlp_mask=None, window=None, tap=None):
    """x [B, T, hidden] -> the block's output; masks are per row (a row = one sub-model x one sample).

    `tap(kind, tensor)`, when given, sees the inputs of o_proj ("heads") and down_proj ("mlp").
    """
    if w.n_heads:
        x = x + attention(w, rms_norm(x, w.attn_norm, eps), cos, sin, head_mask=head_mask, window=window, tap=tap)
    elif w.o_b is not None:
        x = x + w.o_b
    if w.width:
        x = x + mlp(w, rms_norm(x, w.mlp_norm, eps), act, unit_mask=mlp_mask, tap=tap)
    elif w.down_b is not None:
        x = x + w.down_b
    return x


class ChunkedNLL:
    """Token NLL through a (possibly huge) LM head streamed in vocabulary chunks.

    Keeps a running log-sum-exp per token, so logits for the whole vocabulary never exist at once
    (Llama-3: 128k x 4096 head). Call `update` once per (vocab chunk, token tile), then `nll()`.
    """

    def __init__(self, n_tokens: int, device):
        self.lse = torch.full((n_tokens,), float("-inf"), dtype=torch.float32, device=device)
        self.target = torch.zeros(n_tokens, dtype=torch.float32, device=device)

    def update(self, rows: slice, h: torch.Tensor, targets: torch.Tensor, w_chunk: torch.Tensor, v0: int) -> None:
        logits = (h @ w_chunk.T).float()  # [tokens, chunk]
        self.lse[rows] = torch.logaddexp(self.lse[rows], torch.logsumexp(logits, dim=-1))
        local = targets - v0
        hit = (local >= 0) & (local < w_chunk.shape[0])
        picked = logits.gather(1, local.clamp(0, w_chunk.shape[0] - 1)[:, None])[:, 0]
        self.target[rows] += torch.where(hit, picked, torch.zeros_like(picked))

    def nll(self) -> torch.Tensor:
        return self.lse - self.target
