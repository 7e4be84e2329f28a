"""generate(): greedy and sampling decoding over a preallocated KV cache (beam search: beam.py).

One prefill pass runs the whole (left-padded) prompt; after that each step feeds one token per row.
The cache, the output id buffer and the attention mask are allocated once, sized from the request
(batch x max length), and written in place. Only the last position goes through the LM head.
Results are token-identical to transformers' `generate` for the same weights and options.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from lmforge.generation.beam import beam_search
from lmforge.generation.config import GenerationConfig
from lmforge.generation.forward import Forward
from lmforge.generation.request import GenerationOutput, prepare_request, resolve_config
from lmforge.generation.sampling import Sampler
from lmforge.generation.stops import StopStrings

@dataclass
class DecodeStep:
    """One step of greedy/sampling decoding: the token each row got, and which rows are done after it."""

    index: int  # 0 for the first new token
    tokens: torch.Tensor  # (B,) (pad_token_id for rows that had already finished)
    finished: torch.Tensor  # (B,) bool


def generate(
    model: Any,
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
        return beam_search(model, input_ids, attention_mask, config, tokenizer=tokenizer)
    decoder = Decoder(model, input_ids, attention_mask, config, tokenizer=tokenizer)
    for _ in decoder:
        pass
    return decoder.output()


# ---- greedy and sampling ---------------------------------------------------------------------


class Decoder:
    """Greedy or sampling decoding of one request; iterate to run it step by step (streaming), then
    call output(). The output ids live in one preallocated (B, max_length) buffer."""

    def __init__(
        self, model: Any, input_ids: Any, attention_mask: Any = None,
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
        self.sampler = Sampler(config, prompt_length=L, device=model.device, ignore_before=ignore)
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
        tokens, scores = self.sampler(self.sequences[:, : self.length], logits)
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
