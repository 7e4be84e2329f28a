"""The pure sampling filters against transformers' logits processors and warpers, on the same inputs."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.generation import GenerationConfig
from lmforge.generation.sampling import (
    apply_repetition_penalty, apply_temperature, ban_repeated_ngrams, greedy_token, make_logits_processor,
    sample_token, suppress_tokens, top_k_filter, top_p_filter,
)

hf = pytest.importorskip("transformers.generation.logits_process")

VOCAB = 23


@st.composite
def scores_and_ids(draw, max_batch=3, max_len=12):
    """Random scores (with ties and -inf entries) and token histories over a small vocabulary."""
    batch = draw(st.integers(1, max_batch))
    length = draw(st.integers(1, max_len))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, VOCAB, generator=g) * draw(st.sampled_from([0.1, 1.0, 5.0]))
    if draw(st.booleans()):  # ties: quantise
        scores = (scores * 2).round() / 2
    if draw(st.booleans()):  # some tokens already filtered out
        scores[:, torch.randint(0, VOCAB, (3,), generator=g)] = -math.inf
        scores[:, 0] = 1.0  # keep each row valid
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    return scores, ids


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a, b)


@settings(max_examples=60, deadline=None)
@given(scores_and_ids(), st.floats(0.05, 0.999, allow_nan=False), st.integers(1, 3))
def test_top_p_equals_transformers(data, top_p, keep):
    scores, ids = data
    want = hf.TopPLogitsWarper(top_p, min_tokens_to_keep=keep)(ids, scores.clone())
    assert same(top_p_filter(scores, top_p, keep), want)


@settings(max_examples=60, deadline=None)
@given(scores_and_ids(), st.integers(1, VOCAB + 5), st.integers(1, 3))
def test_top_k_equals_transformers(data, top_k, keep):
    scores, ids = data
    want = hf.TopKLogitsWarper(top_k, min_tokens_to_keep=keep)(ids, scores.clone())
    assert same(top_k_filter(scores, top_k, keep), want)


@settings(max_examples=40, deadline=None)
@given(scores_and_ids(), st.floats(0.05, 5.0, allow_nan=False))
def test_temperature_equals_transformers(data, temperature):
    scores, ids = data
    assert same(apply_temperature(scores, temperature), hf.TemperatureLogitsWarper(temperature)(ids, scores.clone()))


@settings(max_examples=60, deadline=None)
@given(scores_and_ids(), st.floats(0.3, 3.0, allow_nan=False))
def test_repetition_penalty_equals_transformers(data, penalty):
    scores, ids = data
    want = hf.RepetitionPenaltyLogitsProcessor(penalty)(ids, scores.clone())
    assert same(apply_repetition_penalty(scores, ids, penalty), want)


@settings(max_examples=30, deadline=None)
@given(scores_and_ids(), st.floats(0.3, 3.0, allow_nan=False), st.data())
def test_repetition_penalty_ignores_left_padding_like_transformers(data, penalty, draw):
    scores, ids = data
    ignore = torch.tensor([draw.draw(st.integers(0, ids.size(1) - 1)) for _ in range(ids.size(0))])
    want = hf.RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=ignore)(ids, scores.clone())
    assert same(apply_repetition_penalty(scores, ids, penalty, ignore_before=ignore), want)


@settings(max_examples=60, deadline=None)
@given(scores_and_ids(max_len=20), st.integers(1, 4), st.booleans())
def test_no_repeat_ngram_equals_transformers(data, n, small_alphabet):
    scores, ids = data
    if small_alphabet:  # repeated n-grams are then common
        ids = ids % 3
    want = hf.NoRepeatNGramLogitsProcessor(n)(ids, scores.clone())
    assert same(ban_repeated_ngrams(scores, ids, n), want)


def test_no_repeat_ngram_bans_the_completion_of_a_seen_bigram():
    ids = torch.tensor([[5, 6, 7, 5]])
    out = ban_repeated_ngrams(torch.zeros(1, 10), ids, 2)
    assert out[0, 6] == -math.inf and torch.isfinite(out[0, [0, 1, 2, 3, 4, 5, 7, 8, 9]]).all()


def test_suppress_tokens_and_min_new_tokens_match_transformers():
    scores = torch.randn(2, VOCAB)
    ids = torch.randint(0, VOCAB, (2, 7))
    want = hf.MinNewTokensLengthLogitsProcessor(5, 4, [3, 9])(ids, scores.clone())  # 2 new < 4: suppressed
    assert same(suppress_tokens(scores, [3, 9]), want)
    config = GenerationConfig(min_new_tokens=4, eos_token_id=[3, 9])
    process = make_logits_processor(config, prompt_length=5, eos_token_ids=[3, 9])
    assert same(process(ids, scores), want)
    longer = torch.randint(0, VOCAB, (2, 9))  # 4 new tokens: no longer suppressed
    assert same(process(longer, scores), hf.MinNewTokensLengthLogitsProcessor(5, 4, [3, 9])(longer, scores.clone()))


@settings(max_examples=40, deadline=None)
@given(scores_and_ids(), st.integers(0, 8), st.floats(0.1, 1.0), st.floats(0.2, 3.0), st.floats(0.5, 2.0),
       st.integers(0, 3))
def test_composed_processor_equals_transformers_list(data, top_k, top_p, temperature, penalty, ngram):
    """The whole chain, in transformers' order, for a sampling config."""
    scores, ids = data
    config = GenerationConfig(do_sample=True, top_k=top_k, top_p=top_p, temperature=temperature,
                              repetition_penalty=penalty, no_repeat_ngram_size=ngram)
    chain = []
    if penalty != 1.0:
        chain.append(hf.RepetitionPenaltyLogitsProcessor(penalty))
    if ngram:
        chain.append(hf.NoRepeatNGramLogitsProcessor(ngram))
    if temperature != 1.0:
        chain.append(hf.TemperatureLogitsWarper(temperature))
    if top_k:
        chain.append(hf.TopKLogitsWarper(top_k))
    if top_p < 1.0:
        chain.append(hf.TopPLogitsWarper(top_p))
    want = hf.LogitsProcessorList(chain)(ids, scores.clone())
    process = make_logits_processor(config, prompt_length=ids.size(1), eos_token_ids=None)
    got = scores if process is None else process(ids, scores)
    assert same(got, want)


def test_filters_are_pure():
    scores = torch.randn(2, VOCAB)
    ids = torch.randint(0, VOCAB, (2, 6))
    before = scores.clone()
    for out in (top_k_filter(scores, 3), top_p_filter(scores, 0.5), apply_temperature(scores, 0.5),
                apply_repetition_penalty(scores, ids, 1.5), ban_repeated_ngrams(scores, ids % 2, 2),
                suppress_tokens(scores, [1])):
        assert out is scores or out.data_ptr() != scores.data_ptr()
    assert torch.equal(scores, before)


def test_disabled_filters_are_identity_and_plain_decoding_needs_no_processor():
    scores = torch.randn(2, VOCAB)
    assert top_k_filter(scores, 0) is scores and top_p_filter(scores, 1.0) is scores
    assert apply_temperature(scores, 1.0) is scores
    assert make_logits_processor(GenerationConfig(), prompt_length=3, eos_token_ids=[0]) is None
    assert make_logits_processor(GenerationConfig(do_sample=True, top_k=0), prompt_length=3, eos_token_ids=[0]) is None


@pytest.mark.parametrize("call", [
    lambda s: top_k_filter(s, -1), lambda s: top_p_filter(s, 0.0), lambda s: top_p_filter(s, 1.5),
    lambda s: apply_temperature(s, 0.0),
])
def test_filters_reject_bad_parameters(call):
    with pytest.raises(ValueError):
        call(torch.zeros(1, 4))


def test_greedy_token_is_argmax():
    scores = torch.tensor([[0.1, 2.0, -1.0], [5.0, 0.0, 4.9]])
    assert greedy_token(scores).tolist() == [1, 0]


def test_sampling_with_a_generator_is_reproducible():
    scores = torch.randn(4, VOCAB)
    a = [sample_token(scores, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(a[0], a[1])


def test_sampled_tokens_follow_the_filtered_distribution():
    """Chi-square goodness of fit: 20k draws from softmax(top_p(top_k(z / T)))."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 12, generator=g) * 2
    filtered = top_p_filter(top_k_filter(apply_temperature(logits, 0.8), 6), 0.9)
    probs = torch.softmax(filtered, dim=-1)[0]
    n = 20_000
    draws = sample_token(filtered.expand(n, -1), torch.Generator().manual_seed(1))
    counts = torch.bincount(draws, minlength=12).double()
    assert counts[probs == 0].sum() == 0, "a filtered-out token was sampled"
    support = probs > 0
    expected = probs[support].double() * n
    chi2 = (((counts[support] - expected) ** 2) / expected).sum().item()
    dof = int(support.sum()) - 1
    # 99.9th percentile of chi-square with <= 5 degrees of freedom is < 20.6
    assert dof >= 2 and chi2 < 20.6, (chi2, dof)


def test_openai_penalties_and_logit_bias_come_first_and_count_only_new_tokens():
    from lmforge.generation.sampling import apply_logit_bias, apply_presence_frequency_penalty

    scores = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    assert apply_logit_bias(scores, {0: 2.0, 3: -100.0}).tolist() == [[3.0, -2.0, 0.5, -97.0]]
    with pytest.raises(ValueError, match="vocabulary"):
        apply_logit_bias(scores, {4: 1.0})
    new = torch.tensor([[2, 2, 3]])  # token 2 twice, token 3 once
    assert apply_presence_frequency_penalty(scores, new, 0.5, 1.0).tolist() == [[1.0, -2.0, -2.0, 1.5]]
    config = GenerationConfig(logit_bias={1: 1.0}, frequency_penalty=1.0, repetition_penalty=2.0)
    process = make_logits_processor(config, prompt_length=2, eos_token_ids=None)
    ids = torch.tensor([[0, 1, 1]])  # prompt [0, 1], new [1]
    # bias: -2 -> -1; frequency (new tokens only): token 1 -> -2; repetition (prompt too): 1 / 2, -2 * 2
    assert process(ids, scores).tolist() == [[0.5, -4.0, 0.5, 3.0]]
    with pytest.raises(ValueError, match="logit_bias"):
        GenerationConfig(logit_bias={-1: 1.0})
