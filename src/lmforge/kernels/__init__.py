"""CPU kernels for small-batch decoding: y = x @ W^T (+ bias) (+ residual) at the memory-bandwidth limit.

Batch-1 decoding is a chain of matrix-vector products whose time is the time to read the weights once.
`linear` (fp32 or bf16 weights) and `int8_linear` (int8 weights with fp32 scales per output channel or per
group of 32 along it) run a small C++ kernel (gemv.cpp) for a few rows of x on the CPU and plain torch
everywhere else (many rows, CUDA/MPS, non-contiguous weights, no compiler); both give the same results up
to float rounding. For the
decode loop, `bind(weight, bias, scale)` checks a weight once and returns a `Gemv` to call per step (it can
also add into the residual stream in place: `g(x, residual=h, out=h)`).

`lmforge.kernels.fused` holds the batched forward's and backward's compiled passes (training steps, prefill):
SwiGLU, RoPE with the split into heads, causal attention of short sequences, RMSNorm's backward.

The kernel is compiled on first use with torch.utils.cpp_extension (a C++ compiler and ninja, about 15 s)
into `$XDG_CACHE_HOME/lmforge/kernels` (by default `~/.cache/lmforge/kernels`), keyed by the source, torch,
Python, the CPU's flags and the build flags; later processes load it from there in milliseconds. Nothing
happens at import time and nothing is downloaded. If the build is impossible the torch path is used and
`why_unavailable()` says why. Set the environment variable `LMFORGE_KERNELS=0` (read at first use) to
never build or use the compiled kernels.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError
from lmforge.kernels import _build

__all__ = ["linear", "int8_linear", "dequantize_int8", "bind", "Gemv", "Norm", "Activation", "OneQueryAttention", "available",
           "why_unavailable"]

_KINDS = {torch.float32: 0, torch.bfloat16: 1}  # weight kinds of gemv.cpp; int8 is 2
_INT8 = 2
_X_BF16, _BIAS_BF16, _GROUPS_32 = 1, 2, 32  # flags of gemv.cpp
KERNEL_GROUP = 32  # the group size of int8 group scales the compiled kernel runs (others: the torch path)
_NORM_FLAGS = {"layernorm": 4, "rmsnorm": 8}
_ACTIVATION_FLAGS = {"gelu_tanh": 16}
_X_FLAGS = {torch.float32: 0, torch.bfloat16: _X_BF16}
# Up to how many rows of x the compiled kernel runs, measured against torch 2.13 (MKL) on a 2-core AVX2
# EPYC: the kernel streams each tile of weights from memory once for all rows (blocks of 8 rows reuse it
# from L2), which beats MKL's GEMM up to 64 rows while 8 rows of x fit in L1 (K <= 1024: GPT-2's
# projections, and its 50257-row LM head at 1.5-2x); with longer rows (K = 3072, read 4 rows of x at a
# time) up to 32 (1.2-1.5x MKL at 8-24 rows, even at 32-48, slower at 64). torch's bf16
# GEMM without AVX512-BF16/AMX is 4-6x slower than its fp32 one, and int8 has no fast torch path, so
# those run compiled up to 64 rows whatever K (bf16: 8 where the CPU has them). Beyond, the torch path
# computes in fp32 on such CPUs.
_ROWS = {0: 64, 1: 64, _INT8: 64}
_LONG_K, _LONG_K_ROWS = 1024, 32  # fp32 weights with rows longer than _LONG_K: up to 32 rows
_FAST_ROWS = 32  # from here on, the CPU torch fallback for bf16 computes in fp32 where bf16 GEMM is slow


@functools.cache
def _native_bf16() -> bool:
    """Whether torch's CPU bf16 GEMM has hardware support (AVX512-BF16 or AMX) on this CPU."""
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(probe is not None and probe() for probe in probes)


def _max_rows(kind: int, k: int) -> int:
    if kind == _KINDS[torch.bfloat16] and _native_bf16():
        return 8
    if kind == _KINDS[torch.float32] and k > _LONG_K:
        return _LONG_K_ROWS
    return _ROWS[kind]


def available() -> bool:
    """True when the compiled CPU kernels can be used in this process (builds them on the first call)."""
    return _build.ops() is not None


def why_unavailable() -> str | None:
    """Why the compiled kernels are not used (None when they are); builds them on the first call."""
    _build.ops()
    return _build.reason()


class Norm(NamedTuple):
    """A norm in front of a projection, fused into its kernel: `kind` "layernorm" ((x - mean) /
    sqrt(var + eps) * weight + bias) or "rmsnorm" (x / sqrt(mean(x^2) + eps) * weight, as
    lmforge.model.RMSNorm rounds it); `apply` is the norm itself, which the torch path calls."""

    kind: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float
    apply: Callable[[torch.Tensor], torch.Tensor]


class Activation(NamedTuple):
    """An activation after a projection, fused into its kernel: `kind` "gelu_tanh" (GPT-2's GELU,
    0.5 y (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3)))); `apply` is the activation itself (the torch path)."""

    kind: str
    apply: Callable[[torch.Tensor], torch.Tensor]


class Gemv:
    """y = act(norm(x) @ weight.T (* scale) (+ bias)) (+ residual) with the weight checked once; the norm
    and the activation are optional (and the residual only without an activation).

    Bind once per request, call once per decode step: the per-call work is a few attribute reads, one
    output allocation and the kernel. Falls back to `linear` / `int8_linear` (torch) whenever the compiled
    kernel does not apply, so a Gemv is always safe to call. It holds references to the tensors it was
    given: bind again after replacing them (in-place updates are seen).
    """

    __slots__ = ("weight", "scale", "bias", "norm", "activation", "_ops", "_args", "_n", "_k", "_limit", "_grad",
                 "_x_flags")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                 norm: Norm | None = None, activation: Activation | None = None):
        self.weight, self.scale, self.bias, self.norm, self.activation = weight, scale, bias, norm, activation
        self._ops, self._args, self._limit = None, None, 0
        self._n, self._k = (weight.shape[0], weight.shape[-1]) if weight.dim() == 2 else (0, 0)
        self._grad = weight.requires_grad or (bias is not None and bias.requires_grad)
        self._x_flags = _X_FLAGS if scale is not None else {weight.dtype: _X_FLAGS[weight.dtype]} if weight.dtype in _KINDS else {}
        if not (weight.is_cpu and weight.dim() == 2 and weight.is_contiguous() and self._k > 0):
            return
        kind = _INT8 if scale is not None and weight.dtype is torch.int8 else _KINDS.get(weight.dtype) if scale is None else None
        groups = scale is not None and scale.dim() == 2
        # scales: one per row (N,), or (kernel: groups of 32 only) one per group of 32 along K (N, K / 32)
        scale_shape = (self._n, self._k // KERNEL_GROUP) if groups and self._k % KERNEL_GROUP == 0 else (self._n,)
        if kind is None or (scale is not None and not (scale.is_cpu and scale.is_contiguous()
                                                       and scale.dtype is torch.float32 and scale.shape == scale_shape)):
            return
        flags = _GROUPS_32 if groups else 0
        if bias is not None:
            if not (bias.is_cpu and bias.is_contiguous() and bias.dtype in _KINDS and bias.shape == (self._n,)):
                return
            flags |= _BIAS_BF16 if bias.dtype is torch.bfloat16 else 0
        norm_args = (0, 0, 0.0)
        if norm is not None:
            # the kernel reads the norm's parameters in x's dtype: x must then have it (see _x_flags)
            params = [t for t in (norm.weight, norm.bias) if t is not None]
            if norm.kind not in _NORM_FLAGS or (norm.bias is not None and norm.kind != "layernorm") or not all(
                    t.is_cpu and t.is_contiguous() and t.dtype is norm.weight.dtype and t.shape == (self._k,)
                    for t in params) or norm.weight.dtype not in _KINDS:
                return
            flags |= _NORM_FLAGS[norm.kind]
            self._x_flags = {d: f for d, f in self._x_flags.items() if d is norm.weight.dtype}
            norm_args = (norm.weight.data_ptr(), 0 if norm.bias is None else norm.bias.data_ptr(), float(norm.eps))
        if activation is not None:
            if activation.kind not in _ACTIVATION_FLAGS:
                return
            flags |= _ACTIVATION_FLAGS[activation.kind]
        self._ops, self._limit = _build.ops(), _max_rows(kind, self._k) * self._k
        self._args = (kind, flags, weight.data_ptr(), 0 if scale is None else scale.data_ptr(),
                      0 if bias is None else bias.data_ptr(), *norm_args)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """`out` (optional, the output's shape and x's dtype, not x itself) receives the result; it may be
        `residual` itself, which then becomes residual += x @ W^T (+ bias) in place, with no allocation."""
        if self._applies(x, residual, out) and not ((self._grad or x.requires_grad) and torch.is_grad_enabled()):
            y = torch.empty((*x.shape[:-1], self._n), dtype=x.dtype) if out is None else out
            self._ops.gemv(*self._kernel_args(x, residual, y))
            return y
        return self._torch(x, residual, out)

    def _applies(self, x: torch.Tensor, residual: torch.Tensor | None, out: torch.Tensor | None) -> bool:
        """Whether the compiled kernel runs this call (autograd aside): x, residual and out as it reads them."""
        if not (self._ops is not None and x.dtype in self._x_flags and x.is_cpu and x.is_contiguous() and x.dim() > 0
                and x.shape[-1] == self._k and x.numel() <= self._limit):
            return False
        shape = (*x.shape[:-1], self._n)
        return ((residual is None or (self.activation is None and _fits(residual, x.dtype, shape)))
                and (out is None or (out is not x and _fits(out, x.dtype, shape))))

    def _kernel_args(self, x: torch.Tensor, residual: torch.Tensor | None, y: torch.Tensor) -> tuple:
        kind, flags, w, s, b, norm_w, norm_b, eps = self._args
        return (kind, flags | self._x_flags[x.dtype], x.data_ptr(), w, s, b,
                0 if residual is None else residual.data_ptr(), y.data_ptr(), x.numel() // self._k, self._k, self._n,
                norm_w, norm_b, eps)

    def plan(self, x: torch.Tensor, out: torch.Tensor, residual: torch.Tensor | None = None) -> Callable[[], torch.Tensor]:
        """This call with fixed tensors, checked once: a function of no arguments that computes
        out = act(norm(x) @ W^T ...) (+ residual) from x's values at the time of each call (the caller
        rewrites x and residual in place between calls; `residual` may be `out`). A decode step's
        vectors are its own buffers, so its calls skip the per-call checks and the output allocation
        (about 10 of a small call's 13 us). Runs __call__ wherever the kernel does not apply."""
        if x.requires_grad or not self._applies(x, residual, out):
            return lambda: self(x, residual, out=out)
        gemv, args = self._ops.gemv, self._kernel_args(x, residual, out)
        grad, grad_enabled = self._grad, torch.is_grad_enabled

        def run() -> torch.Tensor:  # it holds x, residual and out, whose addresses `args` has
            if grad and grad_enabled():  # trainable weights with autograd on: torch records the product
                return self(x, residual, out=out)
            gemv(*args)
            return out

        return run

    def _torch(self, x: torch.Tensor, residual: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm.apply(x)
        inner = residual if self.activation is None else None  # with an activation, added after it
        if self.scale is None:
            y = _torch_linear(x, self.weight, self.bias, inner)
        else:
            y = _torch_int8_linear(x, self.weight, self.scale, self.bias, inner)
        if self.activation is not None:
            y = self.activation.apply(y)
            if residual is not None:
                y = y + residual
        return y if out is None else out.copy_(y)


class OneQueryAttention:
    """softmax(q_h K_h^T * scale) V_h for one query per head over positions [start, end) of one sequence's
    cache: the attention of a batch-1 decode step (torch's fused CPU kernel costs 100-200 us per call
    whatever the length; the compiled one reads each cached key and value once).

    keys, values: (n_kv_heads, max_length, head_dim), the cache row's own storage (written in place
    between calls); query head h reads kv head h // (n_head // n_kv_heads). Call with q (n_head, head_dim)
    of the cache's dtype; returns (n_head, head_dim). Falls back to F.scaled_dot_product_attention
    wherever the compiled kernel does not apply (another device or dtype, no compiler), equal up to
    float rounding."""

    __slots__ = ("keys", "values", "n_head", "scale", "_ops", "_args", "_gqa")

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, n_head: int, scale: float):
        if keys.dim() != 3 or keys.shape != values.shape or n_head % keys.shape[0]:
            raise ConfigError(f"OneQueryAttention: keys {tuple(keys.shape)} and values {tuple(values.shape)} must both be "
                              f"(n_kv_heads, max_length, head_dim) with n_head ({n_head}) a multiple of n_kv_heads")
        self.keys, self.values, self.n_head, self.scale = keys, values, n_head, float(scale)
        self._gqa = {"enable_gqa": True} if keys.shape[0] != n_head else {}
        self._ops = None
        if (keys.is_cpu and values.is_cpu and keys.dtype in _KINDS and values.dtype is keys.dtype
                and keys.is_contiguous() and values.is_contiguous()):
            self._ops = _build.ops()
            kv, length, d = keys.shape
            self._args = (1 if keys.dtype is torch.bfloat16 else 0, keys.data_ptr(), values.data_ptr(), n_head, kv, length, d)

    def __call__(self, q: torch.Tensor, start: int, end: int, k: torch.Tensor | None = None,
                 v: torch.Tensor | None = None) -> torch.Tensor:
        """With k and v (n_kv_heads, head_dim), the new token's key and value are first written at
        position end - 1 (in the same call: the step's cache write)."""
        ops, keys = self._ops, self.keys
        if (ops is not None and q.dtype is keys.dtype and q.is_cpu and q.is_contiguous()
                and q.numel() == self.n_head * keys.shape[2] and 0 <= start < end <= keys.shape[1]
                and (k is None or all(t is not None and t.dtype is keys.dtype and t.is_cpu and t.is_contiguous()
                                      and t.numel() == keys.shape[0] * keys.shape[2] for t in (k, v)))):
            bf16, kp, vp, h, kv, length, d = self._args
            y = torch.empty(h, d, dtype=q.dtype)
            ops.attend(bf16, q.data_ptr(), kp, vp, 0 if k is None else k.data_ptr(), 0 if v is None else v.data_ptr(),
                       y.data_ptr(), h, kv, length, d, start, end, self.scale)
            return y
        return self._torch(q, start, end, k, v)

    def plan(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, y: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
        """This call with fixed tensors, checked once: a function (start, end) that writes the new key
        and value (k, v: (n_kv_heads, head_dim)) at end - 1 and the attention of q over [start, end)
        into y (n_head, head_dim), from their values at the time of each call (see Gemv.plan)."""
        ops, keys = self._ops, self.keys
        d = keys.shape[2]
        tensors = (q, k, v, y)
        if ops is None or not all(t.dtype is keys.dtype and t.is_cpu and t.is_contiguous() for t in tensors) or not (
                q.numel() == y.numel() == self.n_head * d and k.numel() == v.numel() == keys.shape[0] * d):
            return lambda start, end: y.copy_(self(q, start, end, k, v).view_as(y))
        bf16, kp, vp, h, kv, length, _ = self._args
        head, tail = (bf16, q.data_ptr(), kp, vp, k.data_ptr(), v.data_ptr(), y.data_ptr(), h, kv, length, d), self.scale
        attend = ops.attend

        def run(start: int, end: int) -> torch.Tensor:
            if not 0 <= start < end <= length:
                raise ValueError(f"attention over positions [{start}, {end}) outside the cache's {length}")
            attend(*head, start, end, tail)
            return y

        run.tensors = tensors  # held while the plan lives: `head` has their addresses
        return run

    def _torch(self, q, start, end, k, v):
        keys, d = self.keys, self.keys.shape[2]
        if k is not None:
            keys[:, end - 1] = k.view(keys.shape[0], d)
            self.values[:, end - 1] = v.view(keys.shape[0], d)
        return F.scaled_dot_product_attention(
            q.reshape(1, self.n_head, 1, d), self.keys[None, :, start:end], self.values[None, :, start:end],
            scale=self.scale, **self._gqa).view(self.n_head, d)


def _fits(t: torch.Tensor, dtype: torch.dtype, shape: tuple) -> bool:
    return t.is_cpu and t.dtype is dtype and t.is_contiguous() and t.shape == shape and not t.requires_grad


def bind(weight: torch.Tensor, bias: torch.Tensor | None = None, scale: torch.Tensor | None = None,
         norm: Norm | None = None, activation: Activation | None = None) -> Gemv:
    """`Gemv(weight, bias, scale, norm, activation)`: a pre-checked `linear` (scale None) or `int8_linear`
    for repeated calls, optionally with a norm before it and an activation after it."""
    return Gemv(weight, bias, scale, norm, activation)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias + residual in x.dtype; x (..., K) fp32 or bf16, weight (N, K) of x's dtype.

    The compiled kernel for a few rows on the CPU, torch otherwise; for repeated calls with the same
    weight, `bind(weight, bias)` skips the weight's checks."""
    if x.is_cpu and weight.dtype is x.dtype and x.dtype in _KINDS and _build.ops() is not None:
        return Gemv(weight, bias)(x, residual)
    return _torch_linear(x, weight, bias, residual)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
    """(x @ qweight.T) * scale + bias + residual in x.dtype; qweight int8 (N, K), scale fp32: (N,) one per
    row, or (N, G) one per group of K / G entries along each row (the compiled kernel runs groups of 32)."""
    if x.is_cpu and qweight.dtype is torch.int8 and x.dtype in _KINDS and _build.ops() is not None:
        return Gemv(qweight, bias, scale)(x, residual)
    return _torch_int8_linear(x, qweight, scale, bias, residual)


def _check(x: torch.Tensor, weight: torch.Tensor, bias, residual, what: str) -> None:
    if weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ConfigError(f"{what}: x of shape {tuple(x.shape)} does not fit weight of shape {tuple(weight.shape)}: "
                          f"x's last dimension must equal the weight's second (in_features)")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ConfigError(f"{what}: bias of shape {tuple(bias.shape)} does not fit weight of shape "
                          f"{tuple(weight.shape)}: it must be ({weight.shape[0]},)")
    if residual is not None and (tuple(residual.shape) != (*x.shape[:-1], weight.shape[0]) or residual.dtype != x.dtype):
        raise ConfigError(f"{what}: residual {tuple(residual.shape)} {residual.dtype} must have the output's shape "
                          f"{(*x.shape[:-1], weight.shape[0])} and x's dtype {x.dtype}")


def _torch_linear(x, weight, bias, residual):
    _check(x, weight, bias, residual, "linear")
    if weight.dtype != x.dtype:
        raise ConfigError(f"linear: weight dtype {weight.dtype} differs from x dtype {x.dtype}: cast one of them")
    if x.is_cpu and x.dtype is torch.bfloat16 and x.numel() >= _FAST_ROWS * x.shape[-1] and not _native_bf16():
        y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        return (y if residual is None else y.add_(residual)).to(x.dtype)
    y = F.linear(x, weight, bias)
    return y if residual is None else y.add_(residual)


def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q * s as an fp32 (N, K) matrix, for scales (N,) one per row or (N, G) one per group of K / G."""
    if scale.dim() == 1:
        return qweight.float() * scale[:, None]
    n, k = qweight.shape
    return (qweight.float().view(n, scale.shape[1], -1) * scale[..., None]).view(n, k)


def _torch_int8_linear(x, qweight, scale, bias, residual):
    _check(x, qweight, bias, residual, "int8_linear")
    if qweight.dtype != torch.int8:
        raise ConfigError(f"int8_linear: qweight must be int8, got {qweight.dtype}")
    n, k = qweight.shape
    if not (tuple(scale.shape) == (n,) or (scale.dim() == 2 and scale.shape[0] == n and 0 < scale.shape[1]
                                           and k % scale.shape[1] == 0)):
        raise ConfigError(f"int8_linear: scale of shape {tuple(scale.shape)} must be ({n},) (one per row) or "
                          f"({n}, groups) with groups dividing {k} (one per group along a row) for qweight of shape "
                          f"{tuple(qweight.shape)}")
    if not x.is_floating_point():
        raise ConfigError(f"int8_linear: x must be floating point (float32 or bfloat16), got {x.dtype}")
    # int8 -> float is exact; the GEMM accumulates in fp32 (in fp32 outright on the CPU, where torch's bf16
    # GEMM is slow without hardware support); scale, bias and residual are applied in fp32.
    compute = torch.float32 if x.is_cpu else x.dtype
    if scale.dim() == 2:  # group scales: the weight is dequantized group by group first
        y = F.linear(x.to(compute), dequantize_int8(qweight, scale).to(compute)).float()
    else:
        y = F.linear(x.to(compute), qweight.to(compute)).float().mul_(scale)
    if bias is not None:
        y += bias
    if residual is not None:
        y += residual
    return y.to(x.dtype)
