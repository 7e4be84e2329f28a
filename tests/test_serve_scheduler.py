"""The token-budget scheduler (EngineConfig.max_batched_tokens): running decodes first, then prompt
chunks, several prompts packed into one forward pass and long ones split over steps. A request's tokens
are those generate() gives alone; request timeouts, engine metrics, cancellation during prefill and a
long run with random cancellations that must leave nothing behind."""

from __future__ import annotations

import random
import re
import threading
import time

import pytest
import torch

from lmforge.cli import build_parser
from lmforge.errors import ConfigError
from lmforge.serve import Engine, EngineConfig, Output, SamplingParams
from lmforge.serve.app import _prometheus
from test_serve_engine import CASES, TOK, collectors, llama_engine_model, reference, tiny_model, tokens

LLAMA_FAMILIES = {
    "llama-gqa": dict(family="llama", n_kv_head=2),
    "mistral-window": dict(family="mistral", n_kv_head=2, sliding_window=6),  # the window, in the packed mask
}
# Different lengths, one of them much longer than any budget below, so that prompts are split and packed.
PROMPTS = [TOK.encode(t) for t in ("Hi", "The same tokens both ways", "a",
                                   "A much longer prompt that no single step of a small budget can hold at once.",
                                   "Chunks of several prompts share one forward pass")]


MODELS = {"gpt2": lambda: tiny_model([TOK.eos_token_id]),
          **{n: (lambda n=n: llama_engine_model(**LLAMA_FAMILIES[n])) for n in LLAMA_FAMILIES}}


def spy_on_prefill(engine: Engine) -> list[list[tuple[int, int, int]]]:
    """Record each prefill pass as [(request id, tokens already cached, chunk length), ...]."""
    passes: list[list[tuple[int, int, int]]] = []
    forward = engine._forward_chunks

    def spy(plan, rows=None):
        passes.append([(job.seqs[0].request.id, job.done, take) for job, take in plan])
        return forward(plan, rows)

    engine._forward_chunks = spy
    return passes


@pytest.mark.parametrize("budget, chunk", [(5, 32), (7, 32), (7, 1), (0, 32)])
@pytest.mark.parametrize("name", list(MODELS))
def test_chunked_and_packed_prefill_gives_the_tokens_of_generate(name, budget, chunk):
    """Prompts of different lengths arrive together: with budget 5 or 7 each step decodes the running rows
    and packs chunks of several prompts into the same pass, a long prompt split over many (with chunk 1,
    as few prompt tokens beside the decodes as there are running rows); every request gets what
    generate() gives alone (greedy and seeded sampling), as with the previous scheduler (budget 0)."""
    model = MODELS[name]()
    cases = ["greedy", "seeded sampling with top-k and top-p", "repetition penalty, sampled"]
    jobs = [(case, prompt, 12 + 4 * (i % 3)) for i, (case, prompt) in enumerate(
        (case, prompt) for case in cases for prompt in PROMPTS)]
    results, done, collector = collectors(len(jobs))
    # No prefix reuse: the repeated prompts are all prefilled, chunked and packed (test_serve_prefix_cache
    # checks reuse with the same schedules).
    engine = Engine(model, TOK, EngineConfig(max_batch_size=4, max_batched_tokens=budget, prefix_cache_tokens=0,
                                             prefill_chunk_tokens=chunk))
    passes = spy_on_prefill(engine)
    engine.start()
    try:
        for i, (case, prompt, n) in enumerate(jobs):
            engine.submit([prompt], SamplingParams(max_tokens=n, ignore_eos=True, **CASES[case][0]), 1, collector(i))
        for _ in jobs:
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    for i, (case, prompt, n) in enumerate(jobs):
        assert tokens(results[i]) == reference(model, prompt, n, eos_token_id=[], **CASES[case][1]), (case, prompt)
    if budget:
        assert all(sum(take for *_, take in p) <= budget for p in passes)
        assert max(len(p) for p in passes) >= 2  # several prompts' chunks in one forward pass
        assert any(done_ > 0 and len(p) >= 2 for p in passes for _, done_, _ in p)  # a started one packed too
        long = len(PROMPTS[3])
        assert sum(1 for p in passes for rid, _, _ in p if rid == 4) >= long // budget  # the long prompt split
        steps = engine.histograms["step_tokens"].snapshot()
        assert steps["count"] > 0 and steps["buckets"][-1][1] == steps["count"]
        assert engine.counters["prefill_tokens"] == sum(len(p) for _, p, _ in jobs)
    else:
        assert passes == []  # the previous scheduler: whole prompts, alone


def test_n_choices_share_one_chunked_prefill():
    model = tiny_model([TOK.eos_token_id])
    engine = Engine(model, TOK, EngineConfig(max_batch_size=4, max_batched_tokens=6)).start()
    try:
        choices = engine.generate([PROMPTS[3]], SamplingParams(max_tokens=10, temperature=0.9, seed=7,
                                                               ignore_eos=True), n=3, timeout=60)
        prefilled = engine.counters["prefill_tokens"]
    finally:
        engine.stop()
    assert prefilled == len(PROMPTS[3])
    for j, events in enumerate(choices):
        assert tokens(events) == reference(model, PROMPTS[3], 10, do_sample=True, temperature=0.9, top_k=0,
                                           seed=7 + j, eos_token_id=[])


def test_running_rows_keep_decoding_while_a_long_prompt_is_prefilled():
    """The budget's point: a running stream gets a token at every step in which a long prompt's chunk is
    prefilled, instead of waiting for the whole prompt."""
    model = tiny_model([TOK.eos_token_id])
    engine = Engine(model, TOK, EngineConfig(max_batch_size=2, max_batched_tokens=5)).start()
    seen_prefilling: list[int] = []
    started = threading.Event()

    def running(output: Output) -> None:
        seen_prefilling.append(engine.num_prefilling)
        started.set()

    try:
        engine.submit([PROMPTS[0]], SamplingParams(max_tokens=60, temperature=0, ignore_eos=True), 1, running)
        assert started.wait(30)
        engine.generate([PROMPTS[3]], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True), timeout=60)
    finally:
        engine.stop()
    # The long prompt needs >= len/4 steps (4 of each 5 tokens go to it); the stream decoded in each.
    assert seen_prefilling.count(1) >= len(PROMPTS[3]) // 4 - 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_batched_tokens=8), "must exceed max_batch_size 8"),
    (dict(max_batched_tokens=-1), "max_batched_tokens must be an integer >= 0"),
    (dict(request_timeout=0), "request_timeout must be a number of seconds > 0"),
    (dict(prefill_chunk_tokens=-1), "prefill_chunk_tokens must be an integer >= 0"),
    (dict(prefill_chunk_tokens=True), "prefill_chunk_tokens must be an integer, got True"),
])
def test_engine_config_refuses_budgets_and_timeouts_that_cannot_work(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig(**kwargs)


def test_beside_running_streams_a_step_takes_a_small_chunk_until_a_queue_forms():
    """Stall-free steps: with rows decoding and a short queue, a step computes at most
    max(prefill_chunk_tokens, running rows) prompt tokens beside the decodes, in the same forward pass;
    with no row running, or with QUEUE_PRESSURE requests waiting, the rest of the budget. The tokens are
    those of generate() either way. (Steps driven one by one: no engine thread.)"""
    from lmforge.serve.engine import QUEUE_PRESSURE

    model = tiny_model([TOK.eos_token_id])
    engine = Engine(model, TOK, EngineConfig(max_batch_size=8, max_batched_tokens=40, prefill_chunk_tokens=3,
                                             prefix_cache_tokens=0))
    passes = spy_on_prefill(engine)
    results, done, collector = collectors(2 + QUEUE_PRESSURE)
    greedy = dict(temperature=0, ignore_eos=True)
    long = PROMPTS[3]
    engine.submit([PROMPTS[0]], SamplingParams(max_tokens=60, **greedy), 1, collector(0))
    engine._budget_step(40)  # nothing runs: the whole prompt at once
    assert passes[-1] == [(1, 0, len(PROMPTS[0]))] and engine.num_running == 1
    engine.submit([long], SamplingParams(max_tokens=4, **greedy), 1, collector(1))
    for i in range(3):  # one stream runs: 3 prompt tokens a step, beside its decode
        engine._budget_step(40)
        assert passes[-1] == [(2, 3 * i, 3)] and engine.num_running == 1
    for j in range(QUEUE_PRESSURE):  # a queue forms: the rest of the budget (39 tokens) from the next step
        engine.submit([PROMPTS[1]], SamplingParams(max_tokens=4, **greedy), 1, collector(2 + j))
    engine._budget_step(40)
    assert passes[-1] == [(2, 9, 40 - 1)]
    while engine.num_running or engine.num_waiting or engine.num_prefilling:
        engine._budget_step(40)
    assert tokens(results[0]) == reference(model, PROMPTS[0], 60, eos_token_id=[], do_sample=False)
    assert tokens(results[1]) == reference(model, long, 4, eos_token_id=[], do_sample=False)
    for j in range(QUEUE_PRESSURE):
        assert tokens(results[2 + j]) == reference(model, PROMPTS[1], 4, eos_token_id=[], do_sample=False)
    assert build_parser().parse_args(["serve", "--preset", "tiny"]).prefill_chunk_tokens \
        == EngineConfig.prefill_chunk_tokens
    assert build_parser().parse_args(["serve", "--preset", "tiny", "--prefill-chunk-tokens", "0"]
                                     ).prefill_chunk_tokens == 0


@pytest.mark.parametrize("budget", [7, 0])
def test_prompt_caches_are_left_uninitialised_and_every_position_is_written_before_it_is_read(monkeypatch, budget):
    """A prompt's one-row cache is not zeroed (tens of megabytes of fresh pages a request): with its
    memory NaN, chunked, packed, reused and whole prefills still give the tokens of generate()."""
    from lmforge.model import KVCache

    init = KVCache.__init__

    def nan_filled(self, *args, zeroed=True, **kwargs):
        init(self, *args, zeroed=zeroed, **kwargs)
        if not zeroed:
            self.k.fill_(float("nan")), self.v.fill_(float("nan"))

    monkeypatch.setattr(KVCache, "__init__", nan_filled)
    model = tiny_model([TOK.eos_token_id])
    prompts = PROMPTS + [PROMPTS[3] + PROMPTS[1]]  # the last reuses the cached PROMPTS[3]
    engine = Engine(model, TOK, EngineConfig(max_batch_size=3, max_batched_tokens=budget, prefill_chunk_tokens=1))
    engine.start()
    try:
        for prompt in prompts:
            [events] = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                                       timeout=60)
            assert tokens(events) == reference(model, prompt, 6, eos_token_id=[], do_sample=False)
        assert engine.counters["prefix_cache_hits"] >= 1
    finally:
        engine.stop()


def slow(engine: Engine, seconds: float) -> Engine:
    """Each decode step and each prefill pass (with or without decodes) takes `seconds` longer (requests
    overlap in time)."""
    step, forward = engine._step, engine._forward_chunks
    engine._step = lambda: (time.sleep(seconds), step())[1]
    engine._forward_chunks = lambda plan, rows=None: (time.sleep(seconds), forward(plan, rows))[1]
    return engine


def test_a_failed_step_of_decodes_and_chunks_fails_both_and_the_engine_carries_on():
    """An error in a forward pass that decodes running rows and prefills a chunk: the running request
    and the prefilling one end with an error, their rows are freed, the error is counted once, and the
    engine serves the next request as generate() does."""
    from lmforge.model import PackedKVCache

    model = tiny_model([TOK.eos_token_id])
    engine = slow(Engine(model, TOK, EngineConfig(max_batch_size=4, max_batched_tokens=40,
                                                  prefill_chunk_tokens=3)), 0.01).start()
    events: dict[str, list[Output]] = {"running": [], "prefilling": []}
    started = threading.Event()
    forward = model.forward_blocks

    def broken(*args, **kwargs):
        if isinstance(args[4], PackedKVCache) and args[4].rows is not None:
            raise RuntimeError("device lost")
        return forward(*args, **kwargs)

    greedy = dict(temperature=0, ignore_eos=True)
    try:
        engine.submit([PROMPTS[0]], SamplingParams(max_tokens=50, **greedy), 1,
                      lambda o: (events["running"].append(o), started.set()))
        assert started.wait(30)
        model.forward_blocks = broken
        engine.submit([PROMPTS[3]], SamplingParams(max_tokens=4, **greedy), 1, events["prefilling"].append)
        deadline = time.monotonic() + 30
        while any(not e or e[-1].error is None for e in events.values()) and time.monotonic() < deadline:
            time.sleep(0.01)
        model.forward_blocks = forward
        assert events["prefilling"][-1].error == "internal error during prefill: RuntimeError: device lost"
        assert events["running"][-1].error == "internal error during decoding: RuntimeError: device lost"
        assert engine.counters["scheduler_errors"] == 1
        [after] = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=5, **greedy), timeout=30)
        assert tokens(after) == reference(model, PROMPTS[1], 5, eos_token_id=[], do_sample=False)
        assert (engine.num_running, engine.num_prefilling, engine.num_waiting, engine._admitting) == (0, 0, 0, 0)
    finally:
        model.forward_blocks = forward
        engine.stop()


@pytest.mark.parametrize("budget", [9, 0])
def test_a_request_past_its_timeout_ends_with_an_error_and_frees_its_row(budget):
    model = tiny_model([TOK.eos_token_id])
    engine = slow(Engine(model, TOK, EngineConfig(max_batch_size=1, max_batched_tokens=budget,
                                                  request_timeout=0.5)), 0.02).start()
    events: dict[str, list[Output]] = {"running": [], "waiting": []}
    try:
        for key in events:  # the second waits for the only row, and times out waiting
            engine.submit([PROMPTS[1]], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True), 1,
                          events[key].append)
        deadline = time.monotonic() + 20
        while any(not e or e[-1].error is None for e in events.values()) and time.monotonic() < deadline:
            time.sleep(0.02)
        for key, received in events.items():
            assert received[-1].error == "request timed out after 0.5 s (the server's --request-timeout)", key
            assert received[-1].code == "timeout"
        assert 0 < len(events["running"]) - 1 < 100 and len(events["waiting"]) == 1  # one ran a while
        while (engine.num_running or engine.num_waiting) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.counters["requests_timed_out"] == 2
        assert (engine.num_running, engine.num_prefilling, engine.num_waiting, engine._admitting) == (0, 0, 0, 0)
        # The row is free again: a short request completes.
        assert engine.generate([PROMPTS[0]], SamplingParams(max_tokens=3, temperature=0), timeout=20)
    finally:
        engine.stop()


def test_metrics_count_prefill_and_decode_tokens_and_render_prometheus_histograms():
    model = tiny_model([TOK.eos_token_id])
    engine = Engine(model, TOK, EngineConfig(max_batch_size=4, max_batched_tokens=8)).start()
    try:
        for prompt in PROMPTS[:3]:
            engine.generate([prompt], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), timeout=30)
    finally:
        engine.stop()
    metrics = engine.metrics()  # the thread has ended: every step's counts are in
    assert metrics["prefill_tokens"] == sum(len(p) for p in PROMPTS[:3])
    assert metrics["decode_rows"] == 3 * 4  # decoded tokens: the first comes from the prefill, then 4 each
    assert metrics["generation_tokens"] == 15
    text = _prometheus(metrics)
    for name, count in [("time_to_first_token_seconds", 3), ("inter_token_latency_seconds", 12)]:
        assert f"# TYPE lmforge_{name} histogram" in text
        buckets = [(le, int(c)) for le, c in re.findall(rf'^lmforge_{name}_bucket{{le="([^"]+)"}} (\d+)$', text, re.M)]
        assert buckets[-1] == ("+Inf", count) and [c for _, c in buckets] == sorted(c for _, c in buckets)
        assert re.search(rf"^lmforge_{name}_count {count}$", text, re.M)
        assert float(re.search(rf"^lmforge_{name}_sum (\S+)$", text, re.M).group(1)) > 0
    steps = dict(re.findall(r'^lmforge_step_tokens_bucket{le="([^"]+)"} (\d+)$', text, re.M))
    assert int(steps["+Inf"]) == metrics["engine_steps"] and int(steps["8"]) == int(steps["+Inf"])  # <= budget
    assert re.search(r"^lmforge_prefill_tokens_total \d+$", text, re.M)
    assert re.search(r"^lmforge_requests_timed_out_total 0$", text, re.M)
    assert re.search(r"^lmforge_num_prefilling 0$", text, re.M)


def idle(engine: Engine, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not (engine.num_running or engine.num_prefilling or engine.num_waiting or engine._admitting):
            return True
        time.sleep(0.01)
    return False


def test_a_client_that_cancels_during_its_prefill_chunk_frees_everything():
    model = tiny_model([TOK.eos_token_id])
    engine = slow(Engine(model, TOK, EngineConfig(max_batch_size=2, max_batched_tokens=4)), 0.02).start()
    try:
        request = engine.submit([PROMPTS[3]], SamplingParams(max_tokens=5, temperature=0))
        deadline = time.monotonic() + 20
        while engine.counters["prefill_forwards"] < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert engine.num_prefilling == 1  # part-way through its prompt
        engine.cancel(request)
        assert idle(engine)
        assert engine.counters["requests_cancelled"] == 1 and engine.counters["generation_tokens"] == 0
        events = engine.generate([PROMPTS[3]], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True),
                                 timeout=20)[0]
        assert tokens(events) == reference(model, PROMPTS[3], 5, eos_token_id=[])
    finally:
        engine.stop()


def test_a_thousand_requests_with_random_cancellations_leave_no_rows_or_requests_behind():
    """A bounded loop: at most 12 requests in flight over 4 rows; a third are cancelled at a random
    moment (waiting, prefilling or running). Every other one finishes; the engine ends empty."""
    model = tiny_model([TOK.eos_token_id])
    engine = Engine(model, TOK, EngineConfig(max_batch_size=4, max_batched_tokens=9, max_queue=64)).start()
    rng = random.Random(0)
    in_flight = threading.Semaphore(12)
    lock = threading.Lock()
    kept = 0

    def release(state: dict) -> None:
        with lock:
            if state["released"]:
                return
            state["released"] = True
        in_flight.release()
    started = time.monotonic()
    try:
        for i in range(1000):
            assert in_flight.acquire(timeout=20), "a request is stuck"
            prompt = [rng.randrange(TOK.vocab_size - 1) for _ in range(rng.randint(1, 20))]
            cancel_after = rng.choice([None, None, 0, 1, 2])  # cancel after this many events (0: at once)
            state = {"events": 0, "released": False}

            def callback(output: Output, state=state) -> None:
                state["events"] += 1
                if output.finish_reason is not None or output.error is not None:
                    release(state)

            request = engine.submit([prompt], SamplingParams(max_tokens=rng.randint(1, 4), temperature=0,
                                                             ignore_eos=True), 1, callback)
            if cancel_after is None:
                kept += 1
                continue
            while state["events"] < cancel_after and not state["released"]:
                time.sleep(0.0005)
            engine.cancel(request)
            release(state)  # a cancelled request may end without an event: free its place here
        assert idle(engine)
        assert time.monotonic() - started < 60
    finally:
        engine.stop()
    counters = engine.counters
    assert counters["requests_submitted"] == 1000 and counters["requests_rejected"] == 0
    assert counters["requests_failed"] == 0 and counters["scheduler_errors"] == 0
    assert counters["requests_finished"] >= kept
    assert (engine.num_running, engine.num_prefilling, engine.num_waiting, engine._admitting) == (0, 0, 0, 0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("scheduler") / "tiny"
    tiny_model([TOK.eos_token_id]).save_pretrained(directory, tokenizer=TOK)
    return directory


def test_the_server_answers_a_timed_out_request_with_504_or_an_error_event(model_dir):
    """Non-streaming: HTTP 504 with OpenAI's error body (code "timeout"), which the openai client raises
    as an APIStatusError; streaming: an error event, then [DONE]. The rows are free afterwards."""
    import httpx
    import openai

    from test_serve import running_server

    engine_kw = dict(max_batch_size=2, max_batched_tokens=16, request_timeout=0.3)
    with running_server(model_dir, step_delay=0.02, engine_kw=engine_kw) as s:
        client = s.client()
        with pytest.raises(openai.APIStatusError) as caught:
            client.completions.create(model="tiny", prompt="Hello", max_tokens=100)
        assert caught.value.status_code == 504
        assert caught.value.body["code"] == "timeout" and "timed out after 0.3 s" in caught.value.body["message"]
        body = httpx.post(s.url + "/v1/completions", timeout=20, json=dict(
            model="tiny", prompt="Hello", max_tokens=100, stream=True)).text
        events = [line.removeprefix("data: ") for line in body.splitlines() if line.startswith("data: ")]
        assert '"code": "timeout"' in events[-2] and "timed out after 0.3 s" in events[-2] and events[-1] == "[DONE]"
        assert len(events) > 3  # tokens streamed before the timeout
        assert idle(s.engine) and s.engine.counters["requests_timed_out"] == 2
        assert s.metrics()["lmforge_requests_timed_out_total"] == 2


def test_the_serve_flags_take_their_defaults_from_engine_config_and_refuse_a_budget_too_small(capsys):
    from lmforge.cli import build_parser, main

    args = build_parser().parse_args(["serve", "--preset", "tiny"])
    assert (args.max_batched_tokens, args.request_timeout) == (EngineConfig.max_batched_tokens, None)
    args = build_parser().parse_args(["serve", "--preset", "tiny", "--max-batched-tokens", "0",
                                      "--request-timeout", "2.5"])
    assert (args.max_batched_tokens, args.request_timeout) == (0, 2.5)
    assert main(["serve", "--preset", "tiny", "--max-batch-size", "8", "--max-batched-tokens", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_batched_tokens 8 must exceed max_batch_size 8" in err[0]
