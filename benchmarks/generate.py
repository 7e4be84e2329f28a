"""Generation speed and memory: lmforge vs transformers on the same random weights, same process.

Prints one JSON object per figure: name, value, unit, peer (transformers), ratio, conditions.
`ratio` is always lmforge's advantage (> 1 means lmforge is better): peer/value for times and
memory, value/peer for rates. Runs are interleaved (lmforge, transformers, lmforge, ...) and each
figure is the median of --repeats runs.

    python benchmarks/generate.py                       # GPT-2 small, 32 + 128 tokens, batch 1 and 8, fp32 + bf16
    python benchmarks/generate.py --quick               # a smoke run (tiny shapes, one repeat)
    python benchmarks/generate.py --model smollm2-135m  # the Llama block (SmolLM2-135M shape) vs LlamaForCausalLM

Time to first token = a generate() call with max_new_tokens=1 (prefill + choosing one token).
Decode rate = batch * (N - 1) / (time(N new tokens) - time(1 new token)): tokens per second after the
first, measured the same way for both libraries. The batch-1 bandwidth ceiling is
copy bandwidth / bytes of weights read per token (every weight once; the tied embedding once, as the
LM head; one row of the position table), with copy bandwidth measured before every batch-1 repeat
(median; the range is printed: on a shared host it moves). lmforge's model is loaded as the CLI,
server and pipelines load it (--layout decode: GPT.optimize_for_decoding()). For context, the same
fraction is reported for a step that is nothing but the weights' matrix-vector products (F.linear,
as the model calls them): how close the BLAS kernels alone come to that ceiling on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def emit(name: str, value, unit: str, peer=None, ratio=None, **conditions) -> None:
    print(json.dumps(dict(name=name, value=value, unit=unit, peer=peer, ratio=ratio, conditions=conditions)),
          flush=True)


def copy_bandwidth(threads: int, megabytes: int = 1024, repeats: int = 5) -> float:
    """Bytes moved (read + written) per second by a large tensor copy, GB/s: the STREAM "copy" figure."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def build_checkpoint(directory: Path, config) -> None:
    """Random weights written by transformers (GPT2LMHeadModel, LlamaForCausalLM, ... as the config's
    model_type says), so both libraries load identical tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    hf = config.to_hf_dict()
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf)).save_pretrained(directory)


def load_both(directory: Path, dtype: torch.dtype, layout: str = "decode"):
    import lmforge
    from transformers import AutoModelForCausalLM

    ours = lmforge.load_model(directory, dtype=dtype, device="cpu")
    if layout == "decode":  # what `lmforge generate`, `serve`, `run` and pipeline() load
        ours.optimize_for_decoding()
    theirs = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    theirs.generation_config.eos_token_id = None  # both run exactly N tokens
    theirs.generation_config.pad_token_id = 0
    return ours, theirs


def run_once(engine: str, model, ids: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    if engine == "lmforge":
        out = model.generate(ids, max_new_tokens=new_tokens, eos_token_id=[])
    else:
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, min_new_tokens=0)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens, out.shape
    return elapsed


def measure_speed(models: dict, ids: torch.Tensor, new_tokens: int, repeats: int,
                  bandwidths: list | None = None, threads: int = 2) -> dict:
    """Interleaved repeats; returns per engine the median TTFT (s) and decode rate (tokens/s).
    With `bandwidths`, copy bandwidth is measured before every repeat too (appended there), so the
    ceiling comes from the same moments as the decode figures on a host whose bandwidth varies."""
    times = {engine: {"first": [], "full": []} for engine in models}
    for engine, model in models.items():  # warm-up (allocator, kernels)
        run_once(engine, model, ids, 2)
    for _ in range(repeats):
        if bandwidths is not None:
            bandwidths.append(copy_bandwidth(threads))
        for engine, model in models.items():
            times[engine]["first"].append(run_once(engine, model, ids, 1))
            times[engine]["full"].append(run_once(engine, model, ids, new_tokens))
    out = {}
    for engine, t in times.items():
        first, full = statistics.median(t["first"]), statistics.median(t["full"])
        out[engine] = dict(ttft=first, rate=ids.size(0) * (new_tokens - 1) / max(full - first, 1e-9))
    return out


def matmul_only_rate(model, repeats: int = 30) -> float:
    """Tokens/s if a batch-1 decode step were nothing but its weight matrix-vector products (every
    Linear once, the LM head once, through F.linear as the model calls them): the part of the
    bandwidth ceiling the BLAS kernels themselves reach on this machine."""
    import torch.nn.functional as F

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {m.in_features: torch.randn(1, 1, m.in_features, dtype=m.weight.dtype) for m in linears}

    def step():
        for m in linears:
            F.linear(inputs[m.in_features], m.weight, m.bias)

    with torch.inference_mode():
        for _ in range(3):
            step()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return 1.0 / statistics.median(times)


def weight_bytes_per_token(model) -> int:
    """Bytes of parameters read to decode one token at batch 1."""
    element = model.transformer.wte.weight.element_size()
    params = model.num_parameters()
    if "wpe" in model.transformer:  # one row of the learned position table, not all of it
        params += model.config.n_embd - model.transformer.wpe.weight.numel()
    return params * element


# ---- peak memory, measured in a child process per engine --------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(engine: str, directory: str, dtype: str, batch: int, prompt: int, new_tokens: int,
                 layout: str) -> None:
    """Print the peak RSS growth (bytes) during one generate call, sampled every millisecond, after a
    tiny warm-up call (so one-time library buffers do not count)."""
    ours, theirs = load_both(Path(directory), DTYPES[dtype], layout)
    model = ours if engine == "lmforge" else theirs
    del ours, theirs
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
    run_once(engine, model, ids[:1, :4], 2)  # a different, tiny request: library set-up, little to reuse
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    run_once(engine, model, ids, new_tokens)
    stop.set()
    sampler.join()
    peak[0] = max(peak[0], _rss_bytes())
    print(json.dumps({"peak_growth": peak[0] - base}))


def measure_memory(engine: str, directory: Path, dtype: str, batch: int, prompt: int, new_tokens: int,
                   threads: int, layout: str) -> int | None:
    cmd = [sys.executable, __file__, "--memory-child", engine, "--checkpoint", str(directory), "--dtypes", dtype,
           "--batch-sizes", str(batch), "--prompt-tokens", str(prompt), "--new-tokens", str(new_tokens),
           "--threads", str(threads), "--layout", layout]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        print(f"memory child failed: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_growth"]


# ---- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory figures (child processes)")
    p.add_argument("--quick", action="store_true", help="smoke run: a 4-layer model, 1 repeat")
    p.add_argument("--model", choices=["gpt2", "smollm2-135m", "qwen2.5-0.5b"], default="gpt2",
                   help="the shape (an lmforge preset; random weights): GPT-2 small, or a Llama-family model")
    p.add_argument("--layout", choices=["decode", "as-loaded"], default="decode",
                   help="lmforge weight layout: after GPT.optimize_for_decoding(), as the CLI, server and "
                        "pipelines load a model, or as load_model gives it (column-major blocks, row-major "
                        "LM head)")
    p.add_argument("--memory-child", choices=["lmforge", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.memory_child:
        memory_child(args.memory_child, args.checkpoint, args.dtypes[0], args.batch_sizes[0],
                     args.prompt_tokens, args.new_tokens, args.layout)
        return 0

    import lmforge

    config = lmforge.preset(args.model, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    if args.quick:
        config = config.replace(n_layer=4) if args.model != "gpt2" else config.replace(n_layer=4, n_head=4, n_embd=256)
        args.repeats = min(args.repeats, 1)
        args.new_tokens = min(args.new_tokens, 16)
    base = dict(device="cpu", threads=args.threads, torch=torch.__version__, transformers=transformers.__version__,
                cpu=platform.processor() or platform.machine(), prompt_tokens=args.prompt_tokens,
                new_tokens=args.new_tokens, decoding="greedy", weights="random", repeats=args.repeats,
                layout=args.layout,
                model=f"{args.model} shape n_layer={config.n_layer} n_embd={config.n_embd}")
    bandwidth = copy_bandwidth(args.threads)
    emit("copy_bandwidth", round(bandwidth, 2), "GB/s", **base)

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / f"{args.model}-random"
        build_checkpoint(directory, config)
        for dtype in args.dtypes:
            ours, theirs = load_both(directory, DTYPES[dtype], args.layout)
            models = {"lmforge": ours, "transformers": theirs}
            per_token = weight_bytes_per_token(ours)
            for batch in args.batch_sizes:
                cond = dict(base, dtype=dtype, batch=batch)
                ids = torch.randint(0, ours.config.vocab_size, (batch, args.prompt_tokens),
                                    generator=torch.Generator().manual_seed(batch))
                bandwidths = [] if batch == 1 else None
                speed = measure_speed(models, ids, args.new_tokens, args.repeats, bandwidths, args.threads)
                us, them = speed["lmforge"], speed["transformers"]
                emit("decode_tokens_per_s", round(us["rate"], 2), "tokens/s", round(them["rate"], 2),
                     round(us["rate"] / them["rate"], 3), **cond)
                emit("time_to_first_token", round(us["ttft"] * 1e3, 2), "ms", round(them["ttft"] * 1e3, 2),
                     round(them["ttft"] / us["ttft"], 3), **cond)
                if batch == 1:
                    bandwidth = statistics.median(bandwidths)
                    ceiling = bandwidth * 1e9 / per_token
                    emit("decode_fraction_of_bandwidth_ceiling", round(us["rate"] / ceiling, 3), "fraction",
                         round(them["rate"] / ceiling, 3), round(us["rate"] / them["rate"], 3),
                         ceiling_tokens_per_s=round(ceiling, 2), weight_bytes_per_token=per_token,
                         copy_bandwidth_gb_s=round(bandwidth, 2),
                         copy_bandwidth_range_gb_s=[round(min(bandwidths), 2), round(max(bandwidths), 2)],
                         target=0.85, **cond)
                    floor = matmul_only_rate(ours)
                    emit("matmul_only_fraction_of_bandwidth_ceiling", round(floor / ceiling, 3), "fraction",
                         note="the weight matrix-vector products of one batch-1 step and nothing else; "
                              "decode can be no faster than this with these kernels",
                         matmul_only_tokens_per_s=round(floor, 2), **cond)
                if not args.no_memory:
                    mem = {e: measure_memory(e, directory, dtype, batch, args.prompt_tokens, args.new_tokens,
                                             args.threads, args.layout) for e in models}
                    cache = (2 * ours.config.n_layer * batch * (args.prompt_tokens + args.new_tokens - 1)
                             * ours.config.n_embd * ours.transformer.wte.weight.element_size())
                    if mem["lmforge"] is not None:
                        peer = None if mem["transformers"] is None else round(mem["transformers"] / 2**20, 2)
                        ratio = (None if peer is None or not mem["lmforge"]
                                 else round(mem["transformers"] / mem["lmforge"], 3))
                        emit("peak_memory_growth_during_generate", round(mem["lmforge"] / 2**20, 2), "MiB", peer,
                             ratio, kv_cache_mib=round(cache / 2**20, 2), measured="RSS sampled every 1 ms", **cond)
            del ours, theirs, models
    return 0


if __name__ == "__main__":
    sys.exit(main())
