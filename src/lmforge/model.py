"""The decoder-only Transformer (GPT-2 and the Llama family, configured), written from the equations.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V
    MultiHead(X)       = Concat(head_1, ..., head_h) W^O,   head_i = Attention(X W_i^Q, X W_i^K, X W_i^V)

A block is pre-norm: x = x + Attn(Norm_1(x)); x = x + MLP(Norm_2(x)), with LayerNorm, learned positions
and a GELU MLP (GPT-2) or RMSNorm, rotary positions and SwiGLU with grouped-query attention (Llama,
Qwen, Mistral), as GPTConfig says. One forward path for every
use (training, prefill, batched decoding, generation's static-shape step); for one token of one
sequence, each module also states its equations on (C,) vectors (row_step), since at batch 1 every
operation besides the weight products costs more than its arithmetic. Parameter names are lmforge's
own; families/ maps them to and from each Hugging Face scheme.
Shapes: B batch, T query length, S key length (cache + new), H heads, D head_dim, C = H * D.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.checkpoint import load_pretrained, save_pretrained as save_checkpoint
from lmforge.checkpoint import load_weights as copy_weights_from
from lmforge.config import GPTConfig, preset
from lmforge.generation import generate as generate_tokens
from lmforge.kernels import Activation, Gemv, Norm, OneQueryAttention, bind
from lmforge.kernels import available as kernels_available, linear as kernel_linear
from lmforge.kernels.fused import causal_attention, qkv_heads, rms_norm, swiglu
from lmforge.quantize import Int8Linear, quantize_model

AttentionImpl = Literal["sdpa", "reference"]
# torch >= 2.5: scaled_dot_product_attention returns zeros for a query whose keys are all masked.
_SDPA_ZEROS_EMPTY_ROWS = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


# ---- attention -------------------------------------------------------------------------------


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    mask: torch.Tensor | None = None, is_causal: bool = False, scale: float | None = None,
) -> torch.Tensor:
    """softmax(Q K^T * scale + mask) V, spelled out; the oracle for the fused kernel.

    q: (B, H, T, D), k and v: (B, H, S, D); mask: bool, True = may attend, broadcastable to (B, H, T, S).
    """
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
    if is_causal:
        T, S = q.size(-2), k.size(-2)
        causal = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        scores = scores.masked_fill(~causal, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    # Half-precision scores are normalised in fp32, as the fused kernels do.
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype)
    if mask is not None:  # a query that may attend to nothing gets zeros, as the fused kernel gives (not 0/0)
        weights = weights.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    return weights @ v  # (B, H, T, D)


class KVCache:
    """Preallocated keys and values of every layer: (n_layer, B, n_kv_head, max_length, D).

    Decoding writes each step's keys/values in place, so neither the prompt nor the cache is
    recomputed or reallocated per step. `length` counts the positions filled so far.
    """

    def __init__(
        self, n_layer: int, batch_size: int, n_head: int, max_length: int, head_dim: int,
        *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", zeroed: bool = True,
    ) -> None:
        # zeroed=False: uninitialised memory, for a cache every position of which is written before it is
        # read (a prompt prefilled chunk by chunk): zeroing tens of megabytes of fresh pages costs ~1 ms/MB.
        shape = (n_layer, batch_size, n_head, max_length, head_dim)
        new = torch.zeros if zeroed else torch.empty
        self.k = new(shape, dtype=dtype, device=device)
        self.v = new(shape, dtype=dtype, device=device)
        self.length = 0

    @classmethod
    def for_model(cls, model: "GPT", batch_size: int, max_length: int | None = None, zeroed: bool = True) -> "KVCache":
        """A cache sized for `batch_size` sequences of up to `max_length` (default: the context); zeroed=False
        leaves it uninitialised (for a cache written before it is read)."""
        cfg = model.config
        max_length = cfg.n_positions if max_length is None else max_length
        if not 0 < max_length <= cfg.n_positions:
            raise ValueError(f"KV cache max_length must be in 1..{cfg.n_positions} (n_positions), got {max_length}")
        p = model.transformer.wte.weight
        return cls(cfg.n_layer, batch_size, cfg.n_kv_heads, max_length, cfg.head_dim, dtype=p.dtype, device=p.device,
                   zeroed=zeroed)

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    @property
    def max_length(self) -> int:
        return self.k.size(3)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new (B, H, T, D) keys/values after the filled part; return all keys/values so far."""
        start, end = self.length, self.length + k.size(2)
        if end > self.max_length:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.max_length} allocated")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        """Mark `n` more positions as filled (the model calls this once all layers have written)."""
        self.length += n

    def reorder(self, index: torch.Tensor) -> None:
        """Select/reorder batch rows in place (beam search keeps the surviving beams).

        Only the filled positions are copied, not the whole preallocated buffer.
        """
        n = self.length
        self.k[:, :, :, :n] = self.k[:, :, :, :n].index_select(1, index)
        self.v[:, :, :, :n] = self.v[:, :, :, :n].index_select(1, index)

    def reset(self) -> None:
        self.length = 0

    # A continuous-batching server keeps each running sequence in a row of its own length (RaggedRows);
    # these let it grow the cache and move rows in and out.

    def grow(self, max_length: int, rows: int | None = None) -> None:
        """Reallocate for `max_length` positions, keeping the filled part (`length` positions) of every
        row, or with `rows`, every old position of the first `rows` rows (rows of their own lengths, as
        RaggedRows uses them). Everything else is undefined until written.

        The new buffers are not initialised (torch.empty): zeroing gigabytes of a server's cache would
        stall every running stream for seconds while the pages fault in. Whoever reads positions a mask
        hides must have written them (attention reads them: NaN * 0 is NaN)."""
        if max_length < self.length:
            raise ValueError(f"cannot shrink a KV cache holding {self.length} positions to {max_length}")
        keep = self.length if rows is None else self.max_length
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_empty((*old.shape[:3], max_length, old.size(4)))
            new[:, :rows, :, :keep] = old[:, :rows, :, :keep]
            setattr(self, name, new)

    def copy_row(self, dst: int, source: "KVCache", src: int = 0, length: int | None = None) -> None:
        """Copy the first `length` positions (default source.length) of row `src` of `source` into the
        first positions of row `dst`."""
        p = source.length if length is None else length
        if p > self.max_length:
            raise ValueError(f"a row of {p} positions does not fit a cache of {self.max_length}")
        self.k[:, dst, :, :p] = source.k[:, src, :, :p]
        self.v[:, dst, :, :p] = source.v[:, src, :, :p]


class RaggedRows:
    """The first n rows of a KVCache, row r holding lengths[r] positions (left-aligned, no padding):
    one decode step writes row r's new key/value at position lengths[r], and row r attends to its
    positions 0..lengths[r] (mask()). A server's running sequences live so: they join and leave at any
    step with no keys/values moved. Pass as forward_blocks' kv_cache with mask() as its mask and the
    lengths as position ids; the caller advances its lengths after the step."""

    def __init__(self, cache: KVCache, lengths: torch.Tensor) -> None:
        self.k, self.v, self.lengths = cache.k, cache.v, lengths
        self.index = torch.arange(lengths.numel(), device=lengths.device)
        self.span = int(lengths.max()) + 1  # positions any row reads this step
        if self.span > cache.max_length:
            raise ValueError(f"KV cache is full: {self.span} positions needed, {cache.max_length} allocated")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write each row's new (n, KV, 1, D) key/value at its own length; return (n, KV, span, D) views."""
        n = self.index.numel()
        self.k[layer, self.index, :, self.lengths] = k[:, :, 0]
        self.v[layer, self.index, :, self.lengths] = v[:, :, 0]
        return self.k[layer, :n, :, : self.span], self.v[layer, :n, :, : self.span]

    def mask(self, window: int | None = None) -> torch.Tensor:
        """(n, 1, 1, span), True where row r may attend: its own positions up to the new one (the last
        `window` of them with a sliding window). Positions past a row's length are masked."""
        key = torch.arange(self.span, device=self.lengths.device)[None, :]
        last = self.lengths[:, None]
        allowed = key <= last
        if window is not None:
            allowed &= key > last - window
        return allowed[:, None, None, :]


class PackedKVCache:
    """Chunks of several sequences packed into one row of T tokens (no padding), each sequence with its
    own one-row KVCache (a server prefilling several prompts in one forward pass), optionally led by
    one new token of each running row of a batched cache (RaggedRows: a server's decode step in the same
    pass, so each weight is read once per step for decodes and prompts together).

    Segment i (t_i tokens after the p_i its cache holds) attends per segment: its queries see the filled
    part of its own cache and, causally, its own chunk (within the last `window` positions where the
    model has a sliding window). So the attention of a packed pass costs sum_i t_i (p_i + t_i), not T^2
    as one block-diagonal mask over the whole row would; the weight products still run on all T tokens
    at once. With `rows`, the row's first rows.n tokens are those decodes: token r is row r's next token
    (position rows.lengths[r]) and attends to its own row, as RaggedRows' decode step does.
    Used as forward_blocks' kv_cache (with mask=None); advance() once all layers have run (the caller
    advances the running rows' lengths).
    """

    def __init__(self, caches: list[KVCache], lengths: list[int], window: int | None = None,
                 rows: RaggedRows | None = None) -> None:
        self.caches, self.lengths, self.rows = caches, lengths, rows
        self.decodes = 0 if rows is None else rows.index.numel()
        self.rows_mask = None if rows is None else rows.mask(window)
        self.masks: list[torch.Tensor | None] = []  # per segment; None: plain causal (is_causal)
        for cache, t in zip(caches, lengths):
            p = cache.length
            if p + t > cache.max_length:
                raise ValueError(f"KV cache is full: {p + t} positions needed, {cache.max_length} allocated")
            if p == 0 and (window is None or t <= window):
                self.masks.append(None)
                continue
            query = torch.arange(p, p + t, device=cache.k.device)[:, None]
            key = torch.arange(p + t, device=cache.k.device)[None, :]
            mask = key <= query
            if window is not None:
                mask &= key > query - window
            self.masks.append(mask)

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, bool], torch.Tensor],
    ) -> torch.Tensor:
        """q: (1, H, T, D), k and v: (1, KV, T, D) of the packed row; writes each segment's keys/values
        into its cache and returns attention(q_i, K_i, V_i, mask_i, causal_i) of all segments, (1, H, T, D)."""
        out, start = [], self.decodes
        if self.rows is not None:  # (1, H, n, D) -> one query per row, (n, H, 1, D), and back
            n = self.decodes
            keys, values = self.rows.update(layer, k[0, :, :n].transpose(0, 1)[:, :, None],
                                            v[0, :, :n].transpose(0, 1)[:, :, None])
            y = attention(q[0, :, :n].transpose(0, 1)[:, :, None], keys, values, self.rows_mask, False)
            out.append(y[:, :, 0].transpose(0, 1)[None])
        for cache, t, mask in zip(self.caches, self.lengths, self.masks):
            p, end = cache.length, start + t
            cache.k[layer, :, :, p: p + t] = k[:, :, start:end]
            cache.v[layer, :, :, p: p + t] = v[:, :, start:end]
            keys, values = cache.k[layer, :, :, : p + t], cache.v[layer, :, :, : p + t]
            out.append(attention(q[:, :, start:end], keys, values, mask, mask is None))
            start = end
        return out[0] if len(out) == 1 else torch.cat(out, dim=2)

    def advance(self) -> None:
        """Mark every segment's chunk as filled in its cache."""
        for cache, t in zip(self.caches, self.lengths):
            cache.length += t


# ---- norms and rotary positions --------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm(x) = x / sqrt(mean(x^2) + eps) * g (Zhang & Sennrich 2019), over the last dimension.

    As transformers computes it: in fp32, cast back to the input dtype before the weight multiply.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # PyTorch's fused kernel: the same bits in fp32 (tested), fewer operations; its backward compiled
            return rms_norm(x, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _norm(config: GPTConfig, dim: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.layer_norm_epsilon)
    return nn.LayerNorm(dim, eps=config.layer_norm_epsilon, bias=config.bias)


def _fused_norm(norm: nn.Module) -> Norm:
    """The norm as lmforge.kernels fuses it in front of the next projection (see GPT.row_step)."""
    if isinstance(norm, nn.LayerNorm):
        weight, bias, shape, eps = norm.weight, norm.bias, norm.normalized_shape, norm.eps
        return Norm("layernorm", weight, bias, eps, lambda x: F.layer_norm(x, shape, weight, bias, eps))
    return Norm("rmsnorm", norm.weight, None, norm.eps, norm.forward)


def rope_inverse_frequencies(config: GPTConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """theta_i = rope_theta^(-2i / D) for i < D/2, in fp32, with the config's rope_scaling applied
    exactly as transformers' modeling_rope_utils does ("linear": all divided by the factor;
    "llama3": low frequencies divided by the factor, high ones kept, a smooth blend between)."""
    D = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64, device=device).float() / D))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * theta_i for (B, T) positions, each (B, T, D) (the D/2 angles twice,
    for the half-split rotation), computed in fp32 and cast to the model's dtype as transformers does."""
    angles = position_ids[..., None].float() * inv_freq  # (B, T, D/2)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i+D/2}) by its position's angle: x cos + rotate_half(x) sin, with
    rotate_half(x) = [-x_2, x_1] (the half-split convention of Hugging Face's Llama)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ---- attention, MLP, block -------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: one fused projection [W^Q | W^K | W^V] (c_attn) and W^O
    (c_proj). With n_kv_head < n_head, each key/value head serves n_head / n_kv_head query heads
    (grouped-query attention; 1 key/value head: multi-query). Optional per-head RMSNorm of q and k
    (Qwen3) and rotary positions, applied to q and k before attention."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_heads, config.head_dim
        self.layer_idx = layer_idx
        width = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.c_attn = Linear(config.n_embd, width, bias=config.has_bias("qkv"))  # [W^Q | W^K | W^V]
        self.c_proj = Linear(self.n_head * self.head_dim, config.n_embd, bias=config.has_bias("proj"))  # W^O
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.layer_norm_epsilon)
            self.k_norm = RMSNorm(self.head_dim, config.layer_norm_epsilon)
        self.qk_norm = config.qk_norm
        self.window = config.sliding_window
        self.attn_pdrop = config.attn_pdrop
        self.resid_pdrop = config.resid_pdrop
        self.scale = 1.0 / math.sqrt(self.head_dim) if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= float(layer_idx + 1)
        self.impl: AttentionImpl = "sdpa"

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, kv_cache: KVCache | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.n_head
        qkv = self.c_attn(x)  # (B, T, (H + 2 KV) D)
        if self.qk_norm:
            q, k, v = self._split_heads(qkv, rope)
        else:  # the compiled single pass where it applies (lmforge.kernels.fused), else the same equations
            q, k, v = qkv_heads(qkv, H, self.n_kv_head, rope, self._split_heads)
        if isinstance(kv_cache, PackedKVCache):
            y = kv_cache.attend(self.layer_idx, q, k, v, self._attend)
        else:
            if kv_cache is not None:
                k, v = kv_cache.update(self.layer_idx, k, v)  # (B, KV, S, D)
            y = self._attend(q, k, v, mask, is_causal)
        y = y.transpose(1, 2).reshape(B, T, H * self.head_dim)  # Concat(head_1..head_h)
        return _dropout(self.c_proj(y), self.resid_pdrop, self.training)

    def _split_heads(
        self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[Q | K | V] (B, T, (H + 2 KV) D) -> q (B, H, T, D), k and v (B, KV, T, D), rotated, as views where
        possible: a decoded token pays for each operation about as much as for a kernel."""
        B, T, _ = qkv.shape
        qkv = qkv.view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            rope = rope[0][:, None], rope[1][:, None]  # (B, 1, T, D)
        return self._rotate(qkv, rope, dim=1)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
    ) -> torch.Tensor:
        """softmax(Q K^T * scale + mask) V, (B, H, T, D), by the fused kernel or the reference."""
        if self.impl == "sdpa":
            dropout = self.attn_pdrop if self.training else 0.0
            fused = partial(_sdpa, q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, scale=self.scale)
            if mask is None and is_causal and not dropout:  # whole sequences: the compiled kernel where it applies
                return causal_attention(q, k, v, self.scale, fused)
            return fused()
        H, KV = self.n_head, self.n_kv_head
        if KV != H:
            k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        if self.training and self.attn_pdrop > 0:
            raise NotImplementedError("attention dropout is only implemented in the sdpa path")
        return attention_reference(q, k, v, mask, is_causal, self.scale)

    def _rotate(
        self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, dim: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v from the projected heads (stacked along `dim` as [q | k | v]), with q/k norms and
        rotary positions applied. Without q/k norms, q and k are rotated as one tensor (fewer
        operations, which a decoded token pays for)."""
        H, KV = self.n_head, self.n_kv_head
        if self.qk_norm:
            q, k, v = qkv.split((H, KV, KV), dim=dim)
            q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            return q, k, v
        if rope is None:
            return qkv.split((H, KV, KV), dim=dim)
        qk, v = qkv.split((H + KV, KV), dim=dim)
        q, k = apply_rope(qk, *rope).split((H, KV), dim=dim)
        return q, k, v

    def row_step(self, kv_cache: KVCache, norm: nn.Module, x: torch.Tensor) -> RowStep:
        """rope -> x += MultiHead(norm(x)) for one token of one sequence (cache row 0) on the vector x
        (C,), the step's residual stream: the equations of forward with the fewest operations (see
        GPT.row_step), one query attending to the filled cache (its last `sliding_window` positions),
        y_h = softmax(q_h K_h^T * scale) V_h."""
        H, KV, D, window = self.n_head, self.n_kv_head, self.head_dim, self.window
        keys, values = kv_cache.k[self.layer_idx, 0], kv_cache.v[self.layer_idx, 0]  # (KV, max_length, D)
        qkv = torch.empty(H + 2 * KV, D, dtype=x.dtype, device=x.device)  # this layer's buffers, reused every step
        y = torch.empty(H * D, dtype=x.dtype, device=x.device)  # Concat(head_1..head_h)
        q, k, v = qkv.split((H, KV, KV))
        project = _row_linear(self.c_attn, norm=_fused_norm(norm)).plan(x, qkv.view(-1))
        attend = OneQueryAttention(keys, values, H, self.scale).plan(q, k, v, y.view(H, D))  # writes k, v at n
        output = _row_linear(self.c_proj).plan(y, x, residual=x)  # x += y W^O (+ b), in place
        qk_norm, rotate = self.qk_norm, self._rotate

        def step(rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
            n = kv_cache.length
            project()
            if rope is not None or qk_norm:  # q and k rewritten in place
                rotated_q, rotated_k, _ = rotate(qkv, rope, dim=0)
                q.copy_(rotated_q)
                k.copy_(rotated_k)
            attend(0 if window is None else max(0, n + 1 - window), n + 1)
            return output()

        return step


def _check_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """A clear error for an id past the embedding, rather than an IndexError from deep inside it. On
    the CPU only, where the check costs a few microseconds; on a GPU it would wait for the device
    (generate() checks prompts on every device)."""
    if input_ids.device.type != "cpu" or not input_ids.numel() or torch.compiler.is_compiling():
        return
    if input_ids.is_floating_point() or input_ids.is_complex():
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    low, high = torch.aminmax(input_ids)
    if low < 0 or high >= vocab_size:
        bad = int(low) if low < 0 else int(high)
        raise ValueError(f"input_ids holds token id {bad}, outside the model's vocabulary (vocab_size {vocab_size}: "
                         f"ids 0..{vocab_size - 1}); the ids come from another tokenizer or model")


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options: Any) -> torch.Tensor:
    """The fused kernel, with fewer key/value heads than query heads where there are."""
    if k.size(1) != q.size(1):
        options["enable_gqa"] = True
    return F.scaled_dot_product_attention(q, k, v, **options)


class Linear(nn.Linear):
    """nn.Linear whose inference on the CPU goes through lmforge.kernels.linear: the compiled kernel
    for a few rows (batched decoding streams each weight once for all rows), and fp32 arithmetic for
    many bf16 rows on CPUs whose bf16 GEMM has no hardware support (4-6x slower there: a bf16 prompt's
    prefill). Training, autograd, autocast, torch.compile, mixed dtypes and other devices take F.linear,
    as nn.Linear does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.is_cpu and x.dtype is self.weight.dtype and not torch.is_grad_enabled()
                and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
            return kernel_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


# A one-row step: (x[, rope]) -> x + sublayer(norm(x)) on vectors, built once per request.
RowStep = Callable[..., torch.Tensor]
# The layers the one-row step can run itself (a wrapped layer, e.g. a LoRA adapter, cannot).
ROW_LINEARS = (Linear, nn.Linear, Int8Linear)


def _row_linear(layer: nn.Module, norm: Norm | None = None, activation: Activation | None = None) -> Gemv:
    """(h, residual=None, out=None) -> act(layer(norm(h))) + residual for one (in,) vector, the layer's
    tensors checked once: lmforge.kernels' matrix-vector kernel, which streams each weight once, with the
    norm, bias, activation and residual applied in the same call (`out=residual`: in place), or plain
    torch where it does not apply."""
    if isinstance(layer, Int8Linear):
        return bind(layer.weight, layer.bias, layer.weight_scale, norm, activation)
    return bind(layer.weight, layer.bias, None, norm, activation)


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout where it changes something; elsewhere not even a call (a decode step would pay for it)."""
    return F.dropout(x, p, training=True) if training and p > 0 else x


def _activation(name: str) -> nn.Module:
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return nn.GELU(approximate="tanh")  # GPT-2's GELU: 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3)))
    if name == "gelu":
        return nn.GELU()
    if name == "relu":
        return nn.ReLU()
    return nn.SiLU()  # "silu" / "swish"; GPTConfig has validated the name


class MLP(nn.Module):
    """The position-wise feed-forward layer: c_proj(act(c_fc x)), or gated (SwiGLU with silu,
    Shazeer 2020): down(act(gate x) * up x), gate and up fused in c_fc as [W_gate | W_up]."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.gated = config.mlp == "gated"
        inner, bias = config.inner_dim, config.has_bias("mlp")
        self.c_fc = Linear(config.n_embd, 2 * inner if self.gated else inner, bias=bias)
        self.act = _activation(config.activation)
        self.c_proj = Linear(inner, config.n_embd, bias=bias)
        self.resid_pdrop = config.resid_pdrop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if not self.gated:
            h = self.act(h)
        elif isinstance(self.act, nn.SiLU):  # SwiGLU: the compiled single pass where it applies
            h = swiglu(h, self._gate)
        else:
            h = self._gate(h)
        return _dropout(self.c_proj(h), self.resid_pdrop, self.training)

    def _gate(self, h: torch.Tensor) -> torch.Tensor:
        """act(gate) * up for h = [gate | up]."""
        gate, up = h.chunk(2, dim=-1)
        return self.act(gate) * up

    def row_step(self, norm: nn.Module, x: torch.Tensor) -> RowStep:
        """() -> x += MLP(norm(x)) on the (C,) vector x (see GPT.row_step)."""
        act, gated = self.act.forward, self.gated
        # GPT-2's GELU runs inside the kernel, on each tile of c_fc's output as it is written
        fused = not gated and isinstance(self.act, nn.GELU) and self.act.approximate == "tanh"
        fc = _row_linear(self.c_fc, _fused_norm(norm), Activation("gelu_tanh", act) if fused else None)
        h = torch.empty(self.c_fc.out_features, dtype=x.dtype, device=x.device)  # reused every step
        a = h if fused else torch.empty(self.c_proj.in_features, dtype=x.dtype, device=x.device)  # act(h)
        expand, project = fc.plan(x, h), _row_linear(self.c_proj).plan(a, x, residual=x)
        gate, up = h.chunk(2) if gated else (h, None)

        def step() -> torch.Tensor:
            expand()
            if gated:
                torch.mul(act(gate), up, out=a)
            elif not fused:
                a.copy_(act(h))
            return project()

        return step


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = _norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = _norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, kv_cache: KVCache | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, is_causal, kv_cache, rope)
        return x + self.mlp(self.ln_2(x))

    def row_step(self, kv_cache: KVCache, x: torch.Tensor) -> Callable[..., torch.Tensor]:
        """rope -> the block's output for one token of one sequence, written over the vector x (see
        GPT.row_step)."""
        attn, mlp = self.attn.row_step(kv_cache, self.ln_1, x), self.mlp.row_step(self.ln_2, x)

        def step(rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
            attn(rope)
            return mlp()

        return step

    def supports_row_step(self) -> bool:
        """The one-row step reads the projections' weights itself: plain or int8 linear layers only (a
        wrapped layer, e.g. a LoRA adapter, runs its own forward through the batched path)."""
        layers = (self.attn.c_attn, self.attn.c_proj, self.mlp.c_fc, self.mlp.c_proj)
        return all(type(layer) in ROW_LINEARS for layer in layers)


# ---- the model -------------------------------------------------------------------------------


@dataclass
class CausalLMOutput:
    """What GPT.forward returns: logits (B, T, vocab), the loss when targets were given, the cache used."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    kv_cache: KVCache | None = None


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean token cross-entropy, -1/N sum_t log P(w_t | w_<t); targets are already shifted
    (targets[:, t] is the token that follows input t) and `ignore_index` positions do not count."""
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=ignore_index
    )


class GPT(nn.Module):
    """A decoder-only Transformer with a language-modelling head: GPT-2 or a Llama-family model."""

    def __init__(self, config: GPTConfig, attn_impl: AttentionImpl = "sdpa") -> None:
        super().__init__()
        self.config = config
        body = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.positions == "learned":
            body["wpe"] = nn.Embedding(config.n_positions, config.n_embd)
        body.update(h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)), ln_f=_norm(config, config.n_embd))
        self.transformer = nn.ModuleDict(body)
        self._inv_freq: dict[torch.device, torch.Tensor] = {}  # rotary frequencies per device, made on first use
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.gradient_checkpointing = False
        self.set_attention(attn_impl)
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer): two residual adds per block.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=config.initializer_range / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPT":
        """A randomly initialised model of a named preset ("gpt2", "gpt2-medium", "tiny", ...)."""
        return cls(preset(name, **overrides))

    def set_attention(self, impl: AttentionImpl) -> None:
        """Switch every layer between the fused SDPA kernel and the reference equation."""
        if impl not in ("sdpa", "reference"):
            raise ValueError(f"attn_impl must be 'sdpa' or 'reference', got {impl!r}")
        for block in self.transformer.h:
            block.attn.impl = impl

    def optimize_for_decoding(self) -> "GPT":
        """Lay the weight matrices out for the CPU's matrix-vector kernels, and return self.

        Decoding reads every weight once per token, so the layout the kernel streams fastest decides
        the speed. With lmforge.kernels (built on first use): row-major, each output's weights one
        contiguous run, in every dtype. Without them (no compiler, LMFORGE_KERNELS=0), PyTorch's:
        float32 (MKL) column-major ((in, out) in memory, GPT-2's Conv1D layout) ~8% faster per batch-1
        step than row-major, bfloat16 row-major ~2x faster than column-major (2-core Xeon,
        benchmarks/generate.py). Values, shapes, ties and memory are unchanged and training still
        works. A no-op on other devices and dtypes.
        """
        if self.device.type != "cpu" or self.dtype not in (torch.float32, torch.bfloat16):
            return self
        column_major = self.dtype == torch.float32 and not kernels_available()
        with torch.no_grad():
            done: set[int] = set()
            for module in self.modules():
                if isinstance(module, nn.Linear) and id(module.weight) not in done:
                    done.add(id(module.weight))  # the tied LM head is the embedding: lay it out once
                    w = module.weight.data
                    module.weight.data = w.t().contiguous().t() if column_major else w.contiguous()
        return self

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Distinct parameters (a tied LM head counts once, as in transformers; a quantized layer's int8
        weight and bias count as the float ones they replace, so quantizing changes nothing here)."""
        n = sum(p.numel() for p in self.parameters())
        for name, m in self.named_modules():
            if isinstance(m, Int8Linear) and not (name == "lm_head" and self.config.tie_word_embeddings):
                n += m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
        if exclude_embeddings:
            n -= sum(e.weight.numel() for name, e in self.transformer.items() if name in ("wte", "wpe"))
        return n

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.wte.weight.dtype

    def forward_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """The final-LayerNorm hidden states (B, T, C): the body without the LM head.

        attention_mask: (B, S) with 1 for real tokens, 0 for padding, covering the cached positions
        too (S = cache length + T). position_ids: (B, T); default past..past+T-1 as in GPT-2, so
        left-padded batches pass positions computed from the mask. A kv_cache is read and extended.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if kv_cache is not None and kv_cache.batch_size != B:
            raise ValueError(f"the KV cache holds {kv_cache.batch_size} rows but input_ids has {B}; a cache serves the "
                             f"batch it was made for (model.new_kv_cache({B}) makes one for this batch)")
        _check_ids(input_ids, self.config.vocab_size)
        if past + T > self.config.n_positions:
            raise ValueError(
                f"sequence length {past + T} exceeds the model's context n_positions={self.config.n_positions}"
            )
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).unsqueeze(0)
        mask, is_causal = self._attention_mask(attention_mask, B, T, past, input_ids.device)
        hidden = self.forward_blocks(input_ids, position_ids, mask, is_causal, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        return hidden

    def forward_blocks(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
        kv_cache: KVCache | None,
    ) -> torch.Tensor:
        """Embeddings, blocks and final LayerNorm on prepared inputs: (B, T) ids and positions, a
        boolean mask broadcastable to (B, H, T, S) (or None, with is_causal), any object with
        KVCache.update, or a PackedKVCache (mask None). No checks and no Python numbers that change
        between decode steps, so torch.compile captures it once (generation's static-shape step calls
        it directly)."""
        x = self.transformer.wte(input_ids)
        rope = None
        if self.config.positions == "learned":
            x = x + self.transformer.wpe(position_ids)
        else:
            rope = rope_cos_sin(self.rope_frequencies(x.device), position_ids, x.dtype)
        x = _dropout(x, self.config.embd_pdrop, self.training)
        for block in self.transformer.h:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, mask, is_causal, kv_cache, rope, use_reentrant=False)
            else:
                x = block(x, mask, is_causal, kv_cache, rope)
        return self.transformer.ln_f(x)

    def rope_frequencies(self, device: torch.device) -> torch.Tensor:
        """The rotary inverse frequencies (D/2,) in fp32 on `device`, computed once per device (not a
        buffer: a model built on the meta device and then loaded needs no special care)."""
        if device not in self._inv_freq:
            self._inv_freq[device] = rope_inverse_frequencies(self.config, device)
        return self._inv_freq[device]

    def row_step(self, kv_cache: KVCache) -> Callable[[torch.Tensor], torch.Tensor]:
        """The decode step of one unpadded sequence over row 0 of `kv_cache`, built once per request:
        token (shape (1,)) at position kv_cache.length -> next-token logits (vocab,) in the model's
        dtype, its keys/values written and the cache advanced.

        Batch-1 decoding is bound by reading every weight once per token, and each small operation
        besides the matrix-vector products costs far more than its arithmetic (dispatch, Python,
        caches just flushed by megabytes of streamed weights). So each module also states its
        equations on (C,) vectors with the fewest operations: no batch or time dimension, biases and
        residuals added inside the products (lmforge.kernels' matrix-vector kernels, which stream each
        weight once), its tensors looked up once here rather than per step.
        Equal to forward up to float rounding (tested); use it where supports_row_decoding() says so.
        """
        t, n_positions = self.transformer, self.config.n_positions
        wte, head = t.wte.weight, _row_linear(self.lm_head, _fused_norm(t.ln_f))
        # The residual stream: one vector that every block rewrites in place; each layer's own vectors are
        # buffers too, so the kernels' calls are planned once here (lmforge.kernels.Gemv.plan).
        x = torch.empty(self.config.n_embd, dtype=wte.dtype, device=wte.device)
        blocks = [block.row_step(kv_cache, x) for block in t.h]
        wpe = t.wpe.weight if self.config.positions == "learned" else None
        inv_freq = None if wpe is not None else self.rope_frequencies(wte.device)

        def step(token: torch.Tensor) -> torch.Tensor:
            n = kv_cache.length
            if n >= kv_cache.max_length:
                raise ValueError(f"KV cache is full: {n + 1} positions needed, {kv_cache.max_length} allocated")
            if n >= n_positions:
                raise ValueError(f"sequence length {n + 1} exceeds the model's context n_positions={n_positions}")
            rope = None
            if wpe is not None:
                torch.add(wte[token].view(-1), wpe[n], out=x)
            else:
                x.copy_(wte[token].view(-1))
                position = torch.full((1, 1), n, device=x.device)
                rope = tuple(t.view(-1) for t in rope_cos_sin(inv_freq, position, x.dtype))
            for block in blocks:
                block(rope)
            kv_cache.advance(1)
            return head(x)

        return step

    def supports_row_decoding(self) -> bool:
        """Whether row_step applies: in eval mode (dropout lives in the batched path) with plain
        projections (a wrapped layer, e.g. a LoRA adapter, runs its own forward there)."""
        return (not self.training and type(self.lm_head) in ROW_LINEARS
                and all(block.supports_row_step() for block in self.transformer.h))

    def new_kv_cache(self, batch_size: int, max_length: int | None = None, zeroed: bool = True) -> KVCache:
        """An empty KV cache for `batch_size` sequences of up to `max_length` positions (default: the context);
        zeroed=False leaves its memory uninitialised (faster, for a cache written before it is read)."""
        return KVCache.for_model(self, batch_size, max_length, zeroed)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> CausalLMOutput:
        """Logits (B, T, vocab) for every position; with targets, also the mean cross-entropy."""
        hidden = self.forward_hidden(input_ids, attention_mask, position_ids, kv_cache)
        logits = self.lm_head(hidden)
        loss = lm_loss(logits, targets) if targets is not None else None
        return CausalLMOutput(logits=logits, loss=loss, kv_cache=kv_cache)

    def _attention_mask(
        self, attention_mask: torch.Tensor | None, B: int, T: int, past: int, device: torch.device,
    ) -> tuple[torch.Tensor | None, bool]:
        """A boolean (B, 1, T, S) mask (True = may attend), or None with is_causal for the fast path.
        With a sliding window, a query sees only the last `sliding_window` positions (itself included)."""
        S = past + T
        window = self.config.sliding_window
        windowed = window is not None and S > window
        if attention_mask is None and not windowed:
            if past == 0:
                return None, T > 1
            if T == 1:
                return None, False  # one new token sees the whole cache
        elif attention_mask is not None and attention_mask.shape != (B, S):
            raise ValueError(
                f"attention_mask must be (batch, cache_length + seq_len) = {(B, S)}, got {tuple(attention_mask.shape)}"
            )
        q_pos = torch.arange(past, S, device=device)[:, None]
        k_pos = torch.arange(S, device=device)[None, :]
        causal = k_pos <= q_pos  # (T, S)
        if windowed:
            causal = causal & (k_pos > q_pos - window)
        if attention_mask is None:
            return causal[None, None], False
        # A query with no key to attend to (left padding, a row that is all padding) gets zeros from
        # attention, as in transformers: torch's kernels give 0 there (from 2.5), not the 0/0 of a plain
        # softmax. Before 2.5 they give NaN, so such a query sees itself instead (real tokens unchanged).
        mask = causal[None, None] & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        return (mask if _SDPA_ZEROS_EMPTY_ROWS else mask | (k_pos == q_pos)[None, None]), False

    @classmethod
    def from_pretrained(
        cls, path_or_name: str | os.PathLike, dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = "auto", revision: str | None = None, quantize: str | None = None,
    ) -> "GPT":
        """Load a checkpoint (also `lmforge.load_model`): a local directory or a Hugging Face Hub name
        such as "gpt2". dtype: None keeps the checkpoint's dtype; "bf16", "fp16", "fp32" (or torch
        dtypes) convert. device: "auto" picks cuda, then mps, then cpu. quantize: "int8" quantizes the
        weights after loading (see quantize); a quantized checkpoint loads quantized anyway. Raises
        CheckpointError naming the file or tensor when something does not fit."""
        return load_pretrained(cls, path_or_name, dtype=dtype, device=device, revision=revision, quantize=quantize)

    def quantize(self, mode: str = "int8") -> "GPT":
        """Weight-only quantization in place, for inference, and return self: every linear layer (the LM
        head included, a tied one as its own copy) becomes int8 with one fp32 scale per output channel;
        the embedding, norms and activations stay in the model's dtype. See lmforge.quantize."""
        return quantize_model(self, mode)

    def generate(self, input_ids, attention_mask=None, generation_config=None, **options):
        """Continue prompts (greedy, sampling, beam search); see lmforge.generation.generate."""
        return generate_tokens(self, input_ids, attention_mask, generation_config, **options)

    def load_weights(self, directory: str | os.PathLike) -> None:
        """Copy the weights saved in `directory` into this model in place (used to resume training)."""
        copy_weights_from(self, directory)

    def save_pretrained(self, directory: str | os.PathLike, max_shard_size: int | str | None = None,
                        tokenizer: Any = None) -> None:
        """Write config.json + model.safetensors that transformers and lmforge both load."""
        save_checkpoint(self, directory, max_shard_size=max_shard_size, tokenizer=tokenizer)


# lmforge.load_model(path_or_name, dtype=None, device="auto", revision=None, quantize=None) -> GPT
load_model = GPT.from_pretrained
