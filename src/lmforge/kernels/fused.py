"""Fused elementwise passes of the batched forward and its backward on the CPU (training steps, prefill):
the gated MLP's silu(gate) * up, and the split of the fused [Q | K | V] projection into heads with rotary
positions applied to q and k.

In torch each is several kernels over the same memory (for the heads with RoPE: a transpose, a split,
neg, cat, two multiplies and an add, and in the backward a concatenation of the pieces' gradients and a
copy), which on a small model costs as much as the matrix products around them. The compiled passes
(fused.h) do each in one pass forward and one backward, as torch.autograd.Functions (once
differentiable). Each function takes the model's own equations as `reference` and calls them wherever
the compiled pass does not apply (other dtypes or devices, no compiler, torch.compile tracing); both give
the same results (the heads bit for bit, SwiGLU up to the exponential's rounding), as the tests check.
"""

from __future__ import annotations

from typing import Callable

import torch
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
    contiguous tensors), or `reference(qkv, rope)` (always without rope)."""
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

