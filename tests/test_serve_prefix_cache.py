"""Prefix reuse (EngineConfig.prefix_cache_tokens): prompts that start like an earlier one copy its
keys/values and prefill only the rest. A request's tokens are those generate() gives without any reuse;
the engine's counters show the hits and the prompt tokens not computed; the cache keeps its bound."""

from __future__ import annotations

import re
import time

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.model import KVCache
from lmforge.serve import Engine, EngineConfig, SamplingParams
from lmforge.serve.app import _prometheus
from lmforge.serve.prefix_cache import PrefixCache
from test_serve_engine import CASES, TOK, collectors, reference, tiny_model, tokens
from test_serve_scheduler import MODELS, idle, slow

SYSTEM = TOK.encode("System: you are a terse assistant who answers in one line.\nUser: ")
# Different first letters: each question shares exactly SYSTEM with the others.
QUESTIONS = ["Apples?", "Bread or rice?", "Cats", "Dogs and wolves, how do they differ?"]
PROMPTS = [SYSTEM + TOK.encode(q) for q in QUESTIONS]


def run_all(engine: Engine, jobs: list[tuple[list[int], str, int]]) -> dict:
    """Submit (prompt, case, max_tokens) jobs at once; wait for all; their events."""
    results, done, collector = collectors(len(jobs))
    for i, (prompt, case, n) in enumerate(jobs):
        engine.submit([prompt], SamplingParams(max_tokens=n, ignore_eos=True, **CASES[case][0]), 1, collector(i))
    for _ in jobs:
        assert done.acquire(timeout=60)
    return results


@pytest.mark.parametrize("budget", [7, 0])
@pytest.mark.parametrize("name", list(MODELS))
def test_reused_prefixes_give_the_tokens_of_generate(name, budget):
    """A first request fills the cache; then every question (and an exact repeat, which reuses all but its
    last token) runs at once, greedy and seeded sampling: each starts from the cached system prompt, and
    each gets the tokens generate() gives from scratch. With budget 7 the reused prompts' remaining
    chunks are packed with other prompts' in one pass (their cached part in the packed mask)."""
    model = MODELS[name]()
    engine = Engine(model, TOK, EngineConfig(max_batch_size=4, max_batched_tokens=budget)).start()
    jobs = [(p, case, 8 + 3 * (i % 3)) for case in ("greedy", "seeded sampling with top-k and top-p")
            for i, p in enumerate(PROMPTS)]
    try:
        first = run_all(engine, [(PROMPTS[0], "greedy", 6)])
        results = run_all(engine, jobs)
    finally:
        engine.stop()
    assert tokens(first[0]) == reference(model, PROMPTS[0], 6, eos_token_id=[])
    for i, (prompt, case, n) in enumerate(jobs):
        assert tokens(results[i]) == reference(model, prompt, n, eos_token_id=[], **CASES[case][1]), (case, i)
    counters = engine.counters
    assert counters["prefix_cache_queries"] == 1 + len(jobs)
    assert counters["prefix_cache_hits"] == len(jobs)  # all but the very first prompt
    assert counters["prefix_cache_hit_tokens"] >= len(jobs) * len(SYSTEM)
    computed = sum(len(p) for p, _, _ in [(PROMPTS[0], None, None), *jobs]) - counters["prefix_cache_hit_tokens"]
    assert counters["prefill_tokens"] == computed


def test_a_shared_system_prompt_gives_hits_and_fewer_prefill_tokens():
    """One after another, each question reuses exactly the system prompt; the exact repeat of the last
    reuses all but its last token. /metrics shows the counts; without the cache every token is computed."""
    model = tiny_model([TOK.eos_token_id])
    counts = {}
    for size in (8192, 0):
        engine = Engine(model, TOK, EngineConfig(max_batch_size=2, max_batched_tokens=16,
                                                 prefix_cache_tokens=size)).start()
        outputs = []
        try:
            for prompt in [*PROMPTS, PROMPTS[-1]]:
                events = engine.generate([prompt], SamplingParams(max_tokens=5, temperature=0), timeout=30)[0]
                outputs.append(tokens(events))
        finally:
            engine.stop()
        counts[size] = engine.metrics()
        assert outputs == [reference(model, p, 5) for p in [*PROMPTS, PROMPTS[-1]]]
    on, off = counts[8192], counts[0]
    total = sum(len(p) for p in PROMPTS) + len(PROMPTS[-1])
    reused = (len(PROMPTS) - 1) * len(SYSTEM) + len(PROMPTS[-1]) - 1
    assert (on["prefix_cache_queries"], on["prefix_cache_hits"], on["prefix_cache_hit_tokens"]) == (5, 4, reused)
    assert on["prefill_tokens"] == total - reused
    assert on["num_prefix_cache_tokens"] == sum(len(p) for p in PROMPTS)  # the repeat is not stored twice
    assert off["prefill_tokens"] == total
    assert (off["prefix_cache_queries"], off["prefix_cache_hits"], off["num_prefix_cache_tokens"]) == (0, 0, 0)
    text = _prometheus(on)
    assert re.search(r"^lmforge_prefix_cache_queries_total 5$", text, re.M)
    assert re.search(r"^lmforge_prefix_cache_hits_total 4$", text, re.M)
    assert re.search(rf"^lmforge_prefix_cache_hit_tokens_total {reused}$", text, re.M)
    assert re.search(r"^# TYPE lmforge_num_prefix_cache_tokens gauge$", text, re.M)
    assert re.search(r"^lmforge_max_prefix_cache_tokens 8192$", text, re.M)


def fake_cache(tokens_: list[int]) -> KVCache:
    """A one-row cache whose keys at position i hold token i (and values its negative): a copy shows
    which positions it came from."""
    cache = KVCache(1, 1, 1, len(tokens_), 1)
    cache.k[0, 0, 0, :, 0] = torch.tensor(tokens_, dtype=torch.float32)
    cache.v[0, 0, 0, :, 0] = -torch.tensor(tokens_, dtype=torch.float32)
    cache.length = len(tokens_)
    return cache


def test_the_prefix_cache_copies_the_longest_match_and_keeps_its_bound_least_recently_used_out():
    a, b, c = list(range(100, 130)), list(range(200, 230)), list(range(300, 330))
    cache = PrefixCache(max_tokens=70, min_match=16)
    cache.add(a[:20], fake_cache(a[:20]))
    cache.add(a, fake_cache(a))  # extends the first: it replaces it
    cache.add(a[:25], fake_cache(a[:25]))  # already covered by a: nothing new
    assert [list(k) for k, _ in cache.entries()] == [a] and cache.tokens == 30
    cache.add(b, fake_cache(b))
    assert cache.tokens == 60

    prompt = a[:24] + [7, 8, 9]
    target = KVCache(1, 1, 1, len(prompt), 1)
    assert cache.fill(prompt, target) == 24 and target.length == 24
    assert target.k[0, 0, 0, :24, 0].tolist() == a[:24] and target.v[0, 0, 0, :24, 0].tolist() == [-t for t in a[:24]]
    assert target.k[0, 0, 0, 24:, 0].tolist() == [0, 0, 0]
    # The whole prompt cached: all but its last token are copied.
    target = KVCache(1, 1, 1, 30, 1)
    assert cache.fill(list(b), target) == 29 and target.k[0, 0, 0, :29, 0].tolist() == b[:29]
    # Too short a match: nothing, unless it is the whole prompt but one.
    assert cache.fill(a[:10] + [1] * 10, KVCache(1, 1, 1, 20, 1)) == 0
    assert cache.fill(a[:10] + [1], KVCache(1, 1, 1, 11, 1)) == 10

    cache.fill(a[:20] + [5], KVCache(1, 1, 1, 21, 1))  # a is now the most recently used
    cache.add(c, fake_cache(c))  # 90 > 70: b goes
    assert [list(k) for k, _ in cache.entries()] == [a, c] and cache.tokens == 60 <= cache.max_tokens
    cache.add(list(range(71)), fake_cache(list(range(71))))  # longer than the bound: never kept
    assert cache.tokens == 60 and len(cache) == 2


def test_the_engine_cache_keeps_its_bound_and_the_tokens_stay_right_after_eviction():
    model = tiny_model([TOK.eos_token_id])
    bound = 2 * len(PROMPTS[3])
    engine = Engine(model, TOK, EngineConfig(max_batch_size=2, max_batched_tokens=12,
                                             prefix_cache_tokens=bound)).start()
    held = []
    try:
        for prompt in PROMPTS + PROMPTS[:2]:
            events = engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0), timeout=30)[0]
            assert tokens(events) == reference(model, prompt, 4)
            held.append(engine.prefix_cache.tokens)
            entries = engine.prefix_cache.entries()
            assert sum(len(k) for k, _ in entries) == engine.prefix_cache.tokens <= bound
            assert all(c.length == len(k) for k, c in entries)
            assert list(entries[-1][0]) == prompt  # the newest entry is the last prompt
    finally:
        engine.stop()
    assert max(held) <= bound and len(engine.prefix_cache) < len(PROMPTS)  # older prompts were evicted
    assert engine.counters["prefix_cache_hits"] == len(PROMPTS) + 1  # each but the first shared the system prompt


def test_a_request_cancelled_during_its_prefill_leaves_the_cache_as_it_was():
    model = tiny_model([TOK.eos_token_id])
    engine = slow(Engine(model, TOK, EngineConfig(max_batch_size=2, max_batched_tokens=4)), 0.02).start()
    long_prompt = SYSTEM + TOK.encode("Why is the sky blue? Say it with care.")
    try:
        engine.generate([PROMPTS[0]], SamplingParams(max_tokens=3, temperature=0), timeout=30)
        before = [(k, c.length) for k, c in engine.prefix_cache.entries()]
        forwards = engine.counters["prefill_forwards"]
        request = engine.submit([long_prompt], SamplingParams(max_tokens=5, temperature=0))
        deadline = time.monotonic() + 20
        while engine.counters["prefill_forwards"] < forwards + 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert engine.num_prefilling == 1 and engine.counters["prefix_cache_hits"] == 1  # part-way, from SYSTEM
        engine.cancel(request)
        assert idle(engine)
        assert [(k, c.length) for k, c in engine.prefix_cache.entries()] == before
        assert engine.prefix_cache.tokens == len(PROMPTS[0])
        events = engine.generate([long_prompt], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True),
                                 timeout=30)[0]
        assert tokens(events) == reference(model, long_prompt, 5, eos_token_id=[])
        assert engine.counters["prefix_cache_hits"] == 2
        assert list(engine.prefix_cache.entries()[-1][0]) == long_prompt
    finally:
        engine.stop()


def test_prefix_cache_tokens_zero_means_no_reuse_and_the_flag_takes_its_default_from_engine_config():
    from lmforge.cli import build_parser

    model = tiny_model([TOK.eos_token_id])
    engine = Engine(model, TOK, EngineConfig(max_batched_tokens=16, prefix_cache_tokens=0)).start()
    try:
        for prompt in (PROMPTS[0], PROMPTS[0]):
            engine.generate([prompt], SamplingParams(max_tokens=2, temperature=0), timeout=30)
    finally:
        engine.stop()
    assert engine.prefix_cache is None
    assert engine.counters["prefill_tokens"] == 2 * len(PROMPTS[0]) and engine.counters["prefix_cache_hits"] == 0
    with pytest.raises(ConfigError, match="prefix_cache_tokens must be an integer >= 0"):
        EngineConfig(prefix_cache_tokens=-1)
    assert build_parser().parse_args(["serve", "--preset", "tiny"]).prefix_cache_tokens == 2048 \
        == EngineConfig.prefix_cache_tokens
    assert build_parser().parse_args(["serve", "--preset", "tiny", "--prefix-cache-tokens", "0"]).prefix_cache_tokens == 0
