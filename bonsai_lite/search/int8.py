"""LLM.int8() evaluation weights for the streamed engine (bitsandbytes, CUDA only, evaluation only).

`Int8Loader(loader)` wraps a `BlockLoader`: each block is read, sliced and cast on the host as usual,
then moved to the GPU in slabs of rows and quantised there row-wise to int8 (absmax / 127 per output
feature, as `bitsandbytes.nn.Int8Params` does), so the device never holds a projection in 16 bits. Norms, biases, embeddings and the LM head stay in the compute
dtype: they are small, or (the head) streamed in chunks anyway.

The projections become `Int8Weight` tensors. `ops.py` computes every linear map with
`torch.nn.functional.linear(x, w, b)`; `Int8Weight.__torch_function__` turns exactly that call into
LLM.int8()'s mixed-precision matmul (activations quantised row-wise, input columns holding an
outlier >= `threshold` computed in the activations' dtype, int8 GEMM, dequantise, bias), the same
ops `bitsandbytes.matmul` runs for an inference `Linear8bitLt`. No change to ops.py is needed.

Halving the weights' bytes buys larger tiles and groups under a budget, at some accuracy (LLM.int8()
keeps perplexity within ~0.1 on 7B models) and speed (quantising activations costs ~40% of a bf16
GEMM, planner.INT8_FACTOR). Not for training: there is no backward.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from bonsai_lite.errors import BonsaiError
from bonsai_lite.io.blocks import BlockLoader
from bonsai_lite.ops import BlockWeights

# LLM.int8()'s outlier threshold (Dettmers et al. 2022; transformers' llm_int8_threshold default):
# input features with any |x| >= 6 are multiplied in 16-bit, the rest in int8.
OUTLIER_THRESHOLD = 6.0
_LINEAR = (F.linear, torch._C._nn.linear)
# Rows of a weight sent and quantised at once: the device's transient on top of the int8 block is
# about 2.5x this (the slab in the compute dtype, in fp16, and its int8 result before the copy).
QUANT_CHUNK_BYTES = 16 * 2**20


def _bnb():
    try:
        import bitsandbytes  # noqa: F401  (registers the torch.ops.bitsandbytes kernels)
        import bitsandbytes.functional as bnbf
    except ImportError as e:
        raise BonsaiError(
            "8-bit weights need bitsandbytes (pip install 'bonsai-lite[cuda]'); or evaluate without --allow-8bit"
        ) from e
    return bnbf


class Int8Weight(torch.Tensor):
    """A [out, in] int8 weight with per-row scales; `F.linear(x, w, b)` runs LLM.int8() on it.

    Any other use (shape, numel, device) sees the plain int8 tensor.
    """

    scb: torch.Tensor  # [out] float32 absmax of each row
    threshold: float

    @staticmethod
    def __new__(cls, cb: torch.Tensor, scb: torch.Tensor, threshold: float = OUTLIER_THRESHOLD):
        obj = torch.Tensor._make_subclass(cls, cb, False)
        obj.scb, obj.threshold = scb, threshold
        return obj

    @classmethod
    def quantize(cls, w: torch.Tensor, threshold: float = OUTLIER_THRESHOLD, *, device=None,
                 chunk_bytes: int = QUANT_CHUNK_BYTES) -> "Int8Weight | torch.Tensor":
        """Row-wise int8 of a 2-D weight, built on `device` (default: w's) a slab of rows at a time.

        Rows quantise independently, so a host weight goes over in slabs of ~`chunk_bytes` and the
        device holds only one slab in 16 bits beside the int8 result. An empty weight stays as is.
        """
        device = torch.device(device) if device is not None else w.device
        if w.numel() == 0:
            return w.to(device)
        out, inp = w.shape
        cb = torch.empty((out, inp), dtype=torch.int8, device=device)
        scb = torch.empty(out, dtype=torch.float32, device=device)
        step = max(1, chunk_bytes // (inp * w.element_size()))
        for r0 in range(0, out, step):
            slab = w[r0:r0 + step]
            if device.type == "cuda" and slab.device.type == "cpu":
                slab = slab.pin_memory()
            slab = slab.to(device, non_blocking=True).to(torch.float16).contiguous()
            q, s, _ = _bnb().int8_vectorwise_quant(slab)
            cb[r0:r0 + step].copy_(q)
            scb[r0:r0 + step].copy_(s)
        return cls(cb, scb, threshold)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return (self.int8() * (self.scb[:, None] / 127.0)).to(dtype)

    def int8(self) -> torch.Tensor:
        return self.as_subclass(torch.Tensor)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LINEAR:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(w, Int8Weight) and not isinstance(x, Int8Weight):
                return int8_linear(x, w, b)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def int8_linear(x: torch.Tensor, w: Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T + bias with LLM.int8(): the inference path of `bitsandbytes.matmul` (MatMul8bitLt).

    Output in x's dtype. A row of x that is all zeros (every head of a layer masked for one
    sub-model) has absmax 0; its quantised values are then meaningless but are dequantised with a
    scale of 0, so the row's output is exactly the bias, as in bf16.
    """
    _bnb()
    shape = x.shape
    a = x.reshape(-1, shape[-1])
    if a.shape[0] == 0:
        return x.new_empty(*shape[:-1], w.shape[0])
    # int8_vectorwise_quant wants fp16. bf16 values beyond fp16's range become inf there, but they
    # are >= the threshold, so they are outliers: excluded from the row scale and taken from `a`.
    ca, sca, outlier_cols = _bnb().int8_vectorwise_quant(a.to(torch.float16).contiguous(), w.threshold)
    if bias is not None:
        bias = bias.to(a.dtype)
    out, _ = torch.ops.bitsandbytes.int8_mixed_scaled_mm(a, ca, w.int8(), sca, w.scb, outlier_cols, bias)
    return out.reshape(*shape[:-1], out.shape[-1])


def require_cuda(device, remedy: str = "drop --allow-8bit") -> None:
    """A clear error unless `device` is CUDA: the one place that says where 8-bit weights run."""
    # bitsandbytes' CPU int8 kernels exist but run slower than fp32 GEMMs: no reason to use them.
    device = torch.device(device)
    if device.type != "cuda":
        raise BonsaiError(
            f"8-bit weights run on CUDA only (bitsandbytes' int8 kernels); this run is on {device.type}: {remedy}"
        )


def check_8bit(device) -> None:
    """Before any work: 8-bit weights need a CUDA device and bitsandbytes (a clear error otherwise)."""
    require_cuda(device)
    _bnb()


class Int8Loader:
    """BlockLoader look-alike whose blocks carry int8 projections (`.block`, `.embedding_rows`,
    `.final_norm`, `.head_chunks`, `.bytes_to_device`)."""

    def __init__(self, loader: BlockLoader, *, threshold: float = OUTLIER_THRESHOLD):
        check_8bit(loader.device)
        self.inner, self.threshold = loader, threshold
        # The same read -> slice -> cast chain, kept on the host so that tensors reach the GPU one by one.
        self.host = BlockLoader(loader.ckpt, loader.spec, loader.layers, device="cpu", dtype=loader.dtype,
                                biases=loader.biases, fills=loader.fills)
        self._moved = 0

    @property
    def device(self) -> torch.device:
        return self.inner.device

    @property
    def bytes_to_device(self) -> int:
        return self.inner.bytes_to_device + self._moved

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        self._moved += t.numel() * t.element_size()
        if self.device.type == "cuda":
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def block(self, layer: int) -> BlockWeights:
        host = self.host.block(layer)
        kw = {}
        for f in dataclasses.fields(BlockWeights):
            v = getattr(host, f.name)
            setattr(host, f.name, None)  # drop each host tensor as soon as it has been sent
            if f.name.endswith("_w"):
                self._moved += v.numel() * v.element_size()
                kw[f.name] = Int8Weight.quantize(v, self.threshold, device=self.device)
            elif isinstance(v, torch.Tensor):
                kw[f.name] = v.to(self.device) if f.name == "kv_map" else self._to_device(v)
            else:
                kw[f.name] = v
        return BlockWeights(**kw)

    def block_bytes(self, layer: int) -> int:
        return self.inner.spec.block_params(self.inner.layers[layer])  # one byte per weight (+ tiny scales)

    def final_norm(self) -> torch.Tensor:
        return self.inner.final_norm()

    def embedding_rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.inner.embedding_rows(token_ids)

    def head_chunks(self, chunk_rows: int):
        return self.inner.head_chunks(chunk_rows)
