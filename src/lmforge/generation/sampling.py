"""Logits -> filtered logits -> token: the one sampler of generate() and the server.

Each filter takes scores (B, vocab) and returns new scores; none mutates its input. Semantics and
order follow transformers' logits processors and warpers exactly (the tests compare them on the same
inputs): repetition penalty, no-repeat n-grams, min-new-tokens, then, only when sampling,
temperature, top-k, top-p. OpenAI's logit bias and presence/frequency penalties, when set, come
first. `make_logits_processor` composes the ones a GenerationConfig turns on; `Sampler` adds the
choice (argmax, or a draw from a seeded generator) for one request.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from lmforge.generation.config import GenerationConfig

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (token_ids, scores) -> scores

_NEG_INF = float("-inf")


def apply_logit_bias(scores: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    """Add bias[token] to each listed token's score (OpenAI's logit_bias: -100 bans, +100 forces)."""
    vocab = scores.size(-1)
    bad = next((t for t in bias if not 0 <= t < vocab), None)
    if bad is not None:
        raise ValueError(f"logit_bias token id {bad} is outside the vocabulary 0..{vocab - 1}")
    ids = torch.tensor(list(bias), device=scores.device)
    out = scores.clone()
    out[:, ids] += torch.tensor(list(bias.values()), device=scores.device, dtype=scores.dtype)
    return out


def apply_presence_frequency_penalty(
    scores: torch.Tensor, output_ids: torch.Tensor, presence: float, frequency: float,
) -> torch.Tensor:
    """OpenAI's penalties: subtract frequency * (times the token was generated) and presence * (whether
    it was). `output_ids` (B, n) are the new tokens only; the prompt does not count."""
    vocab = scores.size(-1)
    counts = torch.zeros(scores.size(0), vocab + 1, dtype=scores.dtype, device=scores.device)
    ids = output_ids.clamp(max=vocab)  # ids beyond the scores' vocab land in a dropped extra column
    counts.scatter_add_(1, ids, torch.ones(ids.shape, dtype=scores.dtype, device=scores.device))
    counts = counts[:, :vocab]
    return scores - frequency * counts - presence * (counts > 0).to(scores.dtype)


def apply_repetition_penalty(
    scores: torch.Tensor, token_ids: torch.Tensor, penalty: float, ignore_before: torch.Tensor | None = None,
) -> torch.Tensor:
    """Make every token already in `token_ids` less likely: negative scores are multiplied by
    `penalty`, positive ones divided (CTRL, Keskar et al. 2019). `ignore_before` (B,): positions
    before it (left padding) do not count."""
    if penalty == 1.0:
        return scores
    vocab = scores.size(-1)
    ids = token_ids.clamp(max=vocab)  # ids beyond the scores' vocab land in a dropped extra column
    if ignore_before is not None:
        positions = torch.arange(ids.size(1), device=ids.device)
        ids = ids.masked_fill(positions[None, :] < ignore_before[:, None], vocab)
    seen = torch.zeros(scores.size(0), vocab + 1, dtype=torch.bool, device=scores.device)
    seen.scatter_(1, ids, True)
    penalized = _bounded(torch.where(scores < 0, scores * penalty, scores / penalty), scores)
    return torch.where(seen[:, :vocab], penalized, scores)


def _bounded(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """`new` with the finite scores of `old` kept finite: a tiny penalty or temperature (1e-200) would
    turn them into +-inf, and two +inf make softmax NaN. Masked (-inf) scores stay as they are."""
    big = torch.finfo(new.dtype).max
    return torch.where(torch.isfinite(old), new.clamp(-big, big), old)


def ban_repeated_ngrams(scores: torch.Tensor, token_ids: torch.Tensor, ngram_size: int) -> torch.Tensor:
    """Forbid any token that would complete an n-gram already present in `token_ids` (prompt included)."""
    length = token_ids.size(1)
    if ngram_size <= 0 or length < ngram_size:
        return scores
    vocab = scores.size(-1)
    prefix = token_ids[:, length - ngram_size + 1:]  # the last n-1 tokens, (B, n-1)
    windows = token_ids.unfold(1, ngram_size, 1)  # every n-gram, (B, L-n+1, n)
    matches = (windows[..., :-1] == prefix[:, None, :]).all(dim=-1)  # (B, L-n+1)
    completions = torch.where(matches, windows[..., -1].clamp(max=vocab), vocab)
    banned = torch.zeros(scores.size(0), vocab + 1, dtype=torch.bool, device=scores.device)
    banned.scatter_(1, completions, True)
    return scores.masked_fill(banned[:, :vocab], _NEG_INF)


def suppress_tokens(scores: torch.Tensor, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Give the listed tokens zero probability (min_new_tokens suppresses eos this way)."""
    ids = torch.as_tensor(token_ids, device=scores.device)
    mask = torch.isin(torch.arange(scores.size(-1), device=scores.device), ids)
    return torch.where(mask, _NEG_INF, scores)


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """p_i proportional to exp(z_i / T): T < 1 sharpens, T > 1 flattens."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if temperature >= 1.0:  # flattening cannot overflow: skip the guard in the sampling loop
        return scores if temperature == 1.0 else scores / temperature
    return _bounded(scores / temperature, scores)


def top_k_filter(scores: torch.Tensor, top_k: int, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep the k highest scores (ties with the k-th included); the rest become -inf. k=0 keeps all."""
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    k = min(max(top_k, min_tokens_to_keep), scores.size(-1))
    if top_k == 0 or k == scores.size(-1):
        return scores
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, _NEG_INF)


def top_p_filter(scores: torch.Tensor, top_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2019): keep the smallest set of most likely tokens whose
    probabilities sum to at least top_p; the rest become -inf."""
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_p == 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - top_p)  # the unlikely tail, whose mass is at most 1 - top_p
    drop_sorted[..., -min_tokens_to_keep:] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, _NEG_INF)


def greedy_token(scores: torch.Tensor) -> torch.Tensor:
    """The most likely token of each row, (B,)."""
    return scores.argmax(dim=-1)


def sample_token(scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A token drawn from softmax(scores) for each row, (B,). Rows of scores must not be all -inf."""
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def make_logits_processor(
    config: GenerationConfig,
    *,
    prompt_length: int,
    eos_token_ids: Sequence[int] | None,
    ignore_before: torch.Tensor | None = None,
    min_tokens_to_keep: int = 1,
) -> LogitsProcessor | None:
    """Compose the filters `config` turns on into one (token_ids, scores) -> scores function, in
    transformers' order; None when there is nothing to do (plain greedy or plain sampling)."""
    steps: list[LogitsProcessor] = []
    if config.logit_bias:
        bias = dict(config.logit_bias)
        steps.append(lambda ids, s: apply_logit_bias(s, bias))
    if config.presence_penalty or config.frequency_penalty:
        presence, frequency = float(config.presence_penalty), float(config.frequency_penalty)
        steps.append(lambda ids, s: apply_presence_frequency_penalty(s, ids[:, prompt_length:], presence, frequency))
    if config.repetition_penalty != 1.0:
        penalty = float(config.repetition_penalty)
        steps.append(lambda ids, s: apply_repetition_penalty(s, ids, penalty, ignore_before))
    if config.no_repeat_ngram_size > 0:
        n = config.no_repeat_ngram_size
        steps.append(lambda ids, s: ban_repeated_ngrams(s, ids, n))
    if config.min_new_tokens > 0 and eos_token_ids:
        eos = torch.tensor(list(eos_token_ids))
        minimum = config.min_new_tokens
        steps.append(lambda ids, s: suppress_tokens(s, eos) if ids.size(1) - prompt_length < minimum else s)
    if config.do_sample:
        if config.temperature != 1.0:
            temperature = float(config.temperature)
            steps.append(lambda ids, s: apply_temperature(s, temperature))
        if config.top_k != 0:
            k = config.top_k
            steps.append(lambda ids, s: top_k_filter(s, k, min_tokens_to_keep))
        if config.top_p < 1.0:
            p = float(config.top_p)
            steps.append(lambda ids, s: top_p_filter(s, p, min_tokens_to_keep))
    if not steps:
        return None

    def process(token_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for step in steps:
            scores = step(token_ids, scores)
        return scores

    return process


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A private generator when a seed is given; otherwise torch's global one (as transformers)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]] | None]:
    """log p(token) under softmax(logits) (vocab,), and the `top` most likely (id, logprob) pairs (None for 0)."""
    logprobs = torch.log_softmax(logits, dim=-1)
    best = None
    if top > 0:
        values, ids = logprobs.topk(top)
        best = list(zip(ids.tolist(), values.tolist()))
    return float(logprobs[token]), best


class Sampler:
    """How one request chooses its next tokens: the filters its GenerationConfig turns on, then the
    argmax (greedy) or a draw from the softmax, from a private generator when `config.seed` is set."""

    def __init__(
        self, config: GenerationConfig, *, prompt_length: int, device: torch.device | str,
        ignore_before: torch.Tensor | None = None,
    ) -> None:
        self.process = make_logits_processor(
            config, prompt_length=prompt_length, eos_token_ids=config.eos_token_id, ignore_before=ignore_before,
        )
        self.do_sample = config.do_sample
        self.generator = make_generator(config.seed, device) if config.do_sample else None

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no filter: the argmax of the raw logits."""
        return self.process is None and not self.do_sample

    def __call__(self, token_ids: torch.Tensor | None, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (B,), the processed scores (B, vocab) they were chosen from). `token_ids` (B, length),
        prompt included, is read only by filters that need the history (None is fine without them)."""
        scores = logits if self.process is None else self.process(token_ids, logits)
        tokens = sample_token(scores, self.generator) if self.do_sample else greedy_token(scores)
        return tokens, scores


def choose_rows(
    logits: torch.Tensor, samplers: Sequence[Sampler], histories: Sequence[Callable[[], torch.Tensor]],
) -> list[int]:
    """Row i's next token under samplers[i] (a batch of independent requests); histories[i]() gives
    its (1, length) token ids, asked for only when its filters need them. Plain greedy rows share
    one argmax over the batch; the others choose alone, so a seeded row draws as it would alone."""
    greedy: list[int] | None = None
    tokens = []
    for i, (sampler, history) in enumerate(zip(samplers, histories)):
        if sampler.plain_greedy:
            if greedy is None:
                greedy = greedy_token(logits).tolist()
            tokens.append(greedy[i])
        else:
            token, _ = sampler(history() if sampler.process is not None else None, logits[i:i + 1])
            tokens.append(int(token))
    return tokens
