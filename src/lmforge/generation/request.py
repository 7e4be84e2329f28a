"""A generation request before decoding: the effective options, the checked and expanded prompts,
and what generate() returns. Shared by greedy/sampling decoding (decode.py) and beam search (beam.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lmforge.config import out_of_vocabulary
from lmforge.errors import ConfigError
from lmforge.generation.config import DEFAULT_MAX_NEW_TOKENS, GenerationConfig, check_option_names


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
class PreparedRequest:
    """A validated, expanded prompt and the lengths and special ids that decoding needs."""

    input_ids: torch.Tensor  # (B * expand, L), long, on the model's device
    attention_mask: torch.Tensor | None  # (B * expand, L) or None when there is no padding
    max_length: int  # prompt + new tokens, <= n_positions
    eos: list[int] | None
    pad: int
    batch_size: int  # before expansion


def resolve_config(
    model: Any, generation_config: GenerationConfig | None = None, **options: Any,
) -> GenerationConfig:
    """The effective config: `generation_config` (or the defaults) with `options` applied on top;
    where the user left a field unset (not among `options`, still at GenerationConfig's default),
    the checkpoint's generation_config.json value (model.generation_defaults, as transformers applies
    it), then for eos/pad/bos the model's config."""
    check_option_names(options)
    base = generation_config if generation_config is not None else GenerationConfig()
    config = base.replace(**options) if options else base.replace()
    saved = getattr(model, "generation_defaults", None) or {}
    if saved:
        unset = GenerationConfig()
        keep = {k: v for k, v in saved.items()
                if k not in options and hasattr(config, k) and getattr(config, k) == getattr(unset, k)}
        config = config.replace(**keep) if keep else config
    fill: dict[str, Any] = {}
    if config.eos_token_id is None and model.config.eos_token_id is not None:
        fill["eos_token_id"] = model.config.eos_token_id  # one id or a list, as in config.json
    if config.bos_token_id is None and model.config.bos_token_id is not None:
        fill["bos_token_id"] = model.config.bos_token_id
    if config.pad_token_id is None and model.config.pad_token_id is not None:
        fill["pad_token_id"] = model.config.pad_token_id
    config = config.replace(**fill) if fill else config
    check_special_ids(config, model.config.vocab_size)
    return config


def check_special_ids(config: GenerationConfig, vocab_size: int) -> None:
    """Refuse an eos/pad/bos id the model cannot produce or read: an eos past the vocabulary would
    never stop a generation, a pad or bos past it would index past the embedding."""
    bad = out_of_vocabulary(config, vocab_size)
    if bad:
        name, token = bad
        raise ConfigError(f"{name} {token} is outside the model's vocabulary (ids 0..{vocab_size - 1}); pass ids "
                          f"of this model's tokenizer (e.g. tokenizer.eos_token_id)")


def prepare_request(
    model: Any, input_ids: Any, attention_mask: Any, config: GenerationConfig, expand: int,
) -> PreparedRequest:
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
    # A row that is all padding keeps its ids, as in transformers: no query attends to any of them
    # (attention gives zeros) and they all sit at position 0.
    if mask is not None and bool((mask == 1).all()):
        mask = None

    new_tokens = _new_tokens(ids.size(1), config, context)
    if ids.size(1) + new_tokens > context or ids.size(1) >= context:
        keep = context - max(new_tokens, 1)
        if keep < 1:  # truncating the prompt cannot help
            raise ValueError(
                f"{new_tokens} new tokens leave no room for a prompt in the model's context (n_positions={context}); "
                f"ask for at most {context - 1} new tokens (max_new_tokens, or a smaller max_length)"
            )
        if not config.truncate_prompt:
            raise ValueError(
                f"prompt of {ids.size(1)} tokens + {new_tokens} new tokens exceeds the model's context "
                f"(n_positions={context}); shorten the prompt, lower max_new_tokens/max_length, "
                "or pass truncate_prompt=True (--truncate-prompt) to keep only the last tokens of the prompt"
            )
        ids = ids[:, -keep:]
        mask = None if mask is None else mask[:, -keep:]

    eos = config.eos_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    if expand > 1:
        ids = ids.repeat_interleave(expand, dim=0)
        mask = None if mask is None else mask.repeat_interleave(expand, dim=0)
    return PreparedRequest(ids, mask, ids.size(1) + new_tokens, eos, pad, ids.size(0) // expand)


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
    if config.start_token_id is not None:
        return config.start_token_id
    raise ValueError("the prompt is empty and there is no bos_token_id (or eos_token_id) to start from; "
                     "pass a prompt or set bos_token_id")
