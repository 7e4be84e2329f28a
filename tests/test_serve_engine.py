"""One request, two paths: the server's engine gives the tokens generate() gives with the same
settings and seed (greedy, sampling, penalties, logit bias, stop strings, eos ids, empty prompts),
alone or batched with other requests."""

from __future__ import annotations

import threading

import pytest
import torch

import lmforge
from lmforge import GPT, GPTConfig, KVCache, Tokenizer
from lmforge.serve import Engine, EngineConfig, Output, SamplingParams

TOK = Tokenizer.byte_level()
BOS = 10  # not the eos (256), so an empty prompt shows which one it starts from


def tiny_model(eos: list[int]) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=TOK.vocab_size, n_positions=128,
                       bos_token_id=BOS, eos_token_id=eos)
    model = GPT(config).eval()
    with torch.no_grad():  # sharper than the 0.02 init: greedy argmaxes are far from ties, yet vary
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model([TOK.eos_token_id])


@pytest.fixture(scope="module")
def engine(model):
    engine = Engine(model, TOK, EngineConfig(max_batch_size=8)).start()
    yield engine
    engine.stop()


def reference(model, prompt: list[int], max_tokens: int, **options) -> list[int]:
    """The new tokens generate() gives (up to and including the one that ended it)."""
    out = model.generate([prompt] if prompt else torch.empty(1, 0, dtype=torch.long),
                         max_new_tokens=max_tokens, tokenizer=TOK, **options)[0]
    new = out[max(1, len(prompt)):].tolist()
    eos = options.get("eos_token_id", [TOK.eos_token_id])
    for i, t in enumerate(new):
        if t in eos:
            return new[: i + 1]
    return new


def collectors(n: int):
    """Event lists for n submissions, a semaphore released once per finished one, and collector(i)
    making submission i's callback."""
    results: dict[int, list[Output]] = {i: [] for i in range(n)}
    done = threading.Semaphore(0)

    def collector(i: int):
        def collect(output: Output) -> None:
            assert output.error is None, output.error
            results[i].append(output)
            if output.finish_reason is not None:
                done.release()
        return collect

    return results, done, collector


def tokens(events: list[Output]) -> list[int]:
    return [e.token_id for e in events]


# (SamplingParams options, the generate() options that mean the same)
CASES = {
    "greedy": (dict(temperature=0), dict()),
    "seeded sampling with top-k and top-p": (
        dict(temperature=0.8, top_k=20, top_p=0.9, seed=3), dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=3)),
    "plain sampling": (dict(temperature=1.0, seed=11), dict(do_sample=True, top_k=0, seed=11)),
    "repetition penalty, greedy": (dict(temperature=0, repetition_penalty=1.5), dict(repetition_penalty=1.5)),
    "repetition penalty, sampled": (
        dict(temperature=0.7, seed=5, repetition_penalty=1.3), dict(do_sample=True, temperature=0.7, top_k=0, seed=5,
                                                                    repetition_penalty=1.3)),
    "presence/frequency penalties and logit bias": (
        dict(temperature=0, presence_penalty=0.5, frequency_penalty=1.0, logit_bias={65: 3.0}),
        dict(presence_penalty=0.5, frequency_penalty=1.0, logit_bias={65: 3.0})),
    "all of them, sampled": (
        dict(temperature=1.2, top_k=40, top_p=0.95, seed=9, repetition_penalty=1.2, presence_penalty=0.3,
             frequency_penalty=0.4, logit_bias={32: 1.0, 101: -2.0}),
        dict(do_sample=True, temperature=1.2, top_k=40, top_p=0.95, seed=9, repetition_penalty=1.2,
             presence_penalty=0.3, frequency_penalty=0.4, logit_bias={32: 1.0, 101: -2.0})),
}
PROMPTS = [TOK.encode(text) for text in ("Hello there", "a", "The same tokens both ways, please")]


def test_each_request_gives_the_tokens_of_generate_even_batched_together(model, engine):
    """All cases x prompts run at once in the engine (several rows per step, joining at different times)."""
    jobs = [(name, prompt) for name in CASES for prompt in PROMPTS]
    results, done, collector = collectors(len(jobs))

    for i, (name, prompt) in enumerate(jobs):
        params = SamplingParams(max_tokens=25 + 5 * (i % 3), ignore_eos=True, **CASES[name][0])
        engine.submit([prompt], params, 1, collector(i))
    for _ in jobs:
        assert done.acquire(timeout=60)
    assert engine.counters["max_batch_seen"] >= 2
    for i, (name, prompt) in enumerate(jobs):
        expected = reference(model, prompt, 25 + 5 * (i % 3), eos_token_id=[], **CASES[name][1])
        assert tokens(results[i]) == expected, (name, prompt)
        assert results[i][-1].finish_reason == "length"
    sampled = reference(model, PROMPTS[0], 25, eos_token_id=[], **CASES["plain sampling"][1])
    assert sampled != reference(model, PROMPTS[0], 25, eos_token_id=[])  # the sampling cases really sample



def test_rows_of_very_different_lengths_through_cache_growth_give_the_tokens_of_generate(monkeypatch):
    """Short and long sequences (1 to ~300 positions) join and leave while the cache grows from 128 to
    512 positions. What grow() leaves undefined is filled with NaN here (fresh pages happen to be zero):
    a row's masked tail must be zeroed before attention reads it."""
    grow = KVCache.grow

    def grow_into_nan(cache: KVCache, max_length: int, rows: int | None = None) -> None:
        old = cache.max_length
        grow(cache, max_length, rows)
        for buffer in (cache.k, cache.v):
            buffer[:, :, :, old:] = float("nan")
            if rows is not None:
                buffer[:, rows:] = float("nan")

    monkeypatch.setattr(KVCache, "grow", grow_into_nan)
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=TOK.vocab_size, n_positions=512,
                       eos_token_id=[TOK.eos_token_id])
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    jobs = [(PROMPTS[1], 40), (TOK.encode("x" * 200), 100), (PROMPTS[0], 150), (PROMPTS[2], 20), (TOK.encode("y" * 90), 60)]
    results, done, collector = collectors(len(jobs))
    engine = Engine(model, TOK, EngineConfig(max_batch_size=3)).start()
    try:
        for i, (prompt, n) in enumerate(jobs):
            engine.submit([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), 1, collector(i))
        for _ in jobs:
            assert done.acquire(timeout=60)
        counters = dict(engine.counters)
    finally:
        engine.stop()
    assert counters["kv_cache_grows"] >= 2 and counters["max_batch_seen"] == 3
    for i, (prompt, n) in enumerate(jobs):
        assert tokens(results[i]) == reference(model, prompt, n, eos_token_id=[]), i

def test_choice_j_of_a_seeded_request_is_generate_with_seed_plus_j(model, engine):
    choices = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=20, temperature=0.9, seed=7, ignore_eos=True),
                              n=3, timeout=60)
    for j, events in enumerate(choices):
        assert tokens(events) == reference(model, PROMPTS[1], 20, do_sample=True, temperature=0.9, top_k=0,
                                           seed=7 + j, eos_token_id=[])
    assert len({tuple(tokens(c)) for c in choices}) == 3


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=4)], ids=["greedy", "sampled"])
def test_stop_strings_end_both_at_the_same_token_and_the_server_leaves_them_out(model, engine, sampling):
    options = dict(do_sample=True, top_k=0, seed=4) if sampling.get("seed") else {}
    free = reference(model, PROMPTS[0], 40, eos_token_id=[], **options)
    text, before = TOK.decode(free), TOK.decode(PROMPTS[0])
    # A string that first shows up inside the completion: generate() searches the prompt's text
    # too (as transformers), the server only the completion (as OpenAI).
    stop = next(text[i:i + 2] for i in range(4, len(text) - 2)
                if "\ufffd" not in text[i:i + 2] and (before + text).find(text[i:i + 2]) >= len(before))
    expected = reference(model, PROMPTS[0], 40, eos_token_id=[], stop_strings=[stop, "never there"], **options)
    events = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=40, ignore_eos=True, stop=[stop, "never there"],
                                                          **sampling), timeout=60)[0]
    assert tokens(events) == expected and len(expected) < len(free)
    assert events[-1].finish_reason == "stop"
    assert "".join(e.text for e in events) == text[: text.find(stop)]


def test_every_eos_id_of_the_model_stops_both_and_ignore_eos_runs_on(model):
    free = reference(model, PROMPTS[2], 30, eos_token_id=[])
    t = next(t for i, t in enumerate(free) if i >= 3 and t not in free[:i])  # a token first made at step i
    eos_model = tiny_model([TOK.eos_token_id, t])  # several eos ids, as in some model configs
    eos_model.load_state_dict(model.state_dict())
    engine = Engine(eos_model, TOK, EngineConfig(max_batch_size=2)).start()
    try:
        expected = reference(eos_model, PROMPTS[2], 30, eos_token_id=[TOK.eos_token_id, t])
        assert expected == eos_model.generate([PROMPTS[2]], max_new_tokens=30)[0, len(PROMPTS[2]):].tolist()[
            : len(expected)]  # generate() resolves the same eos ids from the model
        events = engine.generate([PROMPTS[2]], SamplingParams(max_tokens=30, temperature=0), timeout=60)[0]
        assert tokens(events) == expected and expected[-1] == t and events[-1].finish_reason == "stop"
        events = engine.generate([PROMPTS[2]], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
                                 timeout=60)[0]
        assert tokens(events) == free and events[-1].finish_reason == "length"
        events = engine.generate([PROMPTS[2]], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                              stop_token_ids=[t]), timeout=60)[0]
        assert tokens(events) == expected and events[-1].finish_reason == "stop"
    finally:
        engine.stop()


def test_an_empty_prompt_starts_from_bos_in_both(model, engine):
    events = engine.generate([[]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), timeout=60)[0]
    out = model.generate(torch.empty(1, 0, dtype=torch.long), max_new_tokens=12, eos_token_id=[])[0].tolist()
    assert out[0] == BOS and tokens(events) == out[1:]


def test_text_stream_holds_back_what_could_begin_a_stop_string():
    from lmforge.generation.stream import TextStream

    text = TextStream(TOK, ["STOP", "xyz"])
    pieces = [text.push(t) for t in TOK.encode("ab ST")]
    assert "".join(p for p, _ in pieces) == "ab " and not any(hit for _, hit in pieces)  # "ST" is held back
    assert text.push(TOK.encode("A")[0]) == ("STA", False)  # no longer a stop string's start
    pieces = [text.push(t) for t in TOK.encode("xySTOP")]
    assert [p for p, _ in pieces] == ["", "", "xy", "", "", ""] and pieces[-1][1]  # "xy" held until "S"
    text = TextStream(TOK, ["é!"])
    assert [text.push(t) for t in TOK.encode("é")] == [("", False), ("", False)]  # incomplete, then held
    assert text.finish() == ("é", False)


def llama_engine_model(**family) -> lmforge.GPT:
    """A tiny byte-level Llama-family model with weights of unit gain, whose greedy text varies
    (small initial weights repeat one token, which would hide wrong positions)."""
    torch.manual_seed(0)
    config = lmforge.preset("llama-baby", vocab_size=TOK.vocab_size, n_layer=2, n_embd=32, n_head=4, n_inner=64,
                            n_positions=128, bos_token_id=10, eos_token_id=[TOK.eos_token_id],
                            tie_word_embeddings=False, **family)
    model = lmforge.GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 2.0 / p.size(1) ** 0.5) if p.dim() == 2 else p.normal_(1.0, 0.2)
    return model
