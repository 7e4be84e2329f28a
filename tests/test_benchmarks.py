"""The pure helpers of benchmarks/generate.py, benchmarks/llamacpp.py and benchmarks/serve_load.py (the
scripts themselves are run by hand: `python benchmarks/generate.py --quick` is their smoke run; serve_load's
--quick run is a slow test here)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

import lmforge

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _record(n_prompt, n_gen, avg_ts, **extra):
    # the fields llama-bench -o json writes per test (a subset; values as it types them)
    return dict(build_commit="abc1234", build_number=1, cpu_info="Intel Xeon", gpu_info="", backends="CPU",
                model_filename="m-f32.gguf", model_type="gpt2 ?B all F32", model_size=497759232,
                model_n_params=124439808, n_batch=2048, n_ubatch=512, n_threads=2, n_prompt=n_prompt,
                n_gen=n_gen, n_depth=0, test_time="2025-01-01T00:00:00Z",
                avg_ns=int(1e9 * max(n_prompt, n_gen) / avg_ts), stddev_ns=1000, avg_ts=avg_ts, stddev_ts=0.5, samples_ns=[1], samples_ts=[avg_ts], **extra)


def test_parse_bench_json_reads_decode_and_prefill_rates():
    llamacpp = _load("llamacpp")
    text = json.dumps([_record(512, 0, 401.25), _record(0, 64, 73.5)], indent=2)
    out = llamacpp.parse_bench_json(text)
    assert out["pp"] == 401.25 and out["tg"] == 73.5
    assert out["tg_stddev"] == 0.5 and out["build_commit"] == "abc1234"
    assert out["type"] == "gpt2 ?B all F32" and len(out["records"]) == 2
    only_tg = llamacpp.parse_bench_json(json.dumps([_record(0, 128, 199.1)]))
    assert only_tg["tg"] == 199.1 and "pp" not in only_tg


def test_find_is_none_without_a_build(tmp_path):
    llamacpp = _load("llamacpp")
    assert llamacpp.find(tmp_path) is None
    src = tmp_path / "llama_cpp_python-0.3.0" / "vendor" / "llama.cpp"
    src.mkdir(parents=True)
    (src / "convert_hf_to_gguf.py").write_text("")
    assert llamacpp.find(tmp_path) is None  # sources but no llama-bench yet
    bench = tmp_path / "build" / "bin" / "llama-bench"
    bench.parent.mkdir(parents=True)
    bench.write_text("#!/bin/sh\n")
    bench.chmod(0o755)
    found = llamacpp.find(tmp_path)
    assert found["bench"] == str(bench) and found["version"] == "0.3.0"
    assert found["gguf_py"] == str(src / "gguf-py")


def test_greedy_agreement_counts_positions_prefixes_and_identical_runs():
    generate = _load("generate")
    ref = [[1, 2, 3, 4], [5, 6, 7, 8]]
    other = [[1, 2, 3, 4], [5, 9, 7, 8]]  # one token differs, the rest agree again
    a = generate.greedy_agreement(ref, other)
    assert a["token_agreement"] == 7 / 8
    assert a["prefix_agreement"] == 5 / 8  # 4 + 1 tokens before the first difference
    assert a["identical"] == 1 and a["continuations"] == 2 and a["tokens"] == 8


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_weight_bytes_per_token(quantize):
    """Every weight once; a tied embedding once (as the LM head); one row of the position table; an
    int8 model reads its int8 head plus one float row of the embedding."""
    generate = _load("generate")
    config = lmforge.GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=16)
    model = lmforge.GPT(config).eval()
    if quantize:
        model.quantize(quantize)
    got = generate.weight_bytes_per_token(model)
    C, V = 32, 100
    block_linear = 3 * C * C + C * C + 4 * C * C + 4 * C * C  # c_attn, attn c_proj, c_fc, mlp c_proj
    block_bias = 3 * C + C + 4 * C + C
    norms = (2 * 2 + 1) * 2 * C  # ln_1, ln_2 per block, ln_f: weight + bias
    if quantize is None:
        expected = 4 * (2 * (block_linear + block_bias) + norms + V * C + C)
    else:
        scales = 2 * (3 * C + C + 4 * C + C) + V
        expected = 2 * block_linear + V * C + 4 * (scales + 2 * block_bias + norms + C + C)
    assert got == expected


# ---- benchmarks/serve_load.py: workloads, stream checks, peers ----------------------------------


def test_serve_load_prompts_have_the_asked_lengths_and_poisson_arrivals_the_rate(tmp_path):
    serve_load = _load("serve_load")
    tokenizer = serve_load.gpt2_shaped_tokenizer(1000, tmp_path)
    requests = serve_load.mixed_requests(tokenizer, 40, (16, 64), (4, 9), context=1024, seed=1)
    lengths = [len(ids) for ids in tokenizer.encode_batch([r.prompt for r in requests])]
    assert 16 <= min(lengths) and max(lengths) <= 64 and len(set(lengths)) > 10  # mixed, within the range
    assert {r.max_tokens for r in requests} <= set(range(4, 10)) and len({r.max_tokens for r in requests}) > 3
    capped = serve_load.mixed_requests(tokenizer, 5, (500, 500), (30, 30), context=100, seed=1)
    assert all(len(ids) + 30 <= 100 for ids in tokenizer.encode_batch([r.prompt for r in capped]))

    many = [serve_load.Request("x", 1)] * 4000
    times = [r.at for r in serve_load.poisson(many, 20.0, seed=2)]
    assert times[0] == 0 and times == sorted(times) and len(set(times)) == len(times)
    assert abs(times[-1] / (len(times) - 1) - 1 / 20) < 0.1 / 20  # mean gap 1/rate
    assert times == [r.at for r in serve_load.poisson(many, 20.0, seed=2)]  # every server gets the same ones
    assert serve_load.nearest_rank([3.0, 1.0, 2.0, 4.0], 0.5) == 2.0
    assert serve_load.nearest_rank([3.0, 1.0, 2.0, 4.0], 0.99) == 4.0


def _sse(*chunks, done=True):
    lines = [f"data: {json.dumps(c)}\n\n" for c in chunks] + (["data: [DONE]\n\n"] if done else [])
    return "".join(lines).encode()


def _text(t, finish=None, usage=None):
    return {"choices": [{"index": 0, "text": t, "finish_reason": finish}], **({"usage": usage} if usage else {})}


@pytest.mark.parametrize("case", ["lmforge_ok", "lmforge_no_done", "lmforge_short", "transformers_stop",
                                  "transformers_no_done", "error_event", "http_429", "no_usage"])
def test_serve_load_stream_check_counts_complete_incomplete_and_errors(case):
    import asyncio

    import httpx

    serve_load = _load("serve_load")
    lmforge_peer = serve_load.Peer("lmforge", "bench", ignore_eos=True, sends_done=True)
    transformers_peer = serve_load.Peer("transformers", "/m", ignore_eos=False, sends_done=False)
    usage3 = {"completion_tokens": 3, "prompt_tokens": 5, "total_tokens": 8}
    peer, status, body = lmforge_peer, 200, _sse(_text("a"), _text("b"), _text("c", "length", usage3))
    if case == "lmforge_no_done":
        body = _sse(_text("a"), _text("b"), _text("c", "length", usage3), done=False)
    elif case == "lmforge_short":  # ignore_eos was sent: a stop before max_tokens is a broken promise
        body = _sse(_text("a"), _text("b", "stop", {**usage3, "completion_tokens": 2}))
    elif case == "transformers_stop":  # transformers serve cannot be told to ignore eos: an early stop is fine
        peer, body = transformers_peer, _sse(_text("a"), _text("", "stop", {**usage3, "completion_tokens": 1}),
                                             done=False)
    elif case == "transformers_no_done":
        peer, body = transformers_peer, _sse(_text("a"), _text("b"), _text("c"), _text("", "length", usage3),
                                             done=False)
    elif case == "error_event":
        body = _sse(_text("a"), {"error": {"message": "request timed out"}})
    elif case == "http_429":
        status, body = 429, b'{"error": {"message": "queue full"}}'
    elif case == "no_usage":
        body = _sse(_text("a"), _text("b"), _text("c", "length"))
    seen = []

    def handler(request):
        seen.append(json.loads(request.content))
        return httpx.Response(status, content=body, headers={"content-type": "text/event-stream"})

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://x") as http:
            return await serve_load.stream_one(http, peer, serve_load.Request("hello", 3))

    result = asyncio.run(go())
    assert seen[0]["prompt"] == "hello" and seen[0]["max_tokens"] == 3 and seen[0]["stream"] is True
    assert ("ignore_eos" in seen[0]) == (peer is lmforge_peer)  # transformers serve refuses unknown fields
    complete = result.error is None and result.incomplete is None
    assert complete == (case in ("lmforge_ok", "transformers_stop", "transformers_no_done"))
    assert (result.error is not None) == (case in ("error_event", "http_429"))
    if case in ("lmforge_ok", "transformers_no_done"):
        assert result.text == "abc" and result.tokens == 3 and result.ttft > 0
        assert len(result.gaps) == 2  # inter-token latencies: between text chunks, not the empty last one


def test_serve_load_names_the_missing_serving_extras(monkeypatch):
    serve_load = _load("serve_load")
    real = serve_load.importlib.util.find_spec
    monkeypatch.setattr(serve_load.importlib.util, "find_spec",
                        lambda name, *a: None if name == "accelerate" else real(name, *a))
    why = serve_load.transformers_serve_missing()
    assert why and "accelerate" in why and 'pip install "transformers[serving]"' in why


@pytest.mark.slow  # about a minute on 2 cores: three servers start (two lmforge, one transformers serve)
def test_serve_load_quick_run_measures_every_workload_beside_its_peers():
    import subprocess

    serve_load = _load("serve_load")
    r = subprocess.run([sys.executable, str(BENCHMARKS / "serve_load.py"), "--quick"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    figures = {f["name"]: f for f in map(json.loads, r.stdout.splitlines())}
    transformers_runs = serve_load.transformers_serve_missing() is None
    today_runs = serve_load.lmforge_has_budget()
    for workload in ("burst", "saturation", "poisson_low", "poisson_near", "poisson_high", "shared_prefix"):
        for metric in ("requests_per_s", "output_tokens_per_s", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99",
                       "peak_rss"):
            f = figures[f"serve_load_{workload}_{metric}"]
            assert f["value"] > 0 and (f["peer"] > 0) == today_runs, (workload, metric, f)
            assert (f"serve_load_{workload}_{metric}_vs_transformers" in figures) == transformers_runs
        assert figures[f"serve_load_{workload}_errors"]["value"] == figures[f"serve_load_{workload}_incomplete"][
            "value"] == 0
        assert figures[f"serve_load_{workload}_itl_p99"]["value"] >= figures[f"serve_load_{workload}_itl_p50"]["value"]
    rates = [figures[f"serve_load_{w}_requests_per_s"]["conditions"]["rate"] for w in ("poisson_low", "poisson_near",
                                                                                       "poisson_high")]
    assert rates[0] < rates[1] < rates[2]
    assert figures["serve_load_burst_ttft_p99"]["conditions"]["clients"] == 8
    target = figures["serve_load_target_burst_ttft_p99_vs_today"]
    assert target["conditions"]["met"] in ((True, False) if today_runs else (None,))
    assert "target burst_ttft_p99_vs_today <= 0.5" in r.stderr
