"""The model's forward passes as decoding uses them: prefill, then one token per row per step.

All of them run the model's own forward (model.py); this module only chooses which entry point and
keeps the per-request state: the KV cache, the attention mask and the position ids of left-padded
batches, each allocated once and updated in place. Only the last position goes through the LM head.

Modes: "dynamic" runs model.forward_hidden over the filled part of the cache, or model.row_step
(the same equations on vectors) for one unpadded sequence where the model supports it. "static" is a
step whose tensors never change shape: the cache is written at a tensor index and read whole, the
unwritten slots masked out. "compiled" is that step under torch.compile with CUDA graphs, as in
gpt-fast. The model is any object with GPT's interface (generation does not import model.py).
"""

from __future__ import annotations

import weakref
from typing import Any, Literal

import torch

StepMode = Literal["dynamic", "static", "compiled"]


def left_padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: each row counts from 0 at its first real token."""
    return (mask.cumsum(dim=-1) - 1).masked_fill(mask == 0, 0)


class Forward:
    """Prefill and one-token decode steps over a request's KV cache; logits of the last position only."""

    def __init__(
        self, model: Any, batch_size: int, max_length: int, mask: torch.Tensor | None, mode: StepMode = "dynamic",
    ) -> None:
        self.model = model
        # The last token is never fed back, so the cache needs one position fewer than the output.
        cache_length = max(1, max_length - 1)
        static = mode != "dynamic"
        self.mask: torch.Tensor | None = None
        if mode == "compiled":
            self.cache, self.mask = _compiled_buffers(model, batch_size, cache_length)
        else:
            self.cache = model.new_kv_cache(batch_size, cache_length)
            if mask is not None or static:
                self.mask = torch.ones(batch_size, cache_length, dtype=torch.bool, device=model.device)
        if mask is not None:
            self.mask[:, : mask.size(1)] = mask.bool()
        self.next_position: torch.Tensor | None = None
        self.static = _StaticStep(model, self.cache, self.mask, compile=mode == "compiled") if static else None
        single_row = mode == "dynamic" and batch_size == 1 and mask is None and model.supports_row_decoding()
        self.row_step = model.row_step(self.cache) if single_row else None

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        positions = None if mask is None else left_padded_positions(mask)
        hidden = self.model.forward_hidden(ids, mask, positions, self.cache)
        if positions is not None:
            self.next_position = positions[:, -1:] + 1
        elif self.static is not None:
            self.next_position = torch.full((ids.size(0), 1), ids.size(1), dtype=torch.long, device=ids.device)
        if self.static is not None:
            self.mask[:, ids.size(1):] = False  # the static step reads the whole cache: hide unwritten slots
        return self.model.lm_head(hidden[:, -1]).float()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,); return the next logits (B, vocab) in float32."""
        positions = self.next_position
        if self.row_step is not None:
            logits = self.row_step(tokens).float()[None]
        elif self.static is not None:
            logits = self.static(tokens, positions)
        else:
            mask = None if self.mask is None else self.mask[:, : self.cache.length + 1]
            hidden = self.model.forward_hidden(tokens[:, None], mask, positions, self.cache)
            logits = self.model.lm_head(hidden[:, -1]).float()
        if positions is not None:
            positions.add_(1)
        return logits

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the rows of the surviving beams (cache, positions, mask), in place."""
        self.cache.reorder(index)
        for state in (self.next_position, self.mask):
            if state is not None:
                state.copy_(state.index_select(0, index))


class _CacheSlots:
    """The KV cache as the static step sees it: each layer writes at a tensor index and reads every
    slot, so nothing changes shape or Python value between steps."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, write_at: torch.Tensor) -> None:
        self.k, self.v, self.write_at = k, v, write_at

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[layer].index_copy_(2, self.write_at, k)
        self.v[layer].index_copy_(2, self.write_at, v)
        return self.k[layer], self.v[layer]


def _static_step(
    model: Any, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
    tokens: torch.Tensor, positions: torch.Tensor, write_at: torch.Tensor,
) -> torch.Tensor:
    """The model's forward for one token per row over the whole cache (see _StaticStep)."""
    attend = valid[:, None, None, :]  # (B, 1, 1, S): the written slots
    window = model.config.sliding_window
    if window is not None:  # and only the last `window` of them
        attend = attend & (torch.arange(valid.size(1), device=valid.device) > write_at - window)
    hidden = model.forward_blocks(tokens, positions, attend, False, _CacheSlots(k, v, write_at))
    return model.lm_head(hidden[:, -1]).float()


class _StaticStep:
    """A decode step whose tensors never change shape, so torch.compile captures it once. Equal to
    the dynamic step up to float rounding (tested; the compiled form is untested on GPU)."""

    def __init__(self, model: Any, cache: Any, valid: torch.Tensor, compile: bool) -> None:
        global _compiled_step
        self.model, self.cache, self.valid = model, cache, valid
        self.fn = _static_step
        if compile:
            if _compiled_step is None:
                _compiled_step = torch.compile(_static_step, mode="reduce-overhead", fullgraph=True)
            self.fn = _compiled_step

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        index = self.cache.length
        self.valid[:, index] = True
        write_at = torch.tensor([index], device=tokens.device)
        logits = self.fn(self.model, self.cache.k, self.cache.v, self.valid, tokens[:, None], positions, write_at)
        self.cache.advance(1)
        return logits.clone()  # a CUDA graph overwrites its output on the next replay


# compile=True: one compiled step function, and per model and shape one set of cache and mask
# buffers kept across calls. CUDA graphs replay on fixed addresses, so fresh buffers per request
# would mean a recompile per request. Cache lengths are rounded up to a bucket to bound the shapes.
# Hence two compiled generations of the same model and shape must not be interleaved (two streams).
_compiled_step: Any = None
_compiled_cache: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_COMPILED_BUCKET = 256


def _compiled_buffers(model: Any, batch_size: int, length: int) -> tuple[Any, torch.Tensor]:
    length = min(model.config.n_positions, -(-length // _COMPILED_BUCKET) * _COMPILED_BUCKET)
    buffers = _compiled_cache.setdefault(model, {})
    key = (batch_size, length, model.dtype, model.device)
    if key not in buffers:
        cache = model.new_kv_cache(batch_size, length)
        valid = torch.ones(batch_size, length, dtype=torch.bool, device=model.device)
        for buffer in (cache.k, cache.v, valid):  # updated in place: CUDA graphs must not copy them
            torch._dynamo.mark_static_address(buffer)
        buffers[key] = (cache, valid)
    cache, valid = buffers[key]
    cache.reset()
    valid.fill_(True)
    return cache, valid
