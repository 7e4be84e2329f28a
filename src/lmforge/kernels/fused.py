"""Fused passes of the batched forward and its backward on the CPU (training steps, prefill): the gated
MLP's silu(gate) * up, the split of the fused [Q | K | V] projection into heads with rotary positions
applied to q and k, causal self-attention of whole short sequences, and RMSNorm's backward.

In torch the first two are several kernels over the same memory each (for the heads with RoPE: a
transpose, a split, neg, cat, two multiplies and an add, and in the backward a concatenation of the
pieces' gradients and a copy), which on a small model cost as much as the matrix products around them.
The compiled passes (fused.h) do each in one pass forward and one backward. torch's attention kernel
(flash attention) is blocked for long sequences, and at a training step's few dozen positions its fixed
costs dominate; the compiled one (causal.h) is about twice as fast up to 128 positions (CAUSAL_MAX_T).
RMSNorm keeps torch's forward kernel (bit for bit transformers') and gets a one-pass backward where torch
runs about ten kernels. All are torch.autograd.Functions (once differentiable). Each function takes the
model's own equations (or SDPA) as `reference` and calls it wherever the compiled code does not apply
(other dtypes or devices, no compiler, torch.compile tracing, masks, longer sequences); both give the
same results (the heads bit for bit, the others up to float rounding), as the tests check.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from lmforge.kernels import _build

Tensors3 = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _compiled(*tensors: torch.Tensor):
    """The compiled kernels when they apply to these tensors (fp32 on the CPU, outside torch.compile)."""
    if torch.compiler.is_compiling() or not all(t.is_cpu and t.dtype is torch.float32 for t in tensors):
        return None
    return _build.ops()


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        inner = h.shape[-1] // 2
        y = h.new_empty(*h.shape[:-1], inner)
        _build.ops().swiglu(0, h.data_ptr(), 0, y.data_ptr(), h.numel() // (2 * inner), inner)
        ctx.save_for_backward(h)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor) -> torch.Tensor:
        (h,) = ctx.saved_tensors
        inner = h.shape[-1] // 2
        dy = dy.contiguous()
        dh = torch.empty_like(h)
        _build.ops().swiglu(1, h.data_ptr(), dy.data_ptr(), dh.data_ptr(), h.numel() // (2 * inner), inner)
        return dh


def swiglu(h: torch.Tensor, reference: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """silu(gate) * up for h = [gate | up] (..., 2I) -> (..., I): the compiled pass, or `reference(h)`."""
    if h.shape[-1] % 2 or not h.is_contiguous() or h.numel() == 0 or _compiled(h) is None:
        return reference(h)
    return _SwiGLU.apply(h)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return F.rms_norm(x, weight.shape, weight, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        dy = dy.contiguous()
        dx, dw = torch.empty_like(x), torch.empty_like(weight)
        C = weight.numel()
        _build.ops().rmsnorm_backward(x.data_ptr(), weight.data_ptr(), dy.data_ptr(), dx.data_ptr(), dw.data_ptr(),
                                      x.numel() // C, C, ctx.eps)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm(x, weight.shape, weight, eps) over the last dimension, fp32: torch's forward (bit for bit
    transformers' RMSNorm), with the compiled one-pass backward when a gradient is wanted on the CPU."""
    if (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad) and x.is_contiguous()
            and weight.is_contiguous() and weight.dim() == 1 and x.shape[-1:] == weight.shape and x.numel()
            and _compiled(x, weight) is not None):
        return _RMSNorm.apply(x, weight, eps)
    return F.rms_norm(x, weight.shape, weight, eps)


class _Heads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_head: int, n_kv_head: int) -> Tensors3:
        B, T, width = qkv.shape
        D = width // (n_head + 2 * n_kv_head)
        q = qkv.new_empty(B, n_head, T, D)
        k, v = qkv.new_empty(B, n_kv_head, T, D), qkv.new_empty(B, n_kv_head, T, D)
        _build.ops().heads(0, qkv.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                           B, T, n_head, n_kv_head, D, cos.shape[0])
        ctx.save_for_backward(cos, sin)
        ctx.shape = (B, T, n_head, n_kv_head, D)
        return q, k, v

    @staticmethod
    @once_differentiable
    def backward(ctx, dq, dk, dv):
        B, T, H, KV, D = ctx.shape
        cos, sin = ctx.saved_tensors
        grads = [torch.zeros(B, n, T, D) if g is None else g.contiguous() for g, n in ((dq, H), (dk, KV), (dv, KV))]
        dqkv = grads[0].new_empty(B, T, (H + 2 * KV) * D)
        _build.ops().heads(1, dqkv.data_ptr(), *(g.data_ptr() for g in grads), cos.data_ptr(), sin.data_ptr(),
                           B, T, H, KV, D, cos.shape[0])
        return dqkv, None, None, None, None


def qkv_heads(qkv: torch.Tensor, n_head: int, n_kv_head: int, rope: tuple[torch.Tensor, torch.Tensor] | None,
              reference: Callable[[torch.Tensor, tuple | None], Tensors3]) -> Tensors3:
    """The fused projection's output qkv (B, T, (n_head + 2 n_kv_head) D) as q (B, n_head, T, D) and k, v
    (B, n_kv_head, T, D), q and k rotated by rope = (cos, sin), each (B or 1, T, D): the compiled pass (new
    contiguous tensors), or `reference(qkv, rope)` (which is also what runs without rope)."""
    width = n_head + 2 * n_kv_head
    # Without rotary positions the reference's views cost nothing: the pass would only copy.
    if (rope is None or qkv.dim() != 3 or qkv.shape[-1] % width or (qkv.shape[-1] // width) % 2
            or not qkv.is_contiguous() or qkv.numel() == 0 or _compiled(qkv, *rope) is None):
        return reference(qkv, rope)
    B, T, D = qkv.shape[0], qkv.shape[1], qkv.shape[-1] // width
    cos, sin = (t.contiguous() for t in rope)
    if (cos.requires_grad or sin.requires_grad or cos.shape != sin.shape or cos.dim() != 3
            or cos.shape[0] not in (1, B) or cos.shape[1:] != (T, D)):
        return reference(qkv, rope)
    return _Heads.apply(qkv, cos, sin, n_head, n_kv_head)


# Up to how many positions the compiled causal attention runs. Measured against torch 2.13's flash kernel on
# a 2-core AVX2 EPYC, forward + backward alone: 2.2x as fast at 64 positions, 1.9x at 128, 1.2x at 256, even
# at 512, half as fast at 1024 (its loops are not blocked for keys that leave the L1 cache). Inside a GPT-2
# small training step at 256 positions the gain was gone (10.2 vs 10.0 s per step): 128 keeps a margin.
CAUSAL_MAX_T = 128


class _Causal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        B, H, T, D = q.shape
        y, lse = q.new_empty(B, T, H, D), q.new_empty(B, H, T)
        _build.ops().causal(0, q.data_ptr(), k.data_ptr(), v.data_ptr(), y.data_ptr(), lse.data_ptr(), 0, 0, 0, 0,
                            B, T, H, k.shape[1], D, scale)
        ctx.save_for_backward(q, k, v, y, lse)
        ctx.scale = scale
        return y.transpose(1, 2)  # (B, H, T, D), whose transpose back to (B, T, H * D) is free

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        q, k, v, y, lse = ctx.saved_tensors
        B, H, T, D = q.shape
        dy = dy.transpose(1, 2).contiguous()  # (B, T, H, D): already so when it comes from the projection
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _build.ops().causal(1, q.data_ptr(), k.data_ptr(), v.data_ptr(), y.data_ptr(), lse.data_ptr(), dy.data_ptr(),
                            dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), B, T, H, k.shape[1], D, ctx.scale)
        return dq, dk, dv, None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     reference: Callable[[], torch.Tensor]) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v, (B, H, T, D), for q (B, H, T, D) and k, v (B, KV, T, D) with H a
    multiple of KV: the compiled kernel (causal.h) for up to CAUSAL_MAX_T positions of fp32 CPU tensors with
    D a multiple of 8 up to 128 (views, e.g. heads split off a fused projection, are copied first: the copy
    costs less than the kernel saves), else `reference()`."""
    if (q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]
            or q.shape[1] % k.shape[1] or not 0 < q.shape[2] <= CAUSAL_MAX_T or q.shape[3] % 8 or q.shape[3] > 128
            or q.numel() == 0 or not hasattr(_compiled(q, k, v), "causal")):  # AVX2 builds only
        return reference()
    return _Causal.apply(q.contiguous(), k.contiguous(), v.contiguous(), float(scale))
