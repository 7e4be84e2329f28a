"""CPU generation speed, memory and int8 quality: lmforge vs transformers and llama.cpp, same weights, same run.

Prints one JSON object per figure: name, value, unit, peer, ratio, conditions (conditions.peer_engine
names the peer). `ratio` is always lmforge's advantage (> 1 means lmforge is better): peer/value for
times and memory, value/peer for rates. Runs are interleaved (lmforge, transformers, llama.cpp,
lmforge, ...) and each figure is the median of --repeats runs. Target figures carry "met": true/false.

    python benchmarks/llamacpp.py build                  # once, optional: the llama.cpp peer (minutes)
    python benchmarks/generate.py                        # GPT-2 small: fp32, bf16, int8; batch 1 and 8; quality
    python benchmarks/generate.py --quick                # a smoke run (tiny shapes, one repeat)
    python benchmarks/generate.py --model smollm2-135m   # the Llama block (SmolLM2-135M shape)
    python benchmarks/generate.py --phases quality --trained runs/shakespeare/model

Speed (random weights written by transformers; lmforge loads them as the CLI, server and pipelines do:
load_model(..., quantize=) + optimize_for_decoding(), --layout decode):
- Precisions: fp32, bf16 and int8 (lmforge's weight-only int8, per-output-channel scales, the LM head's
  per group of 32; activations in --int8-activations, fp32 by default as load_model gives them). Peers: transformers at fp32/bf16 (it has no CPU int8 without
  extra libraries); llama.cpp's llama-bench at batch 1 on GGUFs of the same weights (F32, BF16, Q8_0)
  made by its own converter, when `benchmarks/llamacpp.py build` has run (else those rows are skipped).
- Time to first token = a generate() call with max_new_tokens=1 (prefill + choosing one token), for the
  short prompt (--prompt-tokens) and a long one (--prefill-tokens, 512); llama.cpp's is 512 / its pp512
  rate. Decode rate = batch * (N - 1) / (time(N new tokens) - time(1 new token)): tokens per second
  after the first; llama.cpp's is its tgN rate (N tokens from an empty context, batch 1).
- The batch-1 ceiling is read bandwidth / weight bytes read per token (every weight once, the tied
  embedding once as the LM head, one row of the position table and of an untied embedding), the read
  bandwidth being the sum of a 1 GiB fp32 tensor with the benchmark's threads, measured before every
  batch-1 repeat (median; the range is printed: on a shared host it moves).
- Targets (batch-1 decode): int8 >= 2.5x lmforge's fp32, bf16 >= 1.7x fp32, and at each precision
  lmforge >= llama.cpp (fp32 vs F32, bf16 vs BF16, int8 vs Q8_0).

Quality (--phases quality): a model trained with the README main job's settings on Tiny Shakespeare
(`lmforge pretrain --data ../shared/data/tinyshakespeare/input.txt --out RUN --block-size 64
--batch-size 12 --lr 1e-3 --max-steps 2000 --max-time 120`) or --trained DIR; int8 perplexity on the
validation tail (lmforge.evaluation.evaluate_perplexity) within 1% relative of fp32, and greedy
continuations of prompts from it equal to fp32's for >= 95% of tokens. Skipped when the data is absent.
"""

from __future__ import annotations

import argparse
import inspect
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp  # noqa: E402  (benchmarks/llamacpp.py: the optional llama.cpp peer)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PRECISIONS = ("fp32", "bf16", "int8")
LLAMA_TYPES = {"fp32": "F32", "bf16": "BF16", "int8": "Q8_0"}
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TRAIN_FLAGS = ["--block-size", "64", "--batch-size", "12", "--lr", "1e-3", "--max-steps", "2000", "--max-time", "120"]
TARGETS = {"int8": 2.5, "bf16": 1.7}  # batch-1 decode over lmforge's own fp32


def emit(name: str, value, unit: str, peer=None, ratio=None, met: bool | None = None, **conditions) -> None:
    row = dict(name=name, value=value, unit=unit, peer=peer, ratio=ratio, conditions=conditions)
    if met is not None:
        row["met"] = bool(met)
    print(json.dumps(row), flush=True)


_READ_BUFFERS: dict[int, torch.Tensor] = {}


def read_bandwidth(megabytes: int = 1024, repeats: int = 5) -> float:
    """Bytes read per second by summing a large fp32 tensor (torch's current threads), GB/s, median of
    `repeats`: the read-bandwidth ceiling of a decode step, which only reads its weights."""
    if megabytes not in _READ_BUFFERS:
        _READ_BUFFERS[megabytes] = torch.ones(megabytes * 2**20 // 4)
    buf = _READ_BUFFERS[megabytes]
    buf.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - start)
    return buf.numel() * 4 / statistics.median(times) / 1e9


def build_checkpoint(directory: Path, config) -> None:
    """Random weights written by transformers (GPT2LMHeadModel, LlamaForCausalLM, ... as the config's
    model_type says), so every engine loads identical tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    hf = config.to_hf_dict()
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf)).save_pretrained(directory)


def int8_supported() -> bool:
    import lmforge

    return "quantize" in inspect.signature(lmforge.load_model).parameters


def load_lmforge(directory: Path, precision: str, int8_activations: str = "bf16", layout: str = "decode"):
    """lmforge's model at `precision` as the CLI loads it (int8: weight-only, activations in
    `int8_activations`)."""
    import lmforge

    if precision == "int8":
        model = lmforge.load_model(directory, dtype=DTYPES[int8_activations], device="cpu", quantize="int8")
    else:
        model = lmforge.load_model(directory, dtype=DTYPES[precision], device="cpu")
    if layout == "decode":  # what `lmforge generate`, `serve`, `run` and pipeline() load
        model.optimize_for_decoding()
    return model


def load_transformers(directory: Path, precision: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=DTYPES[precision]).eval()
    model.generation_config.eos_token_id = None  # every engine runs exactly N tokens
    model.generation_config.pad_token_id = 0
    return model


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


def measure_speed(models: dict, ids: torch.Tensor, long_ids: torch.Tensor | None, new_tokens: int, repeats: int,
                  bandwidths: list | None = None, bandwidth_mib: int = 1024, llama: dict | None = None) -> dict:
    """Interleaved repeats; per engine the median TTFT for the short and long prompts (s) and decode
    rate (tokens/s). With `bandwidths`, read bandwidth is measured before every repeat (appended
    there), so the ceiling comes from the same moments as the decode figures. `llama` ({"gguf", "bench",
    "threads"}) adds one llama-bench run (tgN and ppP, one repetition) to every repeat."""
    times = {engine: {"first": [], "full": [], "long": []} for engine in models}
    for engine, model in models.items():  # warm-up (allocator, kernels)
        run_once(engine, model, ids, 2)
        if long_ids is not None:
            run_once(engine, model, long_ids, 1)
    llama_runs = []
    for _ in range(repeats):
        if bandwidths is not None:
            bandwidths.append(read_bandwidth(bandwidth_mib))
        for engine, model in models.items():
            times[engine]["first"].append(run_once(engine, model, ids, 1))
            times[engine]["full"].append(run_once(engine, model, ids, new_tokens))
            if long_ids is not None:
                times[engine]["long"].append(run_once(engine, model, long_ids, 1))
            if engine == "lmforge" and llama is not None:  # right after lmforge's: the host drifts by the minute
                llama_runs.append(llamacpp.bench(llama["gguf"], llama["threads"], n_gen=new_tokens,
                                                 n_prompt=0 if long_ids is None else long_ids.size(1),
                                                 repetitions=1, llama=llama["found"]))
    out = {}
    for engine, t in times.items():
        first, full = statistics.median(t["first"]), statistics.median(t["full"])
        out[engine] = dict(ttft=first, rate=ids.size(0) * (new_tokens - 1) / max(full - first, 1e-9),
                           ttft_long=statistics.median(t["long"]) if t["long"] else None)
    if llama_runs:
        out["llama.cpp"] = dict(rate=statistics.median(r["tg"] for r in llama_runs),
                                prefill_rate=(statistics.median(r["pp"] for r in llama_runs)
                                              if long_ids is not None else None),
                                build_commit=llama_runs[0].get("build_commit"))
    return out


def matmul_only_rate(model, repeats: int = 30) -> float:
    """Tokens/s if a batch-1 decode step were nothing but its weight matrix-vector products (every
    linear layer once, the LM head once, through the kernels the model calls): the part of the
    bandwidth ceiling the kernels themselves reach on this machine."""
    from lmforge import kernels

    steps = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            steps.append((kernels.linear, (m.weight, m.bias), m.in_features, m.weight.dtype))
        elif hasattr(m, "weight_scale") and getattr(m, "weight", None) is not None and m.weight.dtype == torch.int8:
            steps.append((kernels.int8_linear, (m.weight, m.weight_scale, m.bias), m.in_features,
                          model.transformer.wte.weight.dtype))
    inputs = {(k, d): torch.randn(k, dtype=d) for _, _, k, d in steps}

    def step():
        for fn, weights, k, d in steps:
            fn(inputs[(k, d)], *weights)

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
    """Bytes of weights read to decode one token at batch 1: every parameter and buffer once (a tied LM
    head counts once), but only one row of the position table and of an embedding that is not also
    the LM head (an int8 model's float embedding, an untied one)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    head = model.lm_head.weight
    for name in ("wte", "wpe"):
        if name in model.transformer:
            table = model.transformer[name].weight
            if table is not head:
                total -= (table.numel() - table.size(1)) * table.element_size()
    return total


# ---- peak memory, measured in a child process per engine --------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """This process's peak RSS (VmHWM: unlike getrusage's ru_maxrss it starts afresh at exec, so the
    parent's size at fork does not count)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def memory_child(engine: str, directory: str, precision: str, batch: int, prompt: int, new_tokens: int,
                 layout: str, int8_activations: str) -> None:
    """Print the peak RSS growth (bytes) during one generate call, sampled every millisecond, after a
    tiny warm-up call (so one-time library buffers do not count), and the process's peak RSS."""
    if engine == "lmforge":
        model = load_lmforge(Path(directory), precision, int8_activations, layout)
    else:
        model = load_transformers(Path(directory), precision)
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
    print(json.dumps({"peak_growth": peak[0] - base, "process_peak_rss": _peak_rss_bytes()}))


def measure_memory(engine: str, directory: Path, precision: str, batch: int, args) -> dict | None:
    cmd = [sys.executable, __file__, "--memory-child", engine, "--checkpoint", str(directory), "--dtypes", precision,
           "--batch-sizes", str(batch), "--prompt-tokens", str(args.prompt_tokens), "--new-tokens",
           str(args.new_tokens), "--threads", str(args.threads), "--layout", args.layout,
           "--int8-activations", args.int8_activations]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        print(f"memory child failed: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- llama.cpp ----------------------------------------------------------------------------------


def llama_ggufs(directory: Path, precisions: list[str], args) -> tuple[dict | None, dict]:
    """find()'s dict and {precision: GGUF path} for the precisions llama.cpp can run here; skips (with
    a line on stderr) when llama.cpp is not built or a conversion fails. GGUFs are cached under the
    build directory by the weights' hash, so a rerun converts nothing."""
    if args.no_llamacpp:
        return None, {}
    found = llamacpp.find(args.llamacpp_dir)
    if found is None:
        print(f"llama.cpp rows skipped: no build under {args.llamacpp_dir} "
              f"(python benchmarks/llamacpp.py build)", file=sys.stderr)
        return None, {}
    import hashlib

    digest = hashlib.sha256()
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while chunk := fh.read(2**24):
                digest.update(chunk)
    out_dir = Path(args.llamacpp_dir) / "gguf" / f"{args.model}-{digest.hexdigest()[:16]}"
    out_dir.mkdir(parents=True, exist_ok=True)
    ggufs = {}
    for precision in precisions:
        try:
            ggufs[precision] = llamacpp.convert(directory, precision, out_dir, llama=found)
        except (RuntimeError, ValueError, KeyError) as e:
            print(f"llama.cpp {LLAMA_TYPES[precision]} rows skipped: {e}", file=sys.stderr)
    return found, ggufs


# ---- speed ---------------------------------------------------------------------------------------


def speed_phase(args, config, base: dict) -> None:
    precisions = list(args.dtypes)
    if "int8" in precisions and not int8_supported():
        print("int8 rows skipped: this lmforge's load_model has no quantize= argument", file=sys.stderr)
        precisions.remove("int8")
    bandwidths_all: list[float] = []
    rates: dict[str, float] = {}
    llama_rates: dict[str, tuple[float, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / f"{args.model}-random"
        build_checkpoint(directory, config)
        found, ggufs = llama_ggufs(directory, precisions, args)
        for precision in precisions:
            ours = load_lmforge(directory, precision, args.int8_activations, args.layout)
            models = {"lmforge": ours}
            if precision in DTYPES:
                models["transformers"] = load_transformers(directory, precision)
            per_token = weight_bytes_per_token(ours)
            extra = dict(activations=args.int8_activations, quantization="int8 weight-only, per-output-channel "
                         "fp32 scales (LM head: per group of 32); embedding float") if precision == "int8" else {}
            gguf = ggufs.get(precision)
            llama_cond = {}
            if gguf is not None:
                llama_cond = dict(llamacpp_version=found["version"], llamacpp_type=LLAMA_TYPES[precision],
                                  gguf_bytes=gguf.stat().st_size)
            emit("weight_bytes_per_token", per_token, "bytes", **base, dtype=precision, **extra, **llama_cond)
            for batch in args.batch_sizes:
                cond = dict(base, dtype=precision, batch=batch, **extra)
                gen = torch.Generator().manual_seed(batch)
                ids = torch.randint(0, ours.config.vocab_size, (batch, args.prompt_tokens), generator=gen)
                long_ids = (torch.randint(0, ours.config.vocab_size, (batch, args.prefill_tokens), generator=gen)
                            if args.prefill_tokens else None)
                bandwidths = [] if batch == 1 else None
                llama = (dict(gguf=gguf, threads=args.threads, found=found)
                         if gguf is not None and batch == 1 else None)
                speed = measure_speed(models, ids, long_ids, args.new_tokens, args.repeats, bandwidths,
                                      args.bandwidth_mib, llama)
                us, them = speed["lmforge"], speed.get("transformers")
                peer = dict(peer_engine="transformers") if them else dict(peer_engine=None)
                emit("decode_tokens_per_s", round(us["rate"], 2), "tokens/s",
                     round(them["rate"], 2) if them else None, round(us["rate"] / them["rate"], 3) if them else None,
                     **cond, **peer)
                emit("time_to_first_token", round(us["ttft"] * 1e3, 2), "ms",
                     round(them["ttft"] * 1e3, 2) if them else None,
                     round(them["ttft"] / us["ttft"], 3) if them else None, **cond, **peer)
                if long_ids is not None:
                    emit("time_to_first_token", round(us["ttft_long"] * 1e3, 2), "ms",
                         round(them["ttft_long"] * 1e3, 2) if them else None,
                         round(them["ttft_long"] / us["ttft_long"], 3) if them else None,
                         **dict(cond, prompt_tokens=args.prefill_tokens), **peer)
                ll = speed.get("llama.cpp")
                if ll is not None:
                    lc = dict(cond, **llama_cond, peer_engine="llama.cpp", llamacpp_commit=ll["build_commit"])
                    emit("decode_tokens_per_s", round(us["rate"], 2), "tokens/s", round(ll["rate"], 2),
                         round(us["rate"] / ll["rate"], 3), **lc, llamacpp_test=f"tg{args.new_tokens}")
                    if ll["prefill_rate"]:
                        peer_ms = args.prefill_tokens / ll["prefill_rate"] * 1e3
                        emit("time_to_first_token", round(us["ttft_long"] * 1e3, 2), "ms", round(peer_ms, 2),
                             round(peer_ms / (us["ttft_long"] * 1e3), 3),
                             **dict(lc, prompt_tokens=args.prefill_tokens), llamacpp_test=f"pp{args.prefill_tokens}",
                             note="llama.cpp: prompt tokens / its pp rate (prompt processing, no sampling)")
                    llama_rates[precision] = (ll["rate"], lc)
                if batch == 1:
                    rates[precision] = us["rate"]
                    bandwidths_all += bandwidths
                    bandwidth = statistics.median(bandwidths)
                    ceiling = bandwidth * 1e9 / per_token
                    emit("decode_fraction_of_bandwidth_ceiling", round(us["rate"] / ceiling, 3), "fraction",
                         round(them["rate"] / ceiling, 3) if them else None,
                         round(us["rate"] / them["rate"], 3) if them else None,
                         ceiling_tokens_per_s=round(ceiling, 2), weight_bytes_per_token=per_token,
                         read_bandwidth_gb_s=round(bandwidth, 2),
                         read_bandwidth_range_gb_s=[round(min(bandwidths), 2), round(max(bandwidths), 2)],
                         llamacpp_fraction=round(ll["rate"] / ceiling, 3) if ll else None, **cond, **peer)
                    floor = matmul_only_rate(ours)
                    emit("matmul_only_fraction_of_bandwidth_ceiling", round(floor / ceiling, 3), "fraction",
                         note="the weight matrix-vector products of one batch-1 step and nothing else, through "
                              "lmforge.kernels; decode can be no faster than this with these kernels",
                         matmul_only_tokens_per_s=round(floor, 2), **cond)
                if not args.no_memory:
                    mem = {e: measure_memory(e, directory, precision, batch, args) for e in models}
                    element = ours.transformer.wte.weight.element_size()
                    cache = (2 * ours.config.n_layer * batch * (args.prompt_tokens + args.new_tokens - 1)
                             * (ours.config.n_kv_head or ours.config.n_head) * ours.config.head_dim * element)
                    if mem["lmforge"] is not None:
                        theirs = mem.get("transformers")
                        peer_mib = None if theirs is None else round(theirs["peak_growth"] / 2**20, 2)
                        ratio = (None if theirs is None or not mem["lmforge"]["peak_growth"]
                                 else round(theirs["peak_growth"] / mem["lmforge"]["peak_growth"], 3))
                        emit("peak_memory_growth_during_generate", round(mem["lmforge"]["peak_growth"] / 2**20, 2),
                             "MiB", peer_mib, ratio, kv_cache_mib=round(cache / 2**20, 2),
                             measured="RSS sampled every 1 ms",
                             process_peak_rss_mib=round(mem["lmforge"]["process_peak_rss"] / 2**20, 1),
                             peer_process_peak_rss_mib=(None if theirs is None
                                                        else round(theirs["process_peak_rss"] / 2**20, 1)),
                             **cond, **peer)
            del ours, models
    targets(rates, llama_rates, base, bandwidths_all)


def targets(rates: dict, llama_rates: dict, base: dict, bandwidths: list[float]) -> None:
    """The issue's batch-1 decode targets as figures with "met"."""
    bw = dict(read_bandwidth_range_gb_s=[round(min(bandwidths), 2), round(max(bandwidths), 2)]) if bandwidths else {}
    for precision, target in TARGETS.items():
        if precision in rates and "fp32" in rates:
            value = rates[precision] / rates["fp32"]
            emit(f"{precision}_over_fp32_decode", round(value, 3), "x", round(rates["fp32"], 2), None,
                 met=value >= target, **base, batch=1, target=target, **bw,
                 note=f"lmforge batch-1 decode at {precision} / at fp32 (peer: the fp32 rate)")
    for precision, (rate, cond) in llama_rates.items():
        value = rates[precision] / rate
        emit("decode_vs_llamacpp", round(value, 3), "x", round(rate, 2), round(value, 3), met=value >= 1.0,
             **dict(cond, target=1.0, **bw), note="lmforge batch-1 decode / llama.cpp's tg rate, same weights")


# ---- quality -------------------------------------------------------------------------------------


def greedy_agreement(reference: list[list[int]], other: list[list[int]]) -> dict:
    """How far greedy continuations agree: the fraction of tokens equal position by position, the
    fraction before each continuation's first difference, and how many continuations are identical."""
    total = same = prefix = identical = 0
    for a, b in zip(reference, other, strict=True):
        total += len(a)
        same += sum(x == y for x, y in zip(a, b))
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix += n
        identical += a == b
    return dict(token_agreement=same / total, prefix_agreement=prefix / total, identical=identical,
                continuations=len(reference), tokens=total)


def trained_model(args, workdir: Path) -> tuple[Path, Path | None, list[str] | None]:
    """(model dir, prepared data dir or None, training command or None): --trained, or a model pretrained
    now on Tiny Shakespeare with the README main job's settings."""
    if args.trained:
        return Path(args.trained), None, None
    text = Path(args.quality_data) if args.quality_data else DATA / "tinyshakespeare" / "input.txt"
    flags = list(TRAIN_FLAGS)
    if args.quick:
        flags[flags.index("--max-steps") + 1], flags[flags.index("--max-time") + 1] = "30", "20"
    run = workdir / "run"
    cmd = [sys.executable, "-m", "lmforge", "pretrain", "--data", str(text), "--out", str(run), *flags]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return run / "model", run / "data", ["lmforge", *cmd[3:]]


def quality_tokens(args, model_dir: Path, prepared: Path | None) -> tuple[torch.Tensor, str]:
    """The evaluation tokens: a prepared dataset's val split, a validation file, or the last 10% of a
    text file (nanoGPT's validation tail), encoded with the model's tokenizer."""
    import lmforge
    from lmforge.evaluation.data import load_tokens

    if prepared is not None:
        return load_tokens(prepared, split="val"), f"{prepared} val split"
    path = Path(args.quality_data) if args.quality_data else DATA / "tinyshakespeare" / "input.txt"
    if path.is_dir():
        return load_tokens(path, split="val"), f"{path} val split"
    ids = load_tokens(path, lmforge.Tokenizer.from_pretrained(model_dir))
    if "valid" in path.name:
        return ids, str(path)
    return ids[int(0.9 * ids.numel()):], f"{path}, last 10% of its tokens"


def quality_phase(args, base: dict) -> None:
    if not int8_supported():
        print("quality rows skipped: this lmforge's load_model has no quantize= argument", file=sys.stderr)
        return
    data = Path(args.quality_data) if args.quality_data else DATA / "tinyshakespeare" / "input.txt"
    if not args.trained and not data.exists():
        print(f"quality rows skipped: {data} is absent (--quality-data, or --trained with its data)", file=sys.stderr)
        return
    from lmforge.evaluation import evaluate_perplexity

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        model_dir, prepared, command = trained_model(args, Path(tmp))
        trained_s = time.perf_counter() - start
        ids, source = quality_tokens(args, model_dir, prepared)
        if args.quick:
            ids = ids[:4000]
        models = {"fp32": load_lmforge(model_dir, "fp32", layout=args.layout),
                  "int8": load_lmforge(model_dir, "int8", args.int8_activations, args.layout)}
        cond = dict(base, model=str(model_dir) if args.trained else "baby GPT trained in this run",
                    training=" ".join(command) if command else None,
                    training_s=round(trained_s, 1) if command else None, data=source, n_tokens=ids.numel(),
                    int8_activations=args.int8_activations)
        ppl = {name: evaluate_perplexity(m, ids).metrics["perplexity"] for name, m in models.items()}
        rel = ppl["int8"] / ppl["fp32"] - 1
        emit("int8_perplexity_relative_change", round(rel, 5), "fraction", round(ppl["fp32"], 4), None,
             met=abs(rel) <= 0.01, int8_perplexity=round(ppl["int8"], 4), **cond, target=0.01,
             note="int8 perplexity / fp32 perplexity - 1 (peer: the fp32 perplexity), "
                  "lmforge.evaluation.evaluate_perplexity")
        n_prompts, prompt_len = args.quality_prompts, 16
        new = min(48, models["fp32"].config.n_positions - prompt_len)
        starts = torch.linspace(0, ids.numel() - prompt_len - 1, n_prompts).long().tolist()
        outs = {name: [] for name in models}
        for s in starts:
            prompt = ids[s:s + prompt_len][None]
            for name, m in models.items():
                out = m.generate(prompt, max_new_tokens=new, eos_token_id=[])
                outs[name].append(out[0, prompt_len:].tolist())
        agree = greedy_agreement(outs["fp32"], outs["int8"])
        # Free-running continuations amplify each near-tie flip into a different text; the next-token
        # argmax agreement on the evaluation text itself (teacher forcing) measures the flips alone.
        T = models["fp32"].config.n_positions
        rows = ids[: (min(ids.numel(), 64 * T) // T) * T].view(-1, T)
        with torch.no_grad():
            forced = torch.cat([(models["fp32"](r).logits.argmax(-1) == models["int8"](r).logits.argmax(-1)).flatten()
                                for r in rows.split(16)]).float().mean().item()
        emit("int8_teacher_forced_argmax_agreement", round(forced, 5), "fraction", None, None, **cond,
             positions=rows.numel(), note="next-token argmax of int8 equal to fp32's at each position of the "
                                          "evaluation text (no target; the free-running figure below has one)")
        emit("int8_greedy_token_agreement", round(agree["token_agreement"], 4), "fraction", None, None,
             met=agree["token_agreement"] >= 0.95, **cond, target=0.95, prompts=n_prompts, prompt_tokens=prompt_len,
             new_tokens=new, prefix_agreement=round(agree["prefix_agreement"], 4),
             identical_continuations=agree["identical"],
             note="greedy continuations of prompts spread over the evaluation text: int8 tokens equal to "
                  "fp32's, position by position (prefix_agreement: before the first difference)")


# ---- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--prefill-tokens", type=int, default=512, help="the long prompt's length for time to "
                   "first token (vs llama.cpp's pp rate); 0 skips it")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--dtypes", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--int8-activations", choices=sorted(DTYPES), default="fp32",
                   help="the activations' dtype of the int8 model (its non-linear parts, norms, embedding); fp32 "
                        "is load_model(..., quantize='int8')'s default and as fast (the kernel rounds x to int16 "
                        "either way), bf16 adds its own rounding to the quality figures")
    p.add_argument("--phases", nargs="+", default=["speed", "quality"], choices=["speed", "quality"])
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory figures (child processes)")
    p.add_argument("--quick", action="store_true", help="smoke run: a 4-layer model, 1 repeat, short prompts, "
                   "a 30-step quality model")
    p.add_argument("--model", choices=["gpt2", "smollm2-135m", "qwen2.5-0.5b"], default="gpt2",
                   help="the shape (an lmforge preset; random weights): GPT-2 small, or a Llama-family model")
    p.add_argument("--layout", choices=["decode", "as-loaded"], default="decode",
                   help="lmforge weight layout: after GPT.optimize_for_decoding(), as the CLI, server and "
                        "pipelines load a model, or as load_model gives it")
    p.add_argument("--bandwidth-mib", type=int, default=1024, help="size of the tensor summed for read bandwidth")
    p.add_argument("--llamacpp-dir", default=str(llamacpp.DEFAULT_DIR),
                   help="where `python benchmarks/llamacpp.py build` put llama.cpp")
    p.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp rows even when it is built")
    p.add_argument("--trained", help="quality: a trained lmforge model directory (default: train one now)")
    p.add_argument("--quality-data", help="quality: a text file (its last 10%% is evaluated, or all of it when "
                   "its name says valid...), or a prepared dataset (its val split); default: Tiny Shakespeare")
    p.add_argument("--quality-prompts", type=int, default=128, help="quality: prompts for greedy agreement")
    p.add_argument("--memory-child", choices=["lmforge", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.memory_child:
        memory_child(args.memory_child, args.checkpoint, args.dtypes[0], args.batch_sizes[0],
                     args.prompt_tokens, args.new_tokens, args.layout, args.int8_activations)
        return 0

    import lmforge
    from lmforge import kernels

    config = lmforge.preset(args.model, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    if args.quick:
        config = config.replace(n_layer=4) if args.model != "gpt2" else config.replace(n_layer=4, n_head=4, n_embd=256)
        args.repeats = min(args.repeats, 1)
        args.new_tokens = min(args.new_tokens, 16)
        args.prefill_tokens = min(args.prefill_tokens, 64)
        args.bandwidth_mib = min(args.bandwidth_mib, 256)
        args.quality_prompts = min(args.quality_prompts, 4)
    base = dict(device="cpu", threads=args.threads, torch=torch.__version__, transformers=transformers.__version__,
                cpu=platform.processor() or platform.machine(), prompt_tokens=args.prompt_tokens,
                new_tokens=args.new_tokens, decoding="greedy", weights="random", repeats=args.repeats,
                layout=args.layout, kernels="compiled" if kernels.available() else kernels.why_unavailable(),
                model=f"{args.model} shape n_layer={config.n_layer} n_embd={config.n_embd}")
    if "speed" in args.phases:
        bandwidths = [read_bandwidth(args.bandwidth_mib) for _ in range(3)]
        emit("read_bandwidth", round(statistics.median(bandwidths), 2), "GB/s",
             range_gb_s=[round(min(bandwidths), 2), round(max(bandwidths), 2)],
             measured=f"sum of a {args.bandwidth_mib} MiB fp32 tensor, {args.threads} threads, median of 5, x3",
             **base)
        speed_phase(args, config, base)
        _READ_BUFFERS.clear()
    if "quality" in args.phases:
        quality_phase(args, {k: v for k, v in base.items() if k not in ("weights", "model", "prompt_tokens",
                                                                        "new_tokens")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
