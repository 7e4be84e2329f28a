"""The GPT-2 Transformer, written from the equations.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V
    MultiHead(X)       = Concat(head_1, ..., head_h) W^O,   head_i = Attention(X W_i^Q, X W_i^K, X W_i^V)

A block is pre-LayerNorm: x = x + Attn(LN_1(x)); x = x + MLP(LN_2(x)). Parameter names follow
GPT-2's (transformer.h.0.attn.c_attn, ...) so Hugging Face weights load with four transposes.
Shapes: B batch, T query length, S key length (cache + new), H heads, D head_dim, C = H * D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.config import GPTConfig, preset

AttentionImpl = Literal["sdpa", "reference"]


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
    return weights @ v  # (B, H, T, D)


class KVCache:
    """Preallocated keys and values of every layer: (n_layer, B, H, max_length, D).

    Decoding writes each step's keys/values in place, so neither the prompt nor the cache is
    recomputed or reallocated per step. `length` counts the positions filled so far.
    """

    def __init__(
        self, n_layer: int, batch_size: int, n_head: int, max_length: int, head_dim: int,
        *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_layer, batch_size, n_head, max_length, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @classmethod
    def for_model(cls, model: "GPT", batch_size: int, max_length: int | None = None) -> "KVCache":
        """A cache sized for `batch_size` sequences of up to `max_length` (default: the context)."""
        cfg = model.config
        max_length = cfg.n_positions if max_length is None else max_length
        if not 0 < max_length <= cfg.n_positions:
            raise ValueError(f"KV cache max_length must be in 1..{cfg.n_positions} (n_positions), got {max_length}")
        p = model.transformer.wte.weight
        return cls(cfg.n_layer, batch_size, cfg.n_head, max_length, cfg.head_dim, dtype=p.dtype, device=p.device)

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


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with GPT-2's fused Q, K, V projection (c_attn) and W^O (c_proj)."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.layer_idx = layer_idx
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # [W^Q | W^K | W^V]
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)  # W^O
        self.attn_dropout = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        self.scale = 1.0 / math.sqrt(self.head_dim) if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= float(layer_idx + 1)
        self.impl: AttentionImpl = "sdpa"

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, kv_cache: KVCache | None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, H, S, D)
        if self.impl == "sdpa":
            dropout = self.attn_dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, scale=self.scale
            )
        else:
            y = attention_reference(q, k, v, mask, is_causal, self.scale)
            if self.training and self.attn_dropout > 0:
                raise NotImplementedError("attention dropout is only implemented in the sdpa path")
        y = y.transpose(1, 2).reshape(B, T, C)  # Concat(head_1..head_h)
        return self.resid_dropout(self.c_proj(y))


def _activation(name: str) -> nn.Module:
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return nn.GELU(approximate="tanh")  # GPT-2's GELU: 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3)))
    if name == "gelu":
        return nn.GELU()
    if name == "relu":
        return nn.ReLU()
    return nn.SiLU()  # "silu" / "swish"; GPTConfig has validated the name


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.inner_dim, bias=config.bias)
        self.act = _activation(config.activation)
        self.c_proj = nn.Linear(config.inner_dim, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, kv_cache: KVCache | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, is_causal, kv_cache)
        return x + self.mlp(self.ln_2(x))


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
    """A GPT-2 family decoder-only Transformer with a language-modelling head."""

    def __init__(self, config: GPTConfig, attn_impl: AttentionImpl = "sdpa") -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.n_positions, config.n_embd),
                drop=nn.Dropout(config.embd_pdrop),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
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
        the speed. float32 (MKL): column-major ((in, out) in memory, GPT-2's Conv1D layout; load_model
        already gives that for the blocks, this adds the tied LM head): ~8% per batch-1 step and ~14%
        at batch 8. bfloat16: row-major, about twice as fast per batch-1 step as column-major.
        (2-core Xeon, benchmarks/generate.py.) Values, shapes, ties and memory are unchanged and
        training still works. A no-op on other devices and dtypes.
        """
        if self.device.type != "cpu" or self.dtype not in (torch.float32, torch.bfloat16):
            return self
        column_major = self.dtype == torch.float32
        with torch.no_grad():
            done: set[int] = set()
            for module in self.modules():
                if isinstance(module, nn.Linear) and id(module.weight) not in done:
                    done.add(id(module.weight))  # the tied LM head is the embedding: lay it out once
                    w = module.weight.data
                    module.weight.data = w.t().contiguous().t() if column_major else w.contiguous()
        return self

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Distinct parameters (a tied LM head counts once, as in transformers)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.transformer.wpe.weight.numel() + self.transformer.wte.weight.numel()
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
        if past + T > self.config.n_positions:
            raise ValueError(
                f"sequence length {past + T} exceeds the model's context n_positions={self.config.n_positions}"
            )
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).unsqueeze(0)
        mask, is_causal = self._attention_mask(attention_mask, B, T, past, input_ids.device)

        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(position_ids))
        for block in self.transformer.h:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, mask, is_causal, kv_cache, use_reentrant=False)
            else:
                x = block(x, mask, is_causal, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.transformer.ln_f(x)

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

    @staticmethod
    def _attention_mask(
        attention_mask: torch.Tensor | None, B: int, T: int, past: int, device: torch.device,
    ) -> tuple[torch.Tensor | None, bool]:
        """A boolean (B, 1, T, S) mask (True = may attend), or None with is_causal for the fast path."""
        S = past + T
        if attention_mask is None:
            if past == 0:
                return None, T > 1
            if T == 1:
                return None, False  # one new token sees the whole cache
        elif attention_mask.shape != (B, S):
            raise ValueError(
                f"attention_mask must be (batch, cache_length + seq_len) = {(B, S)}, got {tuple(attention_mask.shape)}"
            )
        q_pos = torch.arange(past, S, device=device)
        causal = torch.arange(S, device=device)[None, :] <= q_pos[:, None]  # (T, S)
        if attention_mask is None:
            return causal[None, None], False
        mask = causal[None, None] & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        # A padding query would attend to nothing (softmax of all -inf = NaN); let it see itself.
        # Real tokens always see themselves already, so their outputs are unchanged.
        own = torch.arange(S, device=device)[None, :] == q_pos[:, None]
        return mask | own[None, None], False

    def generate(self, input_ids, attention_mask=None, generation_config=None, **options):
        """Continue prompts (greedy, sampling, beam search); see lmforge.generation.generate."""
        from lmforge.generation.decode import generate  # generation builds on the model, not the reverse

        return generate(self, input_ids, attention_mask, generation_config, **options)

    def load_weights(self, directory) -> None:
        """Copy the weights saved in `directory` into this model in place (used to resume training)."""
        from lmforge.checkpoint import load_weights

        load_weights(self, directory)

    def save_pretrained(self, directory, max_shard_size: int | str | None = None, tokenizer=None) -> None:
        """Write config.json + model.safetensors that transformers and lmforge both load."""
        from lmforge.checkpoint import save_pretrained  # checkpoint builds on the model, not the reverse

        save_pretrained(self, directory, max_shard_size=max_shard_size, tokenizer=tokenizer)
