"""Cached top-k distillation maths: exact at k = vocabulary (and k = V - 1), a lower bound below; streamed top-k."""
import pytest
import torch
import torch.nn.functional as F

from bonsai_lite.adapt.distill import RunningTopK, lm_and_kl, topk_kl

pytestmark = pytest.mark.unit
V = 37


def _pair(seed=0, n=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, V, generator=g) * 3, torch.randn(n, V, generator=g) * 3


def _full_kl(s_logits, t_logits, direction):
    s, t = s_logits.log_softmax(-1), t_logits.log_softmax(-1)
    p, q = (s, t) if direction == "reverse" else (t, s)
    return (p.exp() * (p - q)).sum(-1)


def _cached(t_logits, k):
    top = t_logits.topk(k, -1)
    tail = t_logits.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
    return top.values, top.indices.to(torch.int32), t_logits.logsumexp(-1), tail


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_topk_kl_equals_full_kl_when_k_is_vocab(direction):
    s, t = _pair()
    got = topk_kl(s.log_softmax(-1), *_cached(t, V), direction=direction)
    assert torch.allclose(got, _full_kl(s, t, direction), atol=1e-5)
    # forward KL at k = V is what torch's kl_div computes
    if direction == "forward":
        ref = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none").sum(-1)
        assert torch.allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("k", [1, 5, V - 1])
def test_topk_kl_is_a_lower_bound_and_zero_for_the_teacher(direction, k):
    s, t = _pair(1)
    got = topk_kl(s.log_softmax(-1), *_cached(t, k), direction=direction)
    full = _full_kl(s, t, direction)
    assert (got >= -1e-6).all() and (got <= full + 1e-5).all()
    if k == V - 1:  # a one-token tail loses nothing
        assert torch.allclose(got, full, atol=1e-5)
    same = topk_kl(t.log_softmax(-1), *_cached(t, k), direction=direction)
    assert same.abs().max() < 1e-5


@pytest.mark.parametrize("k", [4, V])
def test_gradients_are_finite(k):
    s, t = _pair(2)
    s.requires_grad_(True)
    topk_kl(s.log_softmax(-1), *_cached(t, k)).sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_lm_and_kl_matches_cross_entropy():
    g = torch.Generator().manual_seed(3)
    logits, ids = torch.randn(2, 6, V, generator=g), torch.randint(0, V, (2, 6), generator=g)
    lm, kl = lm_and_kl(logits, ids, None)
    assert kl is None
    assert torch.allclose(lm, F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1)), atol=1e-6)


@pytest.mark.parametrize("chunk", [5, 16, V])
def test_running_topk_equals_full_topk(chunk):
    g = torch.Generator().manual_seed(4)
    h, w = torch.randn(9, 8, generator=g), torch.randn(V, 8, generator=g)
    acc = RunningTopK(9, 6, "cpu")
    for v0 in range(0, V, chunk):
        acc.update(h, w[v0 : v0 + chunk], v0)
    logits = h @ w.T
    top = logits.topk(6, -1)
    assert torch.allclose(acc.values, top.values) and torch.equal(acc.indices, top.indices)
    assert torch.allclose(acc.lse, logits.logsumexp(-1), atol=1e-6)
    assert torch.allclose(acc.tail, logits.scatter(-1, top.indices, float("-inf")).logsumexp(-1), atol=1e-5)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_minimising_topk_kl_matches_the_teacher_on_its_top_k(direction):
    s, t = _pair(5, n=4)
    s = s.clone().requires_grad_(True)
    cached = _cached(t, 5)
    opt = torch.optim.Adam([s], lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        topk_kl(s.log_softmax(-1), *cached, direction=direction).sum().backward()
        opt.step()
    got = s.detach().softmax(-1).gather(-1, cached[1].long())
    assert torch.allclose(got, t.softmax(-1).gather(-1, cached[1].long()), atol=2e-3)
