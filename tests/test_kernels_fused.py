"""lmforge.kernels.fused: the compiled SwiGLU and [Q | K | V] head passes, causal attention and RMSNorm's
backward, against the model's own equations or SDPA (which are also the fallbacks), and the model's training
step with and without them.

The head split with rotary positions rounds each product before the sum as torch's separate kernels do,
so it must give the same bits. SwiGLU uses its own exponential (about 1 ulp): its outputs and gradients
may differ from torch's by a few fp32 ulps of the values involved, bounded here by 1e-6 relative to the
largest magnitude (a wrong term or a missed element is of the order of the values themselves). Causal
attention sums in a different order than SDPA: outputs and gradients are checked against SDPA in float64
to 2e-5 of the largest magnitude (fp32 sums over at most a few hundred terms).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lmforge
from lmforge import kernels
from lmforge.kernels import fused
from lmforge.model import CausalSelfAttention, rope_cos_sin, rope_inverse_frequencies


def _reference_swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = max(1.0, b.abs().max().item())
    assert (a - b).abs().max().item() <= 1e-6 * scale, (a - b).abs().max().item()


@pytest.mark.parametrize("shape", [(2, 5, 2 * 37), (7, 2 * 8), (1, 1, 2 * 3), (3, 4, 2 * 352)])
def test_swiglu_matches_silu_gate_times_up(compiled, shape):
    torch.manual_seed(0)
    h = (torch.randn(shape) * 4).requires_grad_()  # large |gate| too: both branches of the sigmoid
    dy = torch.randn(*shape[:-1], shape[-1] // 2)
    y = fused.swiglu(h, _reference_swiglu)
    (dh,) = torch.autograd.grad(y, h, dy)
    h_ref = h.detach().clone().requires_grad_()
    y_ref = _reference_swiglu(h_ref)
    (dh_ref,) = torch.autograd.grad(y_ref, h_ref, dy)
    assert compiled.counts["swiglu"] == 2  # forward and backward both compiled
    _close(y, y_ref)
    _close(dh, dh_ref)


def test_swiglu_non_finite_gates_give_nan_or_the_limits(compiled):
    h = torch.tensor([[float("nan"), 100.0, -100.0, 0.0, 2.0, 3.0, 4.0, 5.0]])
    y = fused.swiglu(h, _reference_swiglu)
    expected = _reference_swiglu(h)
    assert torch.isnan(y[0, 0]) and torch.isnan(expected[0, 0])
    _close(y[:, 1:], expected[:, 1:])


def test_swiglu_falls_back_where_the_pass_does_not_apply(compiled):
    h = torch.randn(4, 2 * 6)
    for x in (h.to(torch.bfloat16), h.t().contiguous().t(), torch.randn(4, 7)):  # dtype, layout, odd width
        calls = []
        fused.swiglu(x, lambda t: calls.append(t) or t)
        assert len(calls) == 1
    assert compiled.counts["swiglu"] == 0


def _config(n_head: int, n_kv_head: int, head_dim: int):
    return lmforge.preset("llama-baby", vocab_size=65, n_positions=64).replace(
        n_head=n_head, n_kv_head=n_kv_head, n_embd=n_head * head_dim)


@pytest.mark.parametrize("n_head,n_kv_head,head_dim,rope_batches", [
    (4, 4, 32, 1), (4, 2, 16, 2), (6, 1, 10, 1), (2, 2, 8, 2)])  # MHA, GQA, MQA, tails
def test_heads_equal_the_split_and_rotation_bit_for_bit(compiled, n_head, n_kv_head, head_dim, rope_batches):
    torch.manual_seed(0)
    config = _config(n_head, n_kv_head, head_dim)
    attn = CausalSelfAttention(config, 0)
    B, T = 2, 7
    qkv = torch.randn(B, T, (n_head + 2 * n_kv_head) * head_dim, requires_grad=True)
    positions = torch.arange(T)[None] + torch.arange(rope_batches)[:, None]  # per row (left padding) or shared
    rope = rope_cos_sin(rope_inverse_frequencies(config), positions, torch.float32)
    got = fused.qkv_heads(qkv, n_head, n_kv_head, rope, attn._split_heads)
    want = attn._split_heads(qkv, rope)
    assert compiled.counts["heads"] == 1
    assert [tuple(t.shape) for t in got] == [(B, n_head, T, head_dim)] + [(B, n_kv_head, T, head_dim)] * 2
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    grads = [torch.randn_like(t) for t in got]
    (g_got,) = torch.autograd.grad(got, qkv, grads)
    (g_want,) = torch.autograd.grad(want, qkv, grads)
    assert torch.equal(g_got, g_want)
    # an output that takes no part in the loss (its gradient None) counts as zero
    (g_got,) = torch.autograd.grad(fused.qkv_heads(qkv, n_head, n_kv_head, rope, attn._split_heads)[0].sum(), qkv)
    (g_want,) = torch.autograd.grad(attn._split_heads(qkv, rope)[0].sum(), qkv)
    assert torch.equal(g_got, g_want)


def test_heads_fall_back_where_the_pass_does_not_apply(compiled):
    qkv = torch.randn(1, 3, 48)
    rope = rope_cos_sin(rope_inverse_frequencies(_config(2, 2, 8)), torch.arange(3)[None], torch.float32)
    cases = [(qkv.to(torch.bfloat16), rope), (torch.randn(3, 2, 48).transpose(0, 1), rope), (qkv[..., :40], rope),
             (qkv, (rope[0][:, :2], rope[1][:, :2])), (qkv, None)]  # dtype, layout, width, rope's length, no rope
    for x, r in cases:
        calls = []
        fused.qkv_heads(x, 2, 2, r, lambda *a: calls.append(a) or (x, x, x))
        assert len(calls) == 1
    assert compiled.counts["heads"] == 0


@pytest.mark.parametrize("shape", [(12, 64, 128), (3, 5, 37), (1, 8)])
def test_rms_norm_forward_is_torch_and_backward_matches(compiled, shape):
    torch.manual_seed(0)
    x, w = torch.randn(shape, requires_grad=True), (torch.randn(shape[-1]) + 1).requires_grad_()
    dy = torch.randn(shape)
    y = fused.rms_norm(x, w, 1e-5)
    grads = torch.autograd.grad(y, (x, w), dy)
    y_ref = F.rms_norm(x, w.shape, w, 1e-5)
    grads_ref = torch.autograd.grad(y_ref, (x, w), dy)
    assert compiled.counts["rmsnorm_backward"] == 1
    assert torch.equal(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):  # dw sums up to 768 rows in fp32
        assert (g - g_ref).abs().max().item() <= 2e-6 * max(1.0, g_ref.abs().max().item())
    with torch.no_grad():  # nothing to differentiate: torch's kernel alone
        assert torch.equal(fused.rms_norm(x, w, 1e-5), y_ref)
    assert compiled.counts["rmsnorm_backward"] == 1


def _sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("B,H,KV,T,D", [
    (2, 4, 4, 64, 32), (1, 4, 2, 17, 16), (2, 2, 2, 1, 8), (1, 2, 1, 127, 64), (2, 4, 2, 33, 128), (1, 6, 3, 7, 8),
    (2, 3, 1, 70, 40)])  # MHA, GQA, MQA; one position; row blocks of 4 and vectors of 8 with tails
def test_causal_attention_matches_sdpa(compiled, B, H, KV, T, D):
    if not hasattr(compiled.real, "causal"):
        pytest.skip("the causal kernel needs AVX2")
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, n, T, D, dtype=torch.float64) for n in (H, KV, KV))
    dy = torch.randn(B, H, T, D, dtype=torch.float64)
    exact = [t.clone().requires_grad_() for t in (q, k, v)]
    want = _sdpa(*exact, 0.3)
    want_grads = torch.autograd.grad(want, exact, dy)
    ours = [t.float().requires_grad_() for t in (q, k, v)]
    got = fused.causal_attention(*ours, 0.3, lambda: pytest.fail("took the reference"))
    got_grads = torch.autograd.grad(got, ours, dy.float())
    assert compiled.counts["causal"] == 2
    for a, b in zip((got, *got_grads), (want, *want_grads)):
        assert (a.double() - b).abs().max().item() <= 2e-5 * max(1.0, b.abs().max().item())


def test_causal_attention_takes_views(compiled):
    if not hasattr(compiled.real, "causal"):
        pytest.skip("the causal kernel needs AVX2")
    qkv = torch.randn(2, 9, 3, 2, 8).permute(2, 0, 3, 1, 4)  # [q | k | v] heads as views, (B, H, T, D) each
    got = fused.causal_attention(*qkv, 0.5, lambda: pytest.fail("took the reference"))
    assert (got - _sdpa(*qkv, 0.5)).abs().max().item() <= 2e-5 * max(1.0, got.abs().max().item())


def test_causal_attention_falls_back_where_the_kernel_does_not_apply(compiled):
    q = torch.randn(1, 2, 5, 8)
    long = torch.randn(1, 2, fused.CAUSAL_MAX_T + 1, 8)
    cases = [(q.double(), q.double()), (q[..., :6].contiguous(), q[..., :6].contiguous()),  # dtype, D not 8k
             (long, long),  # length
             (q, torch.randn(1, 2, 4, 8))]  # keys of another length (a cache)
    for query, key in cases:
        calls = []
        fused.causal_attention(query, key, key, 0.5, lambda: calls.append(1))
        assert calls == [1]
    assert compiled.counts["causal"] == 0


def _train_step(model: lmforge.GPT, x: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(x).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_a_training_step_is_the_same_with_and_without_the_passes(compiled, monkeypatch, n_kv_head):
    torch.manual_seed(0)
    model = lmforge.GPT(lmforge.preset("llama-baby", vocab_size=65, n_positions=64, n_layer=2, n_kv_head=n_kv_head))
    x = torch.randint(0, 65, (3, 20))
    loss, grads = _train_step(model, x)
    # two layers, forward and backward; five norms (two per layer and the final one), backward only
    assert dict(compiled.counts) == {"swiglu": 4, "heads": 4, "causal": 4, "rmsnorm_backward": 5}
    monkeypatch.setattr(fused, "_compiled", lambda *tensors: None)
    loss_ref, grads_ref = _train_step(model, x)
    assert abs(loss - loss_ref) <= 1e-6 * abs(loss_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert (g - g_ref).abs().max().item() <= 1e-5 * max(1.0, g_ref.abs().max().item())


def test_torch_compile_traces_the_reference(compiled):
    """Under torch.compile the functions take the model's equations (which the compiler fuses itself)."""
    calls = []
    assert fused._compiled(torch.randn(2)) is not None
    torch.compiler.reset()

    @torch.compile(backend="eager")
    def f(h):
        return fused.swiglu(h, lambda t: calls.append(1) or _reference_swiglu(t))

    h = torch.randn(3, 8)
    _close(f(h), _reference_swiglu(h))
    assert calls and compiled.counts["swiglu"] == 0
