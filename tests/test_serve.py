"""The OpenAI-compatible server, end to end: the official `openai` client against a real uvicorn
server on a free loopback port with a tiny random model, the continuous-batching engine, and a
`lmforge serve` subprocess stopped with SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx
import openai
import pytest
import torch

from lmforge import GPT, GPTConfig, Tokenizer, load_model
from lmforge.serve import ChatTemplate, Engine, EngineConfig, SamplingParams, ServerConfig, create_app
from lmforge.serve.app import bind_socket
from lmforge.model import RaggedRows

NAME = "tiny"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = Tokenizer.byte_level()
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=tok.vocab_size, n_positions=128,
                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT(config)
    with torch.no_grad():  # sharper distributions than the 0.02 init: greedy argmaxes are far from ties
        model.transformer.wte.weight.mul_(20)
    directory = tmp_path_factory.mktemp("serve") / NAME
    model.save_pretrained(directory, tokenizer=tok)
    return directory


@dataclass
class Running:
    url: str
    engine: Engine

    def client(self, **kw) -> openai.OpenAI:
        kw.setdefault("api_key", "none")
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, timeout=30, **kw)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", headers=self.headers, timeout=10).text
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M)}

    headers: dict | None = None


@contextlib.contextmanager
def running_server(model_dir, step_delay: float = 0.0, chat_template: ChatTemplate | None = None,
                   engine_kw: dict | None = None, **server_kw):
    """A real uvicorn server in a thread on a free loopback port; always shut down."""
    import uvicorn

    model = load_model(model_dir, device="cpu")
    engine = Engine(model, Tokenizer.from_pretrained(model_dir), EngineConfig(**(engine_kw or {"max_batch_size": 4})))
    if step_delay:  # slow decoding down so that requests overlap in time deterministically
        step = engine._step
        engine._step = lambda: (time.sleep(step_delay), step())[1]
    app = create_app(engine, ServerConfig(**server_kw), chat_template, model_name=NAME)
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        headers = {"Authorization": f"Bearer {server_kw['api_key']}"} if server_kw.get("api_key") else None
        yield Running(f"http://127.0.0.1:{port}", engine, headers)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@pytest.fixture(scope="module")
def server(model_dir):
    with running_server(model_dir) as s:
        yield s


def reference_greedy(model_dir, prompt: str, n: int) -> list[int]:
    model = load_model(model_dir, device="cpu")
    ids = Tokenizer.from_pretrained(model_dir).encode(prompt)
    return model.generate([ids], max_new_tokens=n, eos_token_id=[])[0, len(ids):].tolist()


def text_of(model_dir, ids: list[int]) -> str:
    return Tokenizer.from_pretrained(model_dir).decode(ids, skip_special_tokens=True)


# ---- the openai client: completions, chat, streaming, n, stop ---------------------------------


def test_completion_matches_the_model_and_counts_usage(server, model_dir):
    client = server.client()
    out = client.completions.create(model=NAME, prompt="Hello there", max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    ref = reference_greedy(model_dir, "Hello there", 12)
    assert out.object == "text_completion" and out.model == NAME and out.id.startswith("cmpl-")
    assert out.choices[0].text == text_of(model_dir, ref)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (11, 12, 23)


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [NAME]
    assert httpx.get(server.url + "/health").status_code == 200


def test_chat_uses_the_template_and_counts_usage(server, model_dir):
    client = server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
    prompt = ChatTemplate().render(messages)
    assert prompt == "Be brief.\n\nUser: Hi!\nAssistant:"
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert isinstance(out.choices[0].message.content, str)
    assert out.usage.prompt_tokens == len(Tokenizer.from_pretrained(model_dir).encode(prompt))
    assert out.usage.completion_tokens == out.usage.total_tokens - out.usage.prompt_tokens >= 1


def test_streaming_completion_equals_the_non_streamed_text(server):
    client = server.client()
    args = dict(model=NAME, prompt="Once upon a time", max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**args).choices[0].text
    chunks = list(client.completions.create(stream=True, **args))
    assert len(chunks) > 1
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 20  # usage rides on the last chunk


def test_streaming_chat_sends_role_then_deltas_then_usage_then_done(server):
    client = server.client()
    stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hello"}],
                                            max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    # The raw stream is OpenAI's: data: lines, ending with data: [DONE].
    body = {"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": True}
    raw = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_n_samples_are_indexed_and_reproducible_with_a_seed(server):
    client = server.client()
    args = dict(model=NAME, prompt="abc", max_tokens=16, temperature=1.0, n=3, seed=7, extra_body={"ignore_eos": True})
    a, b = client.completions.create(**args), client.completions.create(**args)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # different samples, not copies
    assert a.usage.completion_tokens == 48 and a.usage.prompt_tokens == 3
    streamed = list(client.completions.create(stream=True, **args))
    texts = ["".join(c.choices[0].text for c in streamed if c.choices and c.choices[0].index == i) for i in range(3)]
    assert texts == [c.text for c in a.choices]
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], n=2, max_tokens=4)
    assert [c.index for c in chat.choices] == [0, 1]


def test_stop_sequences_cut_the_text_streamed_or_not(server):
    client = server.client()
    args = dict(model=NAME, prompt="The stop test", max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**args).choices[0].text
    stop = next(full[i:i + 2] for i in range(4, len(full) - 2) if "\ufffd" not in full[i:i + 2])
    cut = full[: full.find(stop)]
    out = client.completions.create(stop=[stop, "never-there"], **args)
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(stop=stop, stream=True, **args))
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs_are_the_models(server, model_dir):
    out = server.client().completions.create(model=NAME, prompt="Hi", max_tokens=3, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert all(len(top) == 2 for top in lp.top_logprobs)
    model = load_model(model_dir, device="cpu")
    ids = Tokenizer.from_pretrained(model_dir).encode("Hi")
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1).max().item()
    assert lp.token_logprobs[0] == pytest.approx(expected, abs=1e-4)
    assert max(lp.top_logprobs[0].values()) == pytest.approx(expected, abs=1e-4)


def test_frequency_penalty_changes_greedy_repetition(server):
    client = server.client()
    args = dict(model=NAME, prompt="zz", max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(**args).choices[0].text
    penalized = client.completions.create(frequency_penalty=2.0, presence_penalty=0.5, **args).choices[0].text
    assert len(set(penalized)) > len(set(plain))
    forced = client.completions.create(logit_bias={"65": 100}, **args).choices[0].text
    assert forced == "A" * 30  # id 65 is the byte "A"


# ---- bad requests: OpenAI error bodies and the client's error classes -------------------------


def test_bad_requests_raise_the_matching_client_errors(server):
    client = server.client()
    ok = dict(model=NAME, prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(**{**ok, "model": "gpt-17"})
    assert "gpt-17" in e.value.body["message"] if isinstance(e.value.body, dict) else True
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(**{**ok, "max_tokens": 500})
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(**{**ok, "prompt": "x" * 200})
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(**ok, extra_body={"temperature": "hot"})
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(**{**ok, "temperature": 3})
    with pytest.raises(openai.BadRequestError, match="max-batch-size"):
        client.completions.create(**{**ok, "n": 50})
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=NAME, messages=[])
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        client.completions.create(**{**ok, "prompt": [1, 2, 99999]})
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(**ok, logit_bias={"99999": 5})
    # The server keeps serving.
    assert client.completions.create(**ok).usage.completion_tokens >= 1


def test_malformed_and_oversized_bodies_get_error_bodies(server):
    url = server.url + "/v1/completions"
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(url, json={"model": NAME, "prompt": "x" * 2_000_000})
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(url, content=iter([b'{"prompt": "', b"y" * 1_100_000, b'"}']),
                   headers={"content-type": "application/json"})  # chunked: no Content-Length
    assert r.status_code == 413 and "error" in r.json()
    r = httpx.post(url, json={"model": NAME})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert httpx.get(server.url + "/v1/nothing").json()["error"]["message"] == "Not Found"
    assert httpx.post(url, json={"model": NAME, "prompt": "ok", "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_megabyte_of_garbage_gets_an_error_body_and_the_server_carries_on(server, path):
    garbage = os.urandom(1_000_000)  # the body limit exactly: it reaches the JSON parser
    for headers in ({"content-type": "application/json"}, {"content-type": "application/octet-stream"}, {}):
        r = httpx.post(server.url + path, content=garbage, headers=headers, timeout=30)
        assert r.status_code == 400, (headers, r.status_code, r.text[:200])
        assert r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server.url + path, content=garbage + os.urandom(48_576), timeout=30)  # 1 MiB: over the limit
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.get(server.url + "/health").text == "ok"
    out = server.client().completions.create(model=NAME, prompt="after garbage", max_tokens=3)
    assert out.usage.completion_tokens == 3


def test_max_tokens_far_past_the_context_is_refused_and_the_server_carries_on(server):
    client = server.client()
    for max_tokens in (10**6, 2**63 - 1, 10**30):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=NAME, prompt="hi", max_tokens=max_tokens)
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=max_tokens)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=NAME, prompt="hi", max_tokens=10**6, stream=True)
    assert server.metrics()["lmforge_num_running"] == 0
    assert client.completions.create(model=NAME, prompt="hi", max_tokens=4).usage.completion_tokens == 4


def test_api_key_guards_every_route_but_health(model_dir):
    with running_server(model_dir, api_key="sekrit") as s:
        assert httpx.get(s.url + "/health").status_code == 200
        for path in ("/v1/models", "/metrics"):
            r = httpx.get(s.url + path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").completions.create(model=NAME, prompt="a", max_tokens=1)
        assert s.client(api_key="sekrit").completions.create(model=NAME, prompt="a", max_tokens=1).choices


# ---- continuous batching ----------------------------------------------------------------------


def test_requests_join_and_leave_the_running_batch(model_dir):
    with running_server(model_dir, step_delay=0.004) as s:
        client = s.client()
        finished: dict[str, float] = {}
        long = client.completions.create(model=NAME, prompt="long one", max_tokens=100, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True})
        pieces = iter(long)
        for _ in range(5):  # A is running
            next(pieces)
        started = time.monotonic()
        short = client.completions.create(model=NAME, prompt="short", max_tokens=5, temperature=0,
                                          extra_body={"ignore_eos": True})
        finished["short"] = time.monotonic()
        rest = list(pieces)
        finished["long"] = time.monotonic()
        assert rest[-1].choices[0].finish_reason == "length"
        assert short.usage.completion_tokens == 5
        # B joined A's batch mid-flight and left long before A finished: no waiting for the slowest.
        assert finished["short"] < finished["long"]
        assert finished["short"] - started < 0.5 * (finished["long"] - started + (finished["short"] - started))
        m = s.metrics()
        assert m["lmforge_joined_running_batch_total"] >= 1
        assert m['lmforge_batch_size_steps{size="2"}'] >= 4  # B's steps ran batched with A
        assert m['lmforge_batch_size_steps{size="1"}'] >= 50  # A ran on alone after B left


def test_greedy_output_is_the_same_alone_and_batched(server, model_dir):
    client = server.client()
    args = dict(model=NAME, prompt="Batched or not", max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    alone = client.completions.create(**args).choices[0].text
    assert alone == text_of(model_dir, reference_greedy(model_dir, "Batched or not", 40))
    results: dict[int, str] = {}

    def other(i: int) -> None:  # different prompt lengths, sampling, arriving at different times
        time.sleep(0.01 * i)
        out = client.completions.create(model=NAME, prompt="x" * (3 + 15 * i), max_tokens=10 + 10 * i,
                                        temperature=0.9, seed=i, extra_body={"ignore_eos": True})
        results[i] = out.choices[0].text

    before = server.metrics()
    threads = [threading.Thread(target=other, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.02)
    batched = client.completions.create(**args).choices[0].text
    for t in threads:
        t.join()
    assert batched == alone and len(results) == 3
    after = server.metrics()
    assert after["lmforge_max_batch_seen"] >= 2
    assert after["lmforge_joined_running_batch_total"] > before["lmforge_joined_running_batch_total"]


def test_engine_handles_long_and_short_prompts_together(model_dir):
    """Rows of very different lengths joining and leaving keep every row equal to its solo greedy decode."""
    model = load_model(model_dir, device="cpu")
    tok = Tokenizer.from_pretrained(model_dir)
    engine = Engine(model, tok, EngineConfig(max_batch_size=3, max_model_len=128)).start()
    try:
        prompts = [tok.encode("a"), tok.encode("b" * 90), tok.encode("medium prompt here")]
        lengths = [120, 30, 60]
        outs: dict[int, list[int]] = {}

        def go(i: int) -> None:
            time.sleep(0.005 * i)
            events = engine.generate([prompts[i]], SamplingParams(max_tokens=lengths[i], temperature=0,
                                                                  ignore_eos=True), timeout=60)
            outs[i] = [e.token_id for e in events[0]]

        threads = [threading.Thread(target=go, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(3):
            ref = model.generate([prompts[i]], max_new_tokens=lengths[i], eos_token_id=[])[0, len(prompts[i]):]
            assert outs[i] == ref.tolist(), i
        assert engine.counters["max_batch_seen"] == 3
    finally:
        engine.stop()


def test_full_queue_answers_429_at_once(model_dir):
    with running_server(model_dir, step_delay=0.01, engine_kw={"max_batch_size": 1, "max_queue": 1}) as s:
        client = s.client()
        stream = client.completions.create(model=NAME, prompt="a", max_tokens=100, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))
        waiting = threading.Thread(target=lambda: client.completions.create(model=NAME, prompt="b", max_tokens=2))
        waiting.start()
        deadline = time.monotonic() + 10
        while s.metrics()["lmforge_num_waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        t0 = time.monotonic()
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model=NAME, prompt="c", max_tokens=2)
        assert time.monotonic() - t0 < 2 and e.value.status_code == 429
        stream.close()  # the streaming client leaves; the waiting request gets the slot
        waiting.join(timeout=20)
        assert not waiting.is_alive()


def test_a_burst_beyond_the_queue_bound_gets_429s_and_the_server_recovers(model_dir):
    with running_server(model_dir, step_delay=0.005, engine_kw={"max_batch_size": 2, "max_queue": 3}) as s:
        body = {"model": NAME, "prompt": "burst", "max_tokens": 50, "ignore_eos": True}
        statuses: list[int] = []

        def post() -> None:
            statuses.append(httpx.post(s.url + "/v1/completions", json=body, timeout=60).status_code)

        burst = [threading.Thread(target=post) for _ in range(24)]
        for t in burst:
            t.start()
        for t in burst:
            t.join(timeout=60)
        assert len(statuses) == 24 and set(statuses) <= {200, 429}, statuses
        assert statuses.count(429) >= 1 and statuses.count(200) >= 5  # 2 running + 3 waiting at least
        m = s.metrics()
        assert m["lmforge_num_running"] == 0 and m["lmforge_num_waiting"] == 0
        assert httpx.get(s.url + "/health").status_code == 200
        out = s.client().completions.create(model=NAME, prompt="later", max_tokens=5, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 5


def test_a_client_that_disconnects_frees_its_slot(model_dir):
    with running_server(model_dir, step_delay=0.01) as s:
        body = {"model": NAME, "prompt": "bye", "max_tokens": 110, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert s.metrics()["lmforge_num_running"] == 1
        t0 = time.monotonic()  # ~1.1 s of decoding left when the client went away
        while s.metrics()["lmforge_num_running"] != 0:
            assert time.monotonic() - t0 < 0.8, "the slot was not freed"
            time.sleep(0.01)
        assert s.metrics()["lmforge_requests_cancelled_total"] == 1
        out = s.client().completions.create(model=NAME, prompt="next", max_tokens=5, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"


def test_a_crash_inside_one_request_fails_only_that_request(model_dir):
    with running_server(model_dir, step_delay=0.002) as s:
        client = s.client()
        engine = s.engine
        deliver = engine._deliver

        def faulty(seq, token):
            if seq.request.params.seed == 666 and len(seq.output) == 3:
                raise RuntimeError("injected fault")
            return deliver(seq, token)

        engine._deliver = faulty
        results = {}
        t = threading.Thread(target=lambda: results.update(ok=client.completions.create(
            model=NAME, prompt="fine", max_tokens=30, temperature=0, extra_body={"ignore_eos": True})))
        t.start()
        with pytest.raises(openai.InternalServerError, match="injected fault"):
            client.completions.create(model=NAME, prompt="boom", max_tokens=30, seed=666,
                                      extra_body={"ignore_eos": True})
        t.join()
        assert results["ok"].usage.completion_tokens == 30
        # A crash in the batched forward fails the running requests, and the scheduler carries on.
        forward = engine.model.forward_blocks
        calls = {"n": 0}

        def broken(*args, **kwargs):
            if isinstance(args[4], RaggedRows):  # a decode step (a prefill runs in its own KVCache)
                calls["n"] += 1
                if calls["n"] == 3:
                    raise RuntimeError("device lost")
            return forward(*args, **kwargs)

        engine.model.forward_blocks = broken
        stream = client.completions.create(model=NAME, prompt="s", max_tokens=20, stream=True,
                                           extra_body={"ignore_eos": True})
        with pytest.raises(openai.APIError, match="device lost"):
            list(stream)
        assert client.completions.create(model=NAME, prompt="again", max_tokens=5).usage.completion_tokens == 5
        assert s.metrics()["lmforge_scheduler_errors_total"] == 1


# ---- text: UTF-8 boundaries, stop strings across tokens, chat templates -----------------------


def test_stream_pieces_never_split_a_character(model_dir):
    tok = Tokenizer.from_pretrained(model_dir)
    script = tok.encode("héllo wörld 👋 ok STOP never")

    with running_server(model_dir) as s:
        s.engine._choose = lambda logits, seqs: [script[len(q.output)] for q in seqs]
        client = s.client()
        chunks = list(client.completions.create(model=NAME, prompt="p", max_tokens=len(script), stream=True,
                                                extra_body={"ignore_eos": True}))
        pieces = [c.choices[0].text for c in chunks if c.choices[0].text]
        assert "".join(pieces) == "héllo wörld 👋 ok STOP never"
        assert "\ufffd" not in "".join(pieces) and len(pieces) < len(script)  # multi-byte chars came whole
        chunks = list(client.completions.create(model=NAME, prompt="p", max_tokens=len(script), stream=True,
                                                stop=["STOP"], extra_body={"ignore_eos": True}))
        assert "".join(c.choices[0].text for c in chunks) == "héllo wörld 👋 ok "
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_template_can_be_overridden(model_dir, tmp_path):
    source = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    path = tmp_path / "t.jinja"
    path.write_text(source)
    template = ChatTemplate.load(str(path))
    assert template.render([{"role": "user", "content": "hey"}]) == "<user>hey<assistant>"
    assert template.stop == [] and ChatTemplate.load(None).stop == ["\nUser:"]
    with running_server(model_dir, chat_template=template) as s:
        out = s.client().chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hey"}],
                                                 max_tokens=2)
        assert out.usage.prompt_tokens == len("<user>hey<assistant>")
    with pytest.raises(Exception, match="no such file"):
        ChatTemplate.load("missing.jinja")


# ---- the real command: lmforge serve, SIGTERM ------------------------------------------------


def _start_serve(model_dir, *flags: str) -> tuple[subprocess.Popen, str]:
    """A real `lmforge serve` subprocess on a free port; returns it and its URL once /health answers."""
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--model", str(model_dir), "--port", "0",
                             "--device", "cpu", "--log-level", "warning", *flags], stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    assert match, line
    url = f"http://127.0.0.1:{match.group(1)}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and proc.poll() is None, "server did not come up"
        time.sleep(0.1)


@contextlib.contextmanager
def _serving(model_dir, *flags: str):
    proc, url = _start_serve(model_dir, *flags)
    try:
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_lmforge_serve_stops_gracefully_on_sigterm(model_dir):
    with _serving(model_dir, "--shutdown-timeout", "20") as (proc, url):
        body = {"model": NAME, "prompt": "in flight", "max_tokens": 100, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"  # the running request finished
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=2)


def test_sigterm_during_a_burst_gives_every_stream_a_clean_end(tmp_path):
    """12 long streams on 4 rows, SIGTERM once all have their response: each stream ends with its
    finish_reason or with an error event of code "shutdown", always followed by [DONE]; new requests
    are refused; the process exits 0 well within --shutdown-timeout plus the grace period."""
    tok = Tokenizer.byte_level()
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=tok.vocab_size, n_positions=2048,
                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPT(config).save_pretrained(tmp_path / NAME, tokenizer=tok)
    with _serving(tmp_path / NAME, "--shutdown-timeout", "0.5", "--max-batch-size", "4") as (proc, url):
        body = {"model": NAME, "max_tokens": 1500, "stream": True, "ignore_eos": True}
        streams: list[list[str]] = [[] for _ in range(12)]
        started = threading.Barrier(len(streams) + 1, timeout=60)

        def client(i: int) -> None:
            with httpx.stream("POST", url + "/v1/completions", json={**body, "prompt": f"request {i}"},
                              timeout=60) as r:
                streams[i].append(str(r.status_code))
                started.wait()
                streams[i] += [line for line in r.iter_lines() if line]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(streams))]
        for t in threads:
            t.start()
        started.wait()
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        with contextlib.suppress(httpx.TransportError):  # refused outright, or 503 while draining
            assert httpx.post(url + "/v1/completions", json={**body, "prompt": "late"}, timeout=10).status_code == 503
        for t in threads:
            t.join(timeout=60)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - stopped < 0.5 + 5.0 + 3.0
    ends = []
    for lines in streams:
        assert lines[0] == "200" and lines[-1] == "data: [DONE]", lines[-3:]
        last = json.loads(lines[-2][6:])
        ends.append(last["error"]["code"] if "error" in last else last["choices"][0]["finish_reason"])
    assert set(ends) <= {"shutdown", "length"} and "shutdown" in ends, ends


def test_cli_rejects_bad_flags_with_one_line(model_dir):
    r = subprocess.run([sys.executable, "-m", "lmforge", "serve", "--model", str(model_dir), "--max-batch-size", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "max_batch_size must be an integer >= 1" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ---- benchmarks/serve_load.py: the load test's smoke run ----------------------------------------


@pytest.mark.slow  # ~20 s, lmforge alone (tests/test_benchmarks.py runs the peers too)
def test_serve_load_benchmark_quick_run_has_no_errors():
    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "serve_load.py")
    r = subprocess.run([sys.executable, script, "--quick", "--peers", ""], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    figures = {f["name"]: f for f in map(json.loads, r.stdout.splitlines())}
    assert figures["serve_load_errors"]["value"] == figures["serve_load_errors"]["peer"] == 0
    assert figures["serve_load_incomplete"]["value"] == figures["serve_load_incomplete"]["peer"] == 0
    rate = figures["serve_load_output_tokens_per_s"]
    assert rate["value"] > 0 and rate["peer"] > 0 and rate["conditions"]["clients"] == 8
    assert figures["serve_load_ttft_p99"]["value"] >= figures["serve_load_ttft_p50"]["value"] > 0
