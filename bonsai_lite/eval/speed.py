"""Generation speed of a model directory with the cached streamed decoder (batch 1, greedy)."""
from __future__ import annotations

import time

import torch

from bonsai_lite.calib.self_text import Decoder
from bonsai_lite.io.model import StreamedModel


@torch.no_grad()
def generation_speed(model_dir, *, prompt: torch.Tensor, new_tokens: int = 64, device=None) -> dict:
    """Decode `new_tokens` greedily after `prompt` [1, t]; tokens/s of the decode phase."""
    dec = Decoder(StreamedModel.open(model_dir), max_len=prompt.shape[1] + new_tokens + 1, device=device)
    logits = dec.step(prompt)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        logits = dec.step(logits.argmax(-1, keepdim=True))
    dt = time.perf_counter() - t0
    return {"new_tokens": new_tokens, "seconds": dt, "tokens_per_s": new_tokens / dt}
