"""Pure maths of distillation from cached top-k teacher logits.

The parent's logits are streamed once (`adapt/teacher.py`) and reduced per token to its k largest
logits, their vocabulary indices, the log-sum-exp over the whole vocabulary and the log-sum-exp over
the rest (the "tail"). With those, the teacher distribution is known exactly on the k cached
tokens, p_t(i) = exp(l_i - lse), and only its total on the rest, p_t(tail) = exp(tail_lse - lse).
The tail is accumulated from the logits evicted from the running top-k, not computed as
1 - sum_i p_t(i): in float32 that difference is noise below ~1e-6, and a tail mass that small is
where the reverse KL is most sensitive.

Estimator: the KL between the two distributions *coarsened* to k + 1 outcomes (the k cached tokens
and one "tail" bucket holding everything else); the student's tail mass is exact (it sits in
memory). Coarsening can only lose information, so this is a lower bound on the full-vocabulary KL
(data-processing inequality) in either direction, it is the full KL when the tail holds no mass, and
it is exactly the full KL when k equals the vocabulary (tests/integration/test_adapt.py). Unlike
renormalising the teacher over its top-k, it never rewards the student for mass the teacher puts
outside the cache, and unlike dropping the tail it is a true divergence (zero iff the coarsened
distributions agree).

Direction: the paper (section 4) writes D_KL(logits(pruned) || logits(parent)), the reverse KL
sum_i p_s(i) log(p_s(i) / p_t(i)), which is mode-seeking; that is the default. "forward" gives
Hinton-style sum_i p_t(i) log(p_t(i) / p_s(i)).
"""
from __future__ import annotations

import torch

class RunningTopK:
    """Per-token top-k logits, log-sum-exp and tail log-sum-exp of an LM head streamed in vocabulary chunks.

    The teacher-side twin of `ops.ChunkedNLL`: one per token tile, `update` once per vocabulary
    chunk; the full [tokens, vocab] logits never exist at once. A logit leaving the top-k joins the
    tail's running log-sum-exp, so the tail is exact however small.
    """

    def __init__(self, n_tokens: int, k: int, device):
        self.k = k
        self.lse = torch.full((n_tokens,), float("-inf"), dtype=torch.float32, device=device)
        self.tail = torch.full((n_tokens,), float("-inf"), dtype=torch.float32, device=device)
        self.values = torch.empty((n_tokens, 0), dtype=torch.float32, device=device)
        self.indices = torch.empty((n_tokens, 0), dtype=torch.long, device=device)

    def update(self, h: torch.Tensor, w_chunk: torch.Tensor, v0: int) -> None:
        logits = (h @ w_chunk.T).float()  # [tokens, chunk]
        self.lse = torch.logaddexp(self.lse, torch.logsumexp(logits, dim=-1))
        n, c = logits.shape
        cand_v = torch.cat([self.values, logits], dim=1)
        cand_i = torch.cat([self.indices, torch.arange(v0, v0 + c, device=logits.device).expand(n, c)], dim=1)
        top = cand_v.topk(min(self.k, cand_v.shape[1]), dim=1)  # sorted, largest first
        if cand_v.shape[1] > self.k:
            evicted = cand_v.scatter(1, top.indices, float("-inf")).logsumexp(dim=1)
            self.tail = torch.logaddexp(self.tail, evicted)
        self.values, self.indices = top.values, cand_i.gather(1, top.indices)


def topk_kl(student_logp: torch.Tensor, t_values: torch.Tensor, t_indices: torch.Tensor, t_lse: torch.Tensor,
            t_tail: torch.Tensor, *, direction: str = "reverse") -> torch.Tensor:
    """Per-token KL between student and cached teacher, coarsened to the k cached tokens + a tail bucket.

    student_logp [N, V]: the student's log-probabilities (log_softmax, float32); t_values / t_indices
    [N, k]: the teacher's top-k logits and their vocabulary indices; t_lse / t_tail [N]: the
    teacher's log-sum-exp over the whole vocabulary and over the tokens outside its top-k
    (-inf when k = V). Returns [N] (nats).
    """
    if direction not in ("reverse", "forward"):
        raise ValueError(f"direction must be 'reverse' or 'forward', got {direction!r}")
    idx = t_indices.long()
    vocab, k = student_logp.shape[-1], idx.shape[-1]
    s_log = student_logp.gather(-1, idx)  # [N, k]
    t_log = t_values.float() - t_lse.float()[:, None]
    if k < vocab:  # distinct indices, so every token has a non-empty tail
        s_tail = student_logp.scatter(-1, idx, float("-inf")).logsumexp(-1, keepdim=True)
        t_tail = (t_tail.float() - t_lse.float())[:, None]
        s_log, t_log = torch.cat([s_log, s_tail], -1), torch.cat([t_log, t_tail], -1)
    # float16 cached values round the top-k probabilities: renormalise the teacher's buckets.
    t_log = t_log - t_log.logsumexp(-1, keepdim=True)
    p_log, q_log = (s_log, t_log) if direction == "reverse" else (t_log, s_log)
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def lm_and_kl(logits: torch.Tensor, input_ids: torch.Tensor, teacher: tuple | None, *,
              direction: str = "reverse") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Next-token loss over T-1 positions and the cached-teacher KL over all T positions (means).

    logits [B, T, V], input_ids [B, T]; teacher = (values [B, T, k], indices [B, T, k], lse [B, T],
    tail [B, T]) or None.
    One float32 log_softmax serves both terms.
    """
    b, t, v = logits.shape
    logp = logits.float().log_softmax(-1)
    lm = -logp[:, :-1].gather(-1, input_ids[:, 1:, None]).mean()
    if teacher is None:
        return lm, None
    values, indices, lse, tail = teacher
    kl = topk_kl(logp.reshape(b * t, v), values.reshape(b * t, -1), indices.reshape(b * t, -1), lse.reshape(-1),
                 tail.reshape(-1), direction=direction)
    return lm, kl.mean()
