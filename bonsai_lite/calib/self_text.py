"""Calibration text sampled from the parent model itself, for users who have no text at hand.

Ancestral sampling (temperature 1) from the BOS token with a per-layer key/value cache, weights
streamed block by block every step (kept resident when the planner says the model fits). Seeded.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from bonsai_lite.io.model import StreamedModel
from bonsai_lite.ops import _apply_rotary, rms_norm, rotary_cos_sin
from bonsai_lite.search.machine import detect_machine
from bonsai_lite.search.planner import Work, make_plan

log = logging.getLogger(__name__)


def _step(w, x, cos, sin, cache: list, *, eps, act):
    """One decoder block on new tokens x [B, t, H] given cached keys/values (appended in place)."""
    b, t, _ = x.shape
    d = w.head_dim
    if w.n_heads:
        h = rms_norm(x, w.attn_norm, eps)
        q = F.linear(h, w.q_w, w.q_b).view(b, t, -1, d).transpose(1, 2)
        k = F.linear(h, w.k_w, w.k_b).view(b, t, -1, d).transpose(1, 2)
        v = F.linear(h, w.v_w, w.v_b).view(b, t, -1, d).transpose(1, 2)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        if cache:
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        cache[:] = [k, v]
        kk, vv = k.index_select(1, w.kv_map), v.index_select(1, w.kv_map)
        a = F.scaled_dot_product_attention(q, kk, vv, is_causal=t > 1, scale=d**-0.5)
        x = x + F.linear(a.transpose(1, 2).reshape(b, t, -1), w.o_w, w.o_b)
    if w.width:
        h = rms_norm(x, w.mlp_norm, eps)
        x = x + F.linear(act(F.linear(h, w.gate_w, w.gate_b)) * F.linear(h, w.up_w, w.up_b), w.down_w, w.down_b)
    return x


class Decoder:
    """Incremental forward pass with a key/value cache: feed new tokens, get the last logits."""

    def __init__(self, model: StreamedModel, *, max_len: int, device=None, budget=None, samples: int = 1,
                 resident: bool | None = None):
        spec = self.spec = model.spec
        machine = detect_machine(device=device, budget=budget)
        plan = make_plan(spec, model.layers, Work(1, samples, max_len), machine)
        self.device, dtype = torch.device(plan.device), getattr(torch, plan.dtype)
        self.loader = model.loader(device=self.device, dtype=dtype)
        if resident is None:
            # The plan is for one pass, where streaming costs nothing extra and wins ties on peak
            # memory; decoding makes a pass per token, so keep the weights whenever they fit.
            need = model.params() * dtype.itemsize + plan.predicted_peak_bytes
            resident = plan.order == "resident" or need <= machine.budget
        self.resident = resident
        self.blocks = [self.loader.block(l) for l in range(spec.n_layers)] if self.resident else None
        self.head = torch.cat([w for _, w in self.loader.head_chunks(spec.vocab)])
        self.norm = self.loader.final_norm()
        self.act = ACT2FN[spec.act]
        inv_freq, scaling = model.rope()
        self.cos, self.sin = rotary_cos_sin(inv_freq, scaling, torch.arange(max_len, device=self.device), dtype)
        self.caches: list[list] = [[] for _ in range(spec.n_layers)]
        self.pos = 0

    @torch.no_grad()
    def step(self, new: torch.Tensor) -> torch.Tensor:
        """new [B, t] token ids -> logits [B, vocab] (float32, CPU) after the last new token."""
        b, t = new.shape
        x = self.loader.embedding_rows(new.reshape(-1)).reshape(b, t, -1).to(self.device)
        cos, sin = self.cos[self.pos : self.pos + t], self.sin[self.pos : self.pos + t]
        for l in range(self.spec.n_layers):
            w = self.blocks[l] if self.resident else self.loader.block(l)
            x = _step(w, x, cos, sin, self.caches[l], eps=self.spec.eps, act=self.act)
        self.pos += t
        return (rms_norm(x[:, -1], self.norm, self.spec.eps) @ self.head.T).float().cpu()


@torch.no_grad()
def sample_text_ids(model_dir, *, tokenizer, samples: int, seq_len: int, seed: int, device=None, budget=None,
                    temperature: float = 1.0) -> torch.Tensor:
    """samples x seq_len tokens, flattened, drawn from the model (BOS-started, seeded)."""
    dec = Decoder(StreamedModel.open(model_dir), max_len=seq_len + 1, device=device, budget=budget, samples=samples)
    if not dec.resident:
        log.warning("the model does not fit the budget whole: weights are streamed every sampled token (slow)")
    log.info("sampling %d x %d calibration tokens from the model itself (seed %d)", samples, seq_len, seed)
    g = torch.Generator(device="cpu").manual_seed(seed)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = torch.full((samples, 1), start, dtype=torch.long)
    new = ids
    while ids.shape[1] < seq_len + 1:
        logits = dec.step(new) / temperature
        new = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)
        ids = torch.cat([ids, new], 1)
    return ids[:, 1:].reshape(-1)
