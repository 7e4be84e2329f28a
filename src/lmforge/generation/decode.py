"""Decoding over a preallocated KV cache: request checks, forward passes, greedy and sampling loops.

One prefill pass runs the whole (left-padded) prompt; after that each step feeds one token per row.
The cache, the output id buffer and the attention mask are allocated once, sized from the request
(batch x max length), and written in place. Only the last position goes through the LM head.
Results are token-identical to transformers' `generate` for the same weights and options.
Beam search (beam.py) reuses the request checks and forward passes defined here.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F

from lmforge.generation.config import DEFAULT_MAX_NEW_TOKENS, GenerationConfig, check_option_names
from lmforge.generation.row_step import RowStep
from lmforge.generation.sampling import greedy_token, make_logits_processor, sample_token
from lmforge.model import GPT, KVCache

@dataclass
class GenerationOutput:
    """What generate returns with return_dict_in_generate=True.

    sequences: (B * n, prompt + new) ids, prompt included, finished rows padded with pad_token_id.
    scores: per step, the processed scores (B * n, vocab) the token was chosen from (output_scores);
        for beam search, the processed log-probs of every running beam, as in transformers.
    logits: per step, the raw logits (output_logits).
    token_logprobs: (B * n, new) log-probability of each chosen token under the processed
        distribution (greedy and sampling, with output_scores).
    sequences_scores: (B * n,) length-penalised beam scores (beam search, with output_scores).
    """

    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    token_logprobs: torch.Tensor | None = None
    sequences_scores: torch.Tensor | None = None


@dataclass
class DecodeStep:
    """One step of greedy/sampling decoding: the token each row got, and which rows are done after it."""

    index: int  # 0 for the first new token
    tokens: torch.Tensor  # (B,) (pad_token_id for rows that had already finished)
    finished: torch.Tensor  # (B,) bool


@dataclass
class Request:
    """A validated, expanded prompt and the lengths and special ids that decoding needs."""

    input_ids: torch.Tensor  # (B * expand, L), long, on the model's device
    attention_mask: torch.Tensor | None  # (B * expand, L) or None when there is no padding
    max_length: int  # prompt + new tokens, <= n_positions
    eos: list[int] | None
    pad: int
    batch_size: int  # before expansion


def resolve_config(
    model: GPT, generation_config: GenerationConfig | None = None, **options: Any,
) -> GenerationConfig:
    """The effective config: `generation_config` (or the defaults) with `options` applied on top,
    and eos/pad/bos filled in from the model's config where the user left them unset."""
    check_option_names(options)
    base = generation_config if generation_config is not None else GenerationConfig()
    config = base.replace(**options) if options else base.replace()
    fill: dict[str, Any] = {}
    if config.eos_token_id is None and model.config.eos_token_id is not None:
        fill["eos_token_id"] = model.config.extra.get("eos_token_id_list") or model.config.eos_token_id
    if config.bos_token_id is None and model.config.bos_token_id is not None:
        fill["bos_token_id"] = model.config.bos_token_id
    if config.pad_token_id is None and model.config.pad_token_id is not None:
        fill["pad_token_id"] = model.config.pad_token_id
    return config.replace(**fill) if fill else config


def generate(
    model: GPT,
    input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    attention_mask: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    *,
    tokenizer: Any = None,
    **options: Any,
) -> torch.Tensor | GenerationOutput:
    """Continue each prompt; returns prompt + continuation ids (B * num_return_sequences, length),
    or a GenerationOutput with return_dict_in_generate=True. `tokenizer` (anything with
    `decode(ids)`) is needed only for stop_strings."""
    config = resolve_config(model, generation_config, **options)
    if config.is_beam_search:
        from lmforge.generation.beam import beam_search  # beam.py builds on this module

        return beam_search(model, input_ids, attention_mask, config, tokenizer=tokenizer)
    decoder = Decoder(model, input_ids, attention_mask, config, tokenizer=tokenizer)
    for _ in decoder:
        pass
    return decoder.output()


# ---- request preparation ---------------------------------------------------------------------


def prepare_request(
    model: GPT, input_ids: Any, attention_mask: Any, config: GenerationConfig, expand: int,
) -> Request:
    """Check the prompt against the model (vocabulary, context), fill an empty prompt with bos, fix
    the total length, and repeat each row `expand` times (samples or beams per prompt)."""
    device = model.device
    ids = _as_2d_long(input_ids, "input_ids").to(device)
    mask = None if attention_mask is None else _as_2d_long(attention_mask, "attention_mask").to(device)
    vocab, context = model.config.vocab_size, model.config.n_positions
    if mask is not None and mask.shape != ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(ids.shape)}, got {tuple(mask.shape)}")
    if mask is not None and ((mask != 0) & (mask != 1)).any():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")

    if ids.size(1) == 0:  # an empty prompt starts from <|endoftext|>, as GPT-2 does
        bos = _start_token(config)
        ids = torch.full((ids.size(0), 1), bos, dtype=torch.long, device=device)
        mask = None
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
        bad = ids[(ids < 0) | (ids >= vocab)][0].item()
        raise ValueError(f"input_ids contains token id {bad}, outside the model's vocabulary 0..{vocab - 1}")
    if mask is not None:
        empty_rows = mask.sum(dim=1) == 0
        if empty_rows.any():  # an all-padding row is an empty prompt: give it a start token
            ids, mask = ids.clone(), mask.clone()
            ids[empty_rows, -1] = _start_token(config)
            mask[empty_rows, -1] = 1
        if bool((mask == 1).all()):
            mask = None

    new_tokens = _new_tokens(ids.size(1), config, context)
    if ids.size(1) + new_tokens > context or ids.size(1) >= context:
        keep = context - max(new_tokens, 1)
        if not config.truncate_prompt or keep < 1:
            raise ValueError(
                f"prompt of {ids.size(1)} tokens + {new_tokens} new tokens exceeds the model's context "
                f"(n_positions={context}); shorten the prompt, lower max_new_tokens/max_length, "
                "or pass truncate_prompt=True to keep only the last tokens of the prompt"
            )
        ids = ids[:, -keep:]
        mask = None if mask is None else mask[:, -keep:]

    eos = config.eos_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    if expand > 1:
        ids = ids.repeat_interleave(expand, dim=0)
        mask = None if mask is None else mask.repeat_interleave(expand, dim=0)
    return Request(ids, mask, ids.size(1) + new_tokens, eos, pad, ids.size(0) // expand)


def _new_tokens(prompt_length: int, config: GenerationConfig, context: int) -> int:
    """How many tokens to generate: max_new_tokens, else max_length - prompt, else 20 (within the context)."""
    if config.max_new_tokens is not None:
        return config.max_new_tokens
    if config.max_length is not None:
        if config.max_length <= prompt_length:
            raise ValueError(
                f"the prompt has {prompt_length} tokens but max_length is {config.max_length}; "
                "raise max_length or set max_new_tokens instead"
            )
        return config.max_length - prompt_length
    return max(0, min(DEFAULT_MAX_NEW_TOKENS, context - prompt_length))


def _as_2d_long(x: Any, name: str) -> torch.Tensor:
    try:
        t = x if isinstance(x, torch.Tensor) else torch.tensor(x)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name} must be a tensor or equal-length lists of token ids (left-pad ragged "
                         f"prompts and pass attention_mask): {e}") from None
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise ValueError(f"{name} must be (batch, length) or (length,), got shape {tuple(t.shape)}")
    if t.numel() and (t.is_floating_point() or t.is_complex()):
        raise ValueError(f"{name} must hold integers, got dtype {t.dtype}")
    return t.long()


def _start_token(config: GenerationConfig) -> int:
    if config.bos_token_id is not None:
        return config.bos_token_id
    if config.eos_token_id:
        return config.eos_token_id[0]
    raise ValueError("the prompt is empty and there is no bos_token_id (or eos_token_id) to start from; "
                     "pass a prompt or set bos_token_id")


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: each row counts from 0 at its first real token."""
    return (mask.cumsum(dim=-1) - 1).masked_fill(mask == 0, 0)


# ---- forward passes --------------------------------------------------------------------------


StepMode = Literal["dynamic", "static", "compiled"]


class Forward:
    """Prefill and one-token decode steps over a request's KV cache; logits of the last position only.

    Keeps the attention mask and position ids of left-padded batches in preallocated buffers.
    mode "dynamic" runs model.forward_hidden over the filled part of the cache (or, for one unpadded
    sequence of a model in eval mode, the same step on vectors: row_step.py). "static" is a
    static-shape step (whole-cache attention under a mask, cache writes at a tensor index) and
    "compiled" is that step under torch.compile with CUDA graphs, as in gpt-fast.
    """

    def __init__(
        self, model: GPT, batch_size: int, max_length: int, mask: torch.Tensor | None, mode: StepMode = "dynamic",
    ) -> None:
        self.model = model
        # The last token is never fed back, so the cache needs one position fewer than the output.
        cache_length = max(1, max_length - 1)
        static = mode != "dynamic"
        self.mask: torch.Tensor | None = None
        if mode == "compiled":
            self.cache, self.mask = _compiled_buffers(model, batch_size, cache_length)
        else:
            self.cache = KVCache.for_model(model, batch_size, cache_length)
            if mask is not None or static:
                self.mask = torch.ones(batch_size, cache_length, dtype=torch.bool, device=model.device)
        if mask is not None:
            self.mask[:, : mask.size(1)] = mask.bool()
        self.next_position: torch.Tensor | None = None
        self.static = _StaticStep(model, self.cache, self.mask, compile=mode == "compiled") if static else None
        single_row = (mode == "dynamic" and batch_size == 1 and mask is None and not model.training
                      and RowStep.supports(model))
        self.row_step = RowStep(model, self.cache) if single_row else None

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        positions = None if mask is None else _positions(mask)
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
        """Keep the cache rows of the surviving beams, in place; only the filled part is copied."""
        filled = self.cache.length
        for buffer in (self.cache.k, self.cache.v):
            buffer[:, :, :, :filled] = buffer[:, :, :, :filled].index_select(1, index)
        for state in (self.next_position, self.mask):
            if state is not None:
                state.copy_(state.index_select(0, index))


class _StaticStep:
    """A decode step whose tensors never change shape, so torch.compile captures it once.

    Attention covers all slots of the cache; slots not yet written are masked out. Equal to the
    dynamic step up to float rounding (tested in eager mode; the compiled form is untested on GPU).
    """

    def __init__(self, model: GPT, cache: KVCache, valid: torch.Tensor, compile: bool) -> None:
        global _compiled_step
        self.model, self.cache, self.valid = model, cache, valid
        self.fn = _static_decode_step
        if compile:
            if _compiled_step is None:
                _compiled_step = torch.compile(_static_decode_step, mode="reduce-overhead", fullgraph=True)
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
_compiled_cache: "weakref.WeakKeyDictionary[GPT, dict]" = weakref.WeakKeyDictionary()
_COMPILED_BUCKET = 256


def _compiled_buffers(model: GPT, batch_size: int, length: int) -> tuple[KVCache, torch.Tensor]:
    length = min(model.config.n_positions, -(-length // _COMPILED_BUCKET) * _COMPILED_BUCKET)
    buffers = _compiled_cache.setdefault(model, {})
    key = (batch_size, length, model.dtype, model.device)
    if key not in buffers:
        cache = KVCache.for_model(model, batch_size, length)
        valid = torch.ones(batch_size, length, dtype=torch.bool, device=model.device)
        for buffer in (cache.k, cache.v, valid):  # updated in place: CUDA graphs must not copy them
            torch._dynamo.mark_static_address(buffer)
        buffers[key] = (cache, valid)
    cache, valid = buffers[key]
    cache.reset()
    valid.fill_(True)
    return cache, valid


def _static_decode_step(
    model: GPT, k_cache: torch.Tensor, v_cache: torch.Tensor, valid: torch.Tensor,
    tokens: torch.Tensor, positions: torch.Tensor, write_at: torch.Tensor,
) -> torch.Tensor:
    """The model's forward for one token per row, written for fixed shapes (see _StaticStep)."""
    B = tokens.size(0)
    C = model.config.n_embd
    H, D = model.config.n_head, model.config.head_dim
    x = model.transformer.wte(tokens) + model.transformer.wpe(positions)  # (B, 1, C)
    attend = valid[:, None, None, :]  # (B, 1, 1, S)
    for i, block in enumerate(model.transformer.h):
        attn = block.attn
        q, k, v = attn.c_attn(block.ln_1(x)).split(C, dim=2)
        q = q.view(B, 1, H, D).transpose(1, 2)  # (B, H, 1, D)
        k_cache[i].index_copy_(2, write_at, k.view(B, 1, H, D).transpose(1, 2))
        v_cache[i].index_copy_(2, write_at, v.view(B, 1, H, D).transpose(1, 2))
        y = F.scaled_dot_product_attention(q, k_cache[i], v_cache[i], attn_mask=attend, scale=attn.scale)
        x = x + attn.c_proj(y.transpose(1, 2).reshape(B, 1, C))
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(model.transformer.ln_f(x[:, -1])).float()


# ---- greedy and sampling ---------------------------------------------------------------------


class Decoder:
    """Greedy or sampling decoding of one request; iterate to run it step by step (streaming), then
    call output(). The output ids live in one preallocated (B, max_length) buffer."""

    def __init__(
        self, model: GPT, input_ids: Any, attention_mask: Any = None,
        config: GenerationConfig | None = None, *, tokenizer: Any = None,
    ) -> None:
        config = config if config is not None else resolve_config(model)
        if config.is_beam_search:
            raise ValueError("Decoder runs greedy/sampling decoding; use beam_search() for num_beams > 1")
        self.config = config
        self.model = model
        expand = config.num_return_sequences
        self.request = req = prepare_request(model, input_ids, attention_mask, config, expand)
        B, L = req.input_ids.shape
        self.prompt_length = L
        self.sequences = torch.full((B, req.max_length), req.pad, dtype=torch.long, device=model.device)
        self.sequences[:, :L] = req.input_ids
        self.length = L
        self.unfinished = torch.ones(B, dtype=torch.bool, device=model.device)
        self.eos = None if not req.eos else torch.tensor(req.eos, device=model.device)
        ignore = None if req.attention_mask is None else req.attention_mask.argmax(dim=1)
        self.process = make_logits_processor(
            config, prompt_length=L, eos_token_ids=req.eos, ignore_before=ignore, min_tokens_to_keep=1,
        )
        self.generator = make_generator(config.seed, model.device)
        self.stop = StopStrings(config.stop_strings, tokenizer) if config.stop_strings else None
        self.scores: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self.logprobs: list[torch.Tensor] = []

    def __iter__(self) -> Iterator[DecodeStep]:
        req = self.request
        if req.max_length <= self.prompt_length:
            return
        # inference_mode is entered per step, never across a yield: the caller's code between steps
        # must not run in it.
        with torch.inference_mode():
            forward = Forward(self.model, req.input_ids.size(0), req.max_length, req.attention_mask,
                               "compiled" if self.config.compile else "dynamic")
            step = self._advance(forward.prefill(req.input_ids, req.attention_mask))
        while True:
            yield step
            if bool(step.finished.all()):
                return
            with torch.inference_mode():
                step = self._advance(forward.step(step.tokens))

    def _advance(self, logits: torch.Tensor) -> DecodeStep:
        """Choose each row's next token from `logits`, append it, update which rows are finished."""
        tokens = self._choose(logits)
        self.sequences[:, self.length] = tokens
        self.length += 1
        if self.eos is not None:
            self.unfinished &= ~torch.isin(tokens, self.eos)
        if self.stop is not None:
            self.unfinished &= ~self.stop.hits(self.sequences[:, : self.length], self.unfinished)
        if self.length >= self.request.max_length:
            self.unfinished.zero_()
        return DecodeStep(self.length - self.prompt_length - 1, tokens, ~self.unfinished)

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        config = self.config
        scores = logits
        if self.process is not None:
            scores = self.process(self.sequences[:, : self.length], logits)
        tokens = sample_token(scores, self.generator) if config.do_sample else greedy_token(scores)
        if self.eos is not None or self.stop is not None:  # finished rows get padding
            tokens = torch.where(self.unfinished, tokens, self.request.pad)
        if config.return_dict_in_generate:
            if config.output_scores:
                self.scores.append(scores)
                self.logprobs.append(torch.log_softmax(scores, dim=-1).gather(1, tokens[:, None]).squeeze(1))
            if config.output_logits:
                self.logits.append(logits)
        return tokens

    def output(self) -> torch.Tensor | GenerationOutput:
        sequences = self.sequences[:, : self.length]
        if not self.config.return_dict_in_generate:
            return sequences
        config = self.config
        return GenerationOutput(
            sequences=sequences,
            scores=tuple(self.scores) if config.output_scores else None,
            logits=tuple(self.logits) if config.output_logits else None,
            token_logprobs=torch.stack(self.logprobs, dim=1) if config.output_scores and self.logprobs else None,
        )


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A private generator when a seed is given; otherwise torch's global one (as transformers)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


class StopStrings:
    """Stop when a stop string appears in the decoded text and overlaps the newest token (the
    semantics of transformers' StopStringCriteria, checked on decoded text instead of the vocab)."""

    def __init__(self, strings: list[str], tokenizer: Any) -> None:
        if tokenizer is None or not hasattr(tokenizer, "decode"):
            raise ValueError("stop_strings needs a tokenizer: pass tokenizer=... to generate")
        self.strings = strings
        self.tokenizer = tokenizer
        # Enough trailing tokens to spell the longest stop string (a token is at least one byte).
        self.window = 4 * max(len(s) for s in strings) + 2

    def hits(self, sequences: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) bool: which rows of `sequences` (N, length) end with a stop string."""
        out = torch.zeros(sequences.size(0), dtype=torch.bool)
        tails = sequences[:, -self.window:].tolist()
        check = [True] * len(tails) if rows is None else rows.tolist()
        for i, (tail, wanted) in enumerate(zip(tails, check)):
            if not wanted:
                continue
            text = self.tokenizer.decode(tail)
            # Text before the newest token; an incomplete character there (U+FFFD) is what it completes.
            before = len(self.tokenizer.decode(tail[:-1]).rstrip("\ufffd"))
            for s in self.strings:
                start = text.find(s, max(0, before - len(s) + 1))
                if start != -1 and start + len(s) > before:
                    out[i] = True
                    break
        return out.to(sequences.device)
