"""Generation speed of a model directory with the cached streamed decoder (batch 1, greedy)."""
from __future__ import annotations

import time

import torch

from bonsai_lite.calib.self_text import Decoder
from bonsai_lite.io.model import StreamedModel


@torch.no_grad()
def generation_speed(model_dir, *, prompt: torch.Tensor, new_tokens: int = 64, device=None,
                     stop_ids: tuple[int, ...] = ()) -> dict:
    """Decode up to `new_tokens` greedily after `prompt` [1, t]; tokens/s of the decode phase and the ids.

    Generation ends early at a token of `stop_ids` (end of turn), which is kept in `ids`.
    """
    dec = Decoder(StreamedModel.open(model_dir), max_len=prompt.shape[1] + new_tokens + 1, device=device)
    logits = dec.step(prompt)
    ids = [int(logits.argmax(-1))]
    t0 = time.perf_counter()
    while len(ids) < new_tokens and ids[-1] not in stop_ids:
        logits = dec.step(torch.tensor([[ids[-1]]]))
        ids.append(int(logits.argmax(-1)))
    dt = time.perf_counter() - t0
    steps = len(ids) - 1  # the first token came from the prompt's forward, not a decode step
    return {"new_tokens": len(ids), "seconds": dt, "tokens_per_s": steps / dt if steps else float("nan"), "ids": ids}
