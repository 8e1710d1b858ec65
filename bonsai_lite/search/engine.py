"""Masked evaluation: the mean token NLL of many masked sub-models, one decoder block at a time.

Rows are (sub-model k, sample i) pairs, row r = k * n_samples + i. A *pass* takes `plan.group_rows`
rows, embeds them, pushes them through every block in tiles of `plan.tile_rows`, then through the
LM head in vocabulary chunks. Weights are streamed once per pass (resident: loaded once in all);
hidden states stay in an `ActivationCache` on the device, in host RAM or on disk. Mask-group-major
is many small passes with device-resident hidden states; layer-major is a single pass.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from transformers.activations import ACT2FN

from bonsai_lite.io.model import StreamedModel
from bonsai_lite.ops import BlockWeights, ChunkedNLL, block_forward, rms_norm, rotary_cos_sin
from bonsai_lite.search.cache import ActivationCache
from bonsai_lite.search.machine import bound_host_allocator
from bonsai_lite.search.planner import Plan
from bonsai_lite.structure import UnitLayout

log = logging.getLogger(__name__)

# tap(layer, kind, tensor, rows): observes o_proj / down_proj inputs of a tile (for priors).
Tap = Callable[[int, str, torch.Tensor, slice], None]


@dataclass
class EvalStats:
    seconds: float = 0.0
    passes: int = 0
    bytes_read: int = 0
    bytes_to_device: int = 0
    bytes_spilled: int = 0
    tokens: int = 0  # mask-tokens evaluated (rows x predicted tokens)
    extra: dict = field(default_factory=dict)


@dataclass
class EvalResult:
    nll: torch.Tensor  # [K] mean token NLL of each sub-model (float64, CPU)
    row_nll: torch.Tensor  # [K, n] mean token NLL per (sub-model, sample)
    stats: EvalStats


class _Weights:
    """Yields blocks in order; keeps them when resident; loads block l+1 in a thread when prefetching."""

    def __init__(self, loader, n_layers: int, *, resident: bool, prefetch: bool):
        self.loader, self.n, self.resident, self.prefetch = loader, n_layers, resident, prefetch
        self._kept: dict[int, BlockWeights] = {}
        self._pool = ThreadPoolExecutor(1) if prefetch else None

    def __iter__(self) -> Iterator[tuple[int, BlockWeights]]:
        if self.resident:
            for l in range(self.n):
                if l not in self._kept:
                    self._kept[l] = self.loader.block(l)
                yield l, self._kept[l]
            return
        if self._pool is None:
            for l in range(self.n):
                yield l, self.loader.block(l)
            return
        nxt = self._pool.submit(self.loader.block, 0)
        for l in range(self.n):
            w = nxt.result()
            nxt = self._pool.submit(self.loader.block, l + 1) if l + 1 < self.n else None
            yield l, w
            del w

    def close(self):
        self._kept.clear()
        if self._pool is not None:
            self._pool.shutdown()


def _row_masks(masks: torch.Tensor | None, layout: UnitLayout, layer: int, mask_of_row: torch.Tensor):
    """The head and MLP masks of a tile's rows in `layer`; `masks` and `mask_of_row` on the compute
    device, so no per-tile host copy waits for the device's queue."""
    if masks is None:
        return None, None
    return masks[:, layout.heads[layer]][mask_of_row], masks[:, layout.mlp[layer]][mask_of_row]


def evaluate(model: StreamedModel, tokens: torch.Tensor, masks: torch.Tensor | None, plan: Plan, *,
             tap: Tap | None = None, spill_dir=None, progress: Callable[[int], None] | None = None,
             on_weights: Callable[[int, BlockWeights], None] | None = None) -> EvalResult:
    """Mean token NLL of each masked sub-model on `tokens` [n, T] (next-token loss on T-1 positions).

    `masks` [K, U] bool over the units of `model.layers` (UnitLayout order; True = kept); None means
    the unmasked model (K = 1). Rows of different masks share one batch. `on_weights(layer, w)` sees
    each block's weights once, after its first tiles, while the next block is being read.
    """
    t0 = time.perf_counter()
    spec, device = model.spec, torch.device(plan.device)
    if device.type == "cpu":
        bound_host_allocator()  # freed weight buffers must leave RSS (see planner)
    dtype = getattr(torch, plan.dtype)
    layout = UnitLayout.of(model.layers)
    if masks is not None:
        masks = masks.to(torch.bool)
        if masks.shape[1] != layout.total:
            raise ValueError(f"masks have {masks.shape[1]} units, the model has {layout.total}")
        masks = masks.to(device)  # once per pass (planner: live "masks")
    n, t = tokens.shape
    k = 1 if masks is None else masks.shape[0]
    rows = k * n
    loader = model.loader(device=device, dtype=dtype)
    if plan.weights_8bit:
        from bonsai_lite.search.int8 import Int8Loader  # CUDA + bitsandbytes only

        loader = Int8Loader(loader)
    act = ACT2FN[spec.act]
    inv_freq, scaling = model.rope(seq_len=t)
    cos, sin = rotary_cos_sin(inv_freq, scaling, torch.arange(t, device=device), dtype)
    # Embedding rows of the distinct calibration tokens, read once (never the whole table).
    uniq, local = torch.unique(tokens, return_inverse=True)
    emb_rows = loader.embedding_rows(uniq)
    norm_w = loader.final_norm()
    weights = _Weights(loader, spec.n_layers, resident=plan.order == "resident", prefetch=plan.prefetch)
    head_resident: list[tuple[int, torch.Tensor]] | None = None
    row_sum = torch.zeros(rows, dtype=torch.float64)
    stats = EvalStats()
    try:
        for g0 in range(0, rows, plan.group_rows):
            g1 = min(rows, g0 + plan.group_rows)
            cache = ActivationCache(rows=g1 - g0, tokens=t, hidden=spec.hidden, dtype=dtype, location=plan.cache,
                                    device=device, spill_dir=spill_dir)
            tiles = [slice(a, min(g1, a + plan.tile_rows)) for a in range(g0, g1, plan.tile_rows)]
            local_tile = lambda s: slice(s.start - g0, s.stop - g0)  # noqa: E731
            sample_of = lambda s: torch.arange(s.start, s.stop) % n  # noqa: E731
            mask_of = {s.start: torch.arange(s.start, s.stop, device=device) // n for s in tiles}
            for s in tiles:
                cache.put(local_tile(s), emb_rows[local[sample_of(s)]])
            for layer, w in weights:
                for s in tiles:
                    hm, mm = _row_masks(masks, layout, layer, mask_of[s.start])
                    x = cache.get(local_tile(s))
                    layer_tap = (lambda kind, a, _s=s, _l=layer: tap(_l, kind, a, _s)) if tap else None
                    with torch.no_grad():
                        x = block_forward(w, x, cos, sin, eps=spec.eps, act=act, head_mask=hm, mlp_mask=mm,
                                          window=spec.window(layer), tap=layer_tap)
                    cache.put(local_tile(s), x)
                    del x
                if on_weights is not None and g0 == 0:
                    on_weights(layer, w)
                del w
                if progress:
                    progress(g1 - g0)
            # LM head: chunk-major so each chunk of the (large) head is read once per pass. The
            # final norm is applied once per tile, in place, not once per (chunk, tile).
            per_tile = {s.start: ChunkedNLL((s.stop - s.start) * (t - 1), device) for s in tiles}
            targets = {s.start: tokens[sample_of(s)][:, 1:].reshape(-1).to(device) for s in tiles}
            with torch.no_grad():
                for s in tiles:
                    cache.put(local_tile(s), rms_norm(cache.get(local_tile(s)), norm_w, spec.eps))
            single = cache.get(local_tile(tiles[0]))[:, :-1].reshape(-1, spec.hidden) if len(tiles) == 1 else None
            chunks = head_resident if head_resident is not None else loader.head_chunks(plan.head_chunk)
            kept_chunks = [] if plan.order == "resident" and head_resident is None else None
            for v0, wc in chunks:
                if kept_chunks is not None:
                    kept_chunks.append((v0, wc))
                for s in tiles:
                    h = single if single is not None else cache.get(local_tile(s))[:, :-1].reshape(-1, spec.hidden)
                    with torch.no_grad():
                        per_tile[s.start].update(slice(None), h, targets[s.start], wc, v0)
                    del h
                del wc
            if kept_chunks is not None:
                head_resident = kept_chunks
            for s in tiles:
                nll = per_tile[s.start].nll().reshape(s.stop - s.start, t - 1)
                row_sum[s] = nll.double().sum(1).cpu()
            stats.passes += 1
            stats.bytes_spilled += cache.bytes_written
            cache.close()
    finally:
        weights.close()
    row_nll = (row_sum / (t - 1)).reshape(k, n)
    stats.seconds = time.perf_counter() - t0
    stats.bytes_read = model.ckpt.bytes_read
    stats.bytes_to_device = loader.bytes_to_device
    stats.tokens = rows * (t - 1)
    return EvalResult(nll=row_nll.mean(1), row_nll=row_nll, stats=stats)
