"""The pure helpers of benchmarks/generate.py and benchmarks/llamacpp.py (the scripts themselves are
run by hand: `python benchmarks/generate.py --quick` is their smoke run)."""

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
