"""One decode step of a single sequence, written on vectors.

Batch-1 decoding is bound by reading the weights once per token: the matrix-vector products take
most of the step. What is left is ~12 small operations a layer, and each costs far more than its
arithmetic (dispatch, Python, and caches just flushed by megabytes of streamed weights). So this
step does the arithmetic of GPT.forward_hidden for one token with as few operations as it can: on
vectors of shape (C,), no batch or time dimension, biases inside the matrix-vector products
(addmv), the layer's tensors looked up once per request rather than per step, and the one query
attending to the filled part of the cache through the fused kernel:

    y_h = softmax(q_h K_h^T * scale) V_h       (per head h)

Equal to the batched step up to float rounding (tested); generation.decode.Forward uses it for one
unpadded sequence of a model in eval mode.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model import GPT, Block, KVCache


class _Layer(NamedTuple):
    """The tensors of one block that a step reads, and this layer's slice of the cache (row 0)."""

    ln_1_weight: torch.Tensor
    ln_1_bias: torch.Tensor | None
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor
    out_weight: torch.Tensor
    out_bias: torch.Tensor
    scale: float
    ln_2_weight: torch.Tensor
    ln_2_bias: torch.Tensor | None
    fc_weight: torch.Tensor
    fc_bias: torch.Tensor
    act: Callable[[torch.Tensor], torch.Tensor]
    proj_weight: torch.Tensor
    proj_bias: torch.Tensor
    keys: torch.Tensor  # (H, max_length, D)
    values: torch.Tensor

    @classmethod
    def of(cls, block: Block, cache: KVCache, index: int) -> "_Layer":
        attn, mlp = block.attn, block.mlp
        return cls(
            block.ln_1.weight, block.ln_1.bias, attn.c_attn.weight, _bias(attn.c_attn),
            attn.c_proj.weight, _bias(attn.c_proj), attn.scale,
            block.ln_2.weight, block.ln_2.bias, mlp.c_fc.weight, _bias(mlp.c_fc), mlp.act.forward,
            mlp.c_proj.weight, _bias(mlp.c_proj), cache.k[index, 0], cache.v[index, 0],
        )


def _bias(layer: nn.Linear) -> torch.Tensor:
    """The layer's bias, or zeros for a bias-free model (nanoGPT's bias=False), so addmv always applies."""
    if layer.bias is not None:
        return layer.bias
    return layer.weight.new_zeros(layer.out_features)


class RowStep:
    """Decode steps of one sequence over row 0 of `cache`; built once per request."""

    @staticmethod
    def supports(model: GPT) -> bool:
        """Plain projections only: a wrapped layer (a LoRA adapter, ...) runs its own forward, so
        such a model decodes through the batched step."""
        return all(
            type(layer) is nn.Linear
            for block in model.transformer.h
            for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)
        ) and type(model.lm_head) is nn.Linear

    def __init__(self, model: GPT, cache: KVCache) -> None:
        self.model, self.cache = model, cache
        self.layers = [_Layer.of(block, cache, i) for i, block in enumerate(model.transformer.h)]

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token (shape (1,)) at position cache.length; write its keys/values, advance the
        cache, and return the next-token logits (vocab,) in the model's dtype."""
        model, cache = self.model, self.cache
        cfg, t = model.config, model.transformer
        n = cache.length
        if n >= cache.max_length:
            raise ValueError(f"KV cache is full: {n + 1} positions needed, {cache.max_length} allocated")
        if n >= cfg.n_positions:
            raise ValueError(f"sequence length {n + 1} exceeds the model's context n_positions={cfg.n_positions}")
        H, D, C = cfg.n_head, cfg.head_dim, cfg.n_embd
        eps = cfg.layer_norm_epsilon
        x = (t.wte.weight[token] + t.wpe.weight[n]).view(C)
        for (ln_1_w, ln_1_b, qkv_w, qkv_b, out_w, out_b, scale, ln_2_w, ln_2_b,
             fc_w, fc_b, act, proj_w, proj_b, keys, values) in self.layers:
            h = F.layer_norm(x, (C,), ln_1_w, ln_1_b, eps)
            q, k, v = torch.addmv(qkv_b, qkv_w, h).view(3, H, D)  # each (H, D)
            keys[:, n] = k
            values[:, n] = v
            # The fused kernel for the one query (a hand-written bmm/softmax/bmm is no faster here,
            # and in bf16 oneDNN would build and keep a kernel for every new cache length).
            y = F.scaled_dot_product_attention(
                q.view(1, H, 1, D), keys[None, :, : n + 1], values[None, :, : n + 1], scale=scale
            ).view(C)  # Concat(head_1..head_h)
            # x + W^O y + b: x is this step's own buffer, so adding the bias in place is safe.
            x = torch.addmv(x.add_(out_b), out_w, y)
            h = F.layer_norm(x, (C,), ln_2_w, ln_2_b, eps)
            x = torch.addmv(x.add_(proj_b), proj_w, act(torch.addmv(fc_b, fc_w, h)))
        cache.advance(1)
        x = F.layer_norm(x, (C,), t.ln_f.weight, t.ln_f.bias, eps)
        return torch.mv(model.lm_head.weight, x)  # the LM head has no bias
