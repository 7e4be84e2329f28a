"""Beam search and beam sampling over the KV cache, token-identical to transformers' `generate`."""

from __future__ import annotations

from typing import Any

import torch

from lmforge.generation.config import GenerationConfig
from lmforge.generation.forward import Forward
from lmforge.generation.request import GenerationOutput, PreparedRequest, prepare_request, resolve_config
from lmforge.generation.sampling import make_generator, make_logits_processor
from lmforge.generation.stops import StopStrings

_BIG_NEGATIVE = -1.0e9  # transformers' "impossible" score (keeps the arithmetic finite, ties identical)


def beam_search(
    model: Any, input_ids: Any, attention_mask: Any = None, config: GenerationConfig | None = None,
    *, tokenizer: Any = None,
) -> torch.Tensor | GenerationOutput:
    """Beam search (beam sampling with do_sample), the vectorised algorithm of transformers >= 4.50:
    keep the top 2 * num_beams continuations per step so num_beams stay alive even when the best ones
    end; finished hypotheses compete on score / generated_length ** length_penalty."""
    config = config if config is not None else resolve_config(model)
    req = prepare_request(model, input_ids, attention_mask, config, config.num_beams)
    L = req.input_ids.size(1)
    if req.max_length <= L:  # nothing to generate: the prompt, num_return_sequences times
        prompts = req.input_ids[:: config.num_beams].repeat_interleave(config.num_return_sequences, dim=0)
        return _beam_output(config, prompts, None, None, None)
    n_eos = len(req.eos) if req.eos else 0
    ignore = None if req.attention_mask is None else req.attention_mask.argmax(dim=1)
    process = make_logits_processor(config, prompt_length=L, eos_token_ids=req.eos, ignore_before=ignore,
                                    min_tokens_to_keep=(n_eos + 1) if n_eos else 2)
    generator = make_generator(config.seed, model.device)
    stop = StopStrings(config.stop_strings, tokenizer) if config.stop_strings else None
    all_scores: list[torch.Tensor] = []
    all_logits: list[torch.Tensor] = []
    with torch.inference_mode():
        beams = _Beams(req, config, model.device)
        forward = Forward(model, req.input_ids.size(0), req.max_length, req.attention_mask,
                           "compiled" if config.compile else "dynamic")
        logits = forward.prefill(req.input_ids, req.attention_mask)
        while True:
            log_probs = torch.log_softmax(logits, dim=-1)
            if process is not None:
                log_probs = process(beams.running_ids(), log_probs)
            if config.return_dict_in_generate:
                if config.output_scores:
                    all_scores.append(log_probs)
                if config.output_logits:
                    all_logits.append(logits)
            if not beams.advance(log_probs, generator, stop):
                break
            forward.reorder(beams.source_rows)
            logits = forward.step(beams.last_tokens())
        sequences, scores = beams.best(config.num_return_sequences)
    # Cloned outside inference mode: callers get ordinary tensors they may modify.
    return _beam_output(config, sequences.clone(), scores.clone(), all_scores, all_logits)


class _Beams:
    """Beam search state for B prompts x nb beams: the running hypotheses and the best finished ones.

    Token buffers are (B, nb, max_length). Scores are summed log-probs; a finished hypothesis is
    ranked by score / generated_length ** length_penalty. Every operation mirrors transformers'
    `_beam_search`, including its -1e9 "impossible" scores, so ties break the same way.
    """

    def __init__(self, req: PreparedRequest, config: GenerationConfig, device: torch.device) -> None:
        B, nb, L = req.batch_size, config.num_beams, req.input_ids.size(1)
        self.config, self.B, self.nb, self.prompt_length, self.max_length = config, B, nb, L, req.max_length
        self.eos = torch.tensor(req.eos, device=device) if req.eos else None
        self.keep = max(2, 1 + (len(req.eos) if req.eos else 0)) * nb  # candidates per prompt and step
        self.top_nb = torch.arange(self.keep, device=device) < nb
        # transformers fills unused output slots with pad, or eos[0] when pad is 0 (`pad or eos[0]`)
        fill = req.pad if (req.pad or not req.eos) else req.eos[0]
        self.running = torch.full((B, nb, req.max_length), fill, dtype=torch.long, device=device)
        self.running[:, :, :L] = req.input_ids.view(B, nb, L)
        self.running_scores = torch.zeros(B, nb, device=device)
        self.running_scores[:, 1:] = _BIG_NEGATIVE  # only beam 0 expands at first: the beams start identical
        self.finished = self.running.clone()
        self.finished_scores = torch.full((B, nb), _BIG_NEGATIVE, device=device)
        self.finished_lengths = torch.zeros(B, nb, dtype=torch.long, device=device)
        self.is_finished = torch.zeros(B, nb, dtype=torch.bool, device=device)
        self.improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
        self.batch_offset = torch.arange(B, device=device)[:, None] * nb
        self.source_rows = torch.arange(B * nb, device=device)  # cache row each running beam continues
        self.length = L

    def running_ids(self) -> torch.Tensor:
        return self.running.view(self.B * self.nb, -1)[:, : self.length]

    def last_tokens(self) -> torch.Tensor:
        return self.running[:, :, self.length - 1].reshape(-1)

    def advance(self, log_probs: torch.Tensor, generator: torch.Generator | None, stop: Any) -> bool:
        """Extend the beams by one token given their processed log-probs (B * nb, vocab); False when
        the search is over."""
        B, nb, cur = self.B, self.nb, self.length
        vocab = log_probs.size(-1)
        total = (log_probs.view(B, nb, vocab) + self.running_scores[:, :, None]).view(B, nb * vocab)
        if self.config.do_sample:  # `keep` continuations drawn without replacement, best first
            picked = torch.multinomial(torch.softmax(total, dim=-1), self.keep, generator=generator)
            top_scores, order = total.gather(1, picked).sort(dim=-1, descending=True)
            picked = picked.gather(1, order)
        else:
            top_scores, picked = torch.topk(total, self.keep)
        source_beam = picked // vocab  # (B, keep)
        candidates = torch.take_along_dim(self.running, source_beam[:, :, None], dim=1)
        candidates[:, :, cur] = picked % vocab

        hits = torch.full((B, self.keep), cur + 1 >= self.max_length, dtype=torch.bool, device=total.device)
        if self.eos is not None:
            hits |= torch.isin(candidates[:, :, cur], self.eos)
        if stop is not None:
            hits |= stop.hits(candidates[:, :, : cur + 1].reshape(B * self.keep, -1)).view(B, self.keep)

        # The best num_beams unfinished candidates run on.
        alive_scores = top_scores + hits.float() * _BIG_NEGATIVE
        survivors = torch.topk(alive_scores, nb).indices
        self.running = torch.take_along_dim(candidates, survivors[:, :, None], dim=1)
        self.running_scores = torch.take_along_dim(alive_scores, survivors, dim=1)
        self.source_rows = (torch.take_along_dim(source_beam, survivors, dim=1) + self.batch_offset).view(-1)
        self._collect_finished(candidates, top_scores, hits)

        self.length = cur + 1
        self.improvable &= self._can_improve()
        all_done = bool(self.is_finished.all()) and self.config.early_stopping is True
        return bool(self.improvable.any()) and not all_done and not bool(hits.all())

    def _collect_finished(self, candidates: torch.Tensor, top_scores: torch.Tensor, hits: torch.Tensor) -> None:
        """Finished candidates among the top num_beams join the finished set if they beat it."""
        generated = self.length + 1 - self.prompt_length
        just_finished = hits & self.top_nb[None, :]
        scores = top_scores / (generated ** self.config.length_penalty)
        full = self.is_finished.all(dim=-1, keepdim=True) & (self.config.early_stopping is True)
        scores += full.float() * _BIG_NEGATIVE
        scores += (~self.improvable).float() * _BIG_NEGATIVE
        scores += (~just_finished) * _BIG_NEGATIVE
        merged_scores = torch.cat((self.finished_scores, scores), dim=1)
        best = torch.topk(merged_scores, self.nb).indices
        lengths = torch.full_like(hits, generated, dtype=torch.long)
        self.finished = torch.take_along_dim(torch.cat((self.finished, candidates), dim=1), best[:, :, None], dim=1)
        self.finished_scores = torch.take_along_dim(merged_scores, best, dim=1)
        self.finished_lengths = torch.take_along_dim(torch.cat((self.finished_lengths, lengths), dim=1), best, dim=1)
        self.is_finished = torch.take_along_dim(torch.cat((self.is_finished, just_finished), dim=1), best, dim=1)

    def _can_improve(self) -> torch.Tensor:
        """(B, 1): could the best running beam still beat the worst finished one? (transformers' heuristic)"""
        config = self.config
        if config.early_stopping == "never" and config.length_penalty > 0.0:
            best_length = self.max_length - self.prompt_length  # a positive penalty favours the longest
        else:
            best_length = self.length - self.prompt_length
        best_running = self.running_scores[:, :1] / (best_length ** config.length_penalty)
        worst_finished = torch.where(
            self.is_finished, torch.min(self.finished_scores, dim=1, keepdim=True)[0], _BIG_NEGATIVE
        )
        return torch.any(best_running > worst_finished, dim=-1, keepdim=True)

    def best(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The n best finished hypotheses per prompt, (B * n, prompt + longest) ids and their scores."""
        length = self.prompt_length + int(self.finished_lengths[:, :n].max())
        sequences = self.finished[:, :n, :length].reshape(self.B * n, length)
        return sequences, self.finished_scores[:, :n].reshape(-1)


def _beam_output(
    config: GenerationConfig, sequences: torch.Tensor, sequences_scores: torch.Tensor | None,
    scores: list[torch.Tensor] | None, logits: list[torch.Tensor] | None,
) -> torch.Tensor | GenerationOutput:
    if not config.return_dict_in_generate:
        return sequences
    return GenerationOutput(
        sequences=sequences,
        scores=tuple(scores) if config.output_scores and scores is not None else None,
        logits=tuple(logits) if config.output_logits and logits is not None else None,
        sequences_scores=sequences_scores if config.output_scores else None,
    )
