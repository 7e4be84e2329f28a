"""Load test of `lmforge serve` beside its peers: many streaming clients against real server processes.

The checkpoint: a random GPT-2-small-shaped model (12 layers, 12 heads, 768 wide, vocabulary 50257,
fp32) written to a temporary directory with a synthetic GPT-2-format BPE of the same size (256 bytes +
50000 merges spelling printable-ASCII pairs and triples + <|endoftext|>), so every id the random model
samples decodes to text, and nothing is downloaded. transformers' AutoTokenizer loads the same folder.

The servers, one at a time, each on a free loopback port, all serving that same folder:
  lmforge        `lmforge serve` with its token-budget scheduler (its default --max-batched-tokens)
  lmforge_today  `lmforge serve --max-batched-tokens 0`: the previous engine, each prompt prefilled alone
                 (skipped, with the reason printed, when this lmforge has no --max-batched-tokens flag)
  transformers   `transformers serve --continuous-batching --device cpu --dtype float32` (paged attention),
                 offline (HF_HUB_OFFLINE=1), KV blocks sized for --max-batch-size of the longest request.
                 Needs `pip install "transformers[serving]"` (fastapi, uvicorn, openai, accelerate) done
                 beforehand: the script never installs or downloads; without them, or when the server does
                 not come up, its rows are left out and the reason printed. --peers chooses which peers run.
                 (Checked with transformers 5.24 and 5.25: its /v1/completions takes text prompts only, hence text;
                 5.25 streams usage only when asked, with stream_options.include_usage, as OpenAI does.)

The workloads (each request a streamed /v1/completions call with a text prompt, greedy; lmforge is sent
ignore_eos, transformers serve accepts no such field and may stop early on eos, which counts as complete):
  burst          --clients requests at once, each --prompt-tokens long, --max-tokens new tokens (the issue's
                 64 concurrent streams). On lmforge also sent one at a time: the figures serve_load_* of
                 earlier versions (peer = one at a time, target >= 4x) are kept as they were.
  saturation     --requests requests of mixed lengths at once (prompts uniform in --prompt-range tokens,
                 outputs uniform in --output-range, capped by the context, as vLLM's
                 benchmarks/benchmark_serving.py random dataset); its requests/s on lmforge is the measured
                 capacity.
  poisson_low/near/high  the same mixed requests arriving as a Poisson process (exponential gaps, one
                 seed for every server) at 0.5x, 0.9x and 1.5x that capacity, or at --rates R1,R2,R3 req/s.
  shared_prefix  --clients requests at once sharing a --shared-prefix-tokens system prompt, each with its
                 own 16-token question: the prefix-cache workload (lmforge's /metrics prefix lines before and
                 after are in its conditions).
For each workload and server: requests/s and output tokens/s (completed requests and their tokens over
the time from the first send to the last response), TTFT p50/p99 (send to the first chunk with text),
inter-token latency p50/p99 (gaps between consecutive text chunks of a stream, all streams pooled, as
vLLM's ITL), errors (HTTP errors, error events, broken connections), incomplete streams (no finish_reason,
no usage, missing [DONE] from lmforge, or fewer tokens than asked without a stop) and the server's peak
RSS during the workload (/proc VmRSS sampled every 20 ms). p99 is the nearest rank.

Output: one JSON object per figure (name, value, unit, peer, ratio = value / peer, conditions):
  serve_load_<workload>_<metric>                   value lmforge, peer lmforge_today
  serve_load_<workload>_<metric>_vs_transformers   value lmforge, peer transformers
  serve_load_target_<what>                         the issue's targets: value, target, met (true/false/null)
Targets (the issue's, meant for the 64-stream burst on GPT-2 small fp32): burst TTFT p99 <= 0.5x lmforge
today's and <= 0.5x transformers serve's; burst output tokens/s >= 1x today's and >= 1.5x transformers';
at poisson_near, lmforge's ITL p99 <= 2x its ITL p50; burst concurrent >= 4x one at a time. With --repeats
> 1 each figure is the median over repeats (server order rotated). The clients run in this process and
share the CPU with the server, as local clients would. Exit 1 when any lmforge request failed.

    pip install "transformers[serving]"                    # once, for the transformers peer
    python benchmarks/serve_load.py                        # GPT-2-small shape, CPU, all peers
    python benchmarks/serve_load.py --peers lmforge_today --rates 0.5,1,2 --repeats 3
    python benchmarks/serve_load.py --quick                # smoke run: a 2-layer model, small workloads
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from lmforge import GPT, GPTConfig, Tokenizer  # noqa: E402
from lmforge.tokenizer import _bytes_to_unicode  # noqa: E402
from serve import emit  # noqa: E402  (benchmarks/serve.py: one JSON line per figure)

NAME = "bench"
GPT2_SMALL = dict(n_layer=12, n_head=12, n_embd=768)
TINY = dict(n_layer=2, n_head=2, n_embd=64)
PEERS = ("lmforge_today", "transformers")
RATE_FACTORS = {"poisson_low": 0.5, "poisson_near": 0.9, "poisson_high": 1.5}
TRANSFORMERS_MAIN = ("import sys; sys.argv[0] = 'transformers'; "
                     "from transformers.cli.transformers import main; sys.exit(main())")


# ---- the checkpoint ---------------------------------------------------------------------------


def gpt2_shaped_tokenizer(vocab_size: int, directory: Path) -> Tokenizer:
    """A byte-level BPE with GPT-2's layout: ids 0-255 the bytes, then merges, then <|endoftext|> as
    the last id. The merges are meaningless but, as most of GPT-2's, spell whole printable-ASCII
    pieces (every pair, then triples), so a sampled id is almost always text that streams at once."""
    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    ascii_chars = [byte_chars[b] for b in range(32, 127)]
    pairs = [(a, b) for a in ascii_chars for b in ascii_chars]
    triples = ((a + b, c) for a, b in pairs for c in ascii_chars)
    merges = (pairs + [next(triples) for _ in range(vocab_size - 257 - len(pairs))])[: vocab_size - 257]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                          encoding="utf-8")
    return Tokenizer.from_vocab_merges(directory / "vocab.json", directory / "merges.txt")


def write_checkpoint(directory: Path, shape: dict, vocab_size: int) -> tuple[GPTConfig, Tokenizer]:
    scratch = directory / "tokenizer-src"
    scratch.mkdir(parents=True)
    tokenizer = gpt2_shaped_tokenizer(vocab_size, scratch)
    assert tokenizer.vocab_size == vocab_size, tokenizer.vocab_size
    eos = tokenizer.eos_token_id
    config = GPTConfig(**shape, vocab_size=vocab_size, n_positions=1024, bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)
    GPT(config).save_pretrained(directory / NAME, tokenizer=tokenizer)
    return config, tokenizer


# ---- the workloads ----------------------------------------------------------------------------


@dataclass
class Request:
    prompt: str
    max_tokens: int
    at: float = 0.0  # seconds after the workload starts


@dataclass
class Workload:
    name: str
    requests: list[Request]
    rate: float | None = None  # requests/s of the Poisson arrivals; None: all at once

    def describe(self, tokenizer: Tokenizer) -> dict:
        lengths = [len(ids) for ids in tokenizer.encode_batch([r.prompt for r in self.requests])]
        outputs = [r.max_tokens for r in self.requests]
        return dict(workload=self.name, requests=len(self.requests), rate=self.rate and round(self.rate, 3),
                    prompt_tokens_mean=round(statistics.mean(lengths), 1), prompt_tokens_max=max(lengths),
                    max_tokens_mean=round(statistics.mean(outputs), 1), max_tokens_max=max(outputs))


def text_of(tokenizer: Tokenizer, rng: random.Random, n_tokens: int) -> str:
    """Text that the tokenizer encodes to about n_tokens ids (random merges, re-encoded and cut, as
    vLLM's random dataset does): both servers tokenize the same text with the same tokenizer."""
    ids = [rng.randrange(256, tokenizer.vocab_size - 1) for _ in range(n_tokens)]
    return tokenizer.decode(tokenizer.encode_batch([tokenizer.decode(ids)])[0][:n_tokens])


def mixed_requests(tokenizer: Tokenizer, n: int, prompt_range: tuple[int, int], output_range: tuple[int, int],
                   context: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        new = rng.randint(*output_range)
        out.append(Request(text_of(tokenizer, rng, min(rng.randint(*prompt_range), context - new - 8)), new))
    return out


def poisson(requests: list[Request], rate: float, seed: int) -> list[Request]:
    rng, t, out = random.Random(seed), 0.0, []
    for r in requests:
        out.append(Request(r.prompt, r.max_tokens, t))
        t += rng.expovariate(rate)
    return out


# ---- the server processes ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def transformers_serve_missing() -> str | None:
    """Why `transformers serve --continuous-batching` cannot run here, or None when it should (read from
    the installed files, not by importing transformers: its --help costs seconds of CPU)."""
    missing = [m for m in ("transformers", "fastapi", "uvicorn", "openai", "accelerate")
               if importlib.util.find_spec(m) is None]
    if missing:
        return f"{', '.join(missing)} not installed (pip install \"transformers[serving]\")"
    spec = importlib.util.find_spec("transformers.cli.serve")
    if spec is None or "continuous_batching" not in Path(spec.origin).read_text(encoding="utf-8"):
        return "this transformers has no `transformers serve --continuous-batching` (transformers >= 5 has)"
    return None


def lmforge_has_budget() -> bool:
    """Whether `lmforge serve --help` lists --max-batched-tokens (the same source the servers run)."""
    from lmforge.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return "--max-batched-tokens" in subparsers.choices["serve"].format_help()


def server_env(threads: int | None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


@dataclass
class Peer:
    name: str
    model: str  # the id clients send
    ignore_eos: bool  # lmforge honours ignore_eos; transformers serve refuses unknown fields
    sends_done: bool  # lmforge ends a stream with data: [DONE]; transformers serve does not
    argv: list[str] = field(default_factory=list)


def make_peer(name: str, model_dir: Path, max_batch_size: int, max_queue: int, longest: int,
              budget: int | None) -> Peer:
    if name == "transformers":
        block = 32  # KV blocks for max_batch_size streams of the longest request: the same rows as lmforge
        blocks = max_batch_size * (math.ceil(longest / block) + 1)
        return Peer(name, str(model_dir), False, False, [
            sys.executable, "-c", TRANSFORMERS_MAIN, "serve", str(model_dir), "--continuous-batching",
            "--device", "cpu", "--dtype", "float32", "--host", "127.0.0.1", "--cb-block-size", str(block),
            "--cb-num-blocks", str(blocks), "--log-level", "warning"])
    argv = [sys.executable, "-m", "lmforge", "serve", "--model", str(model_dir), "--device", "cpu",
            "--served-model-name", NAME, "--max-batch-size", str(max_batch_size), "--max-queue", str(max_queue),
            "--log-level", "warning"]
    if name == "lmforge_today":
        argv += ["--max-batched-tokens", "0"]
    elif budget is not None:
        argv += ["--max-batched-tokens", str(budget)]
    return Peer(name, NAME, True, True, argv)


class ServeProcess:
    """One peer's server on a free loopback port; its output is drained so it never blocks."""

    def __init__(self, peer: Peer, threads: int | None) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(peer.argv + ["--port", str(port)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=server_env(threads))
        self.log: deque[str] = deque(maxlen=20)
        threading.Thread(target=lambda: self.log.extend(self.proc.stdout), daemon=True).start()

    def wait_healthy(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"did not come up: {''.join(self.log)[-1500:]}")
            time.sleep(0.2)

    def metrics(self) -> dict[str, float]:
        import httpx

        r = httpx.get(self.url + "/metrics", timeout=10)
        if r.status_code != 200:
            return {}
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", r.text, re.M)}

    def rss_mib(self) -> float | None:
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return None
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        return int(match.group(1)) / 1024 if match else None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class PeakRss:
    """The server's largest resident set while a workload runs (VmRSS every 20 ms; None off Linux)."""

    def __init__(self, server: ServeProcess) -> None:
        self.server, self.peak, self.stop = server, None, threading.Event()

    def _sample(self) -> None:
        while not self.stop.is_set():
            rss = self.server.rss_mib()
            if rss is not None:
                self.peak = max(self.peak or 0.0, rss)
            self.stop.wait(0.02)

    def __enter__(self) -> PeakRss:
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


# ---- the clients ------------------------------------------------------------------------------


@dataclass
class Result:
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)  # inter-token latencies: gaps between text chunks
    tokens: int = 0
    text: str = ""
    error: str | None = None  # an HTTP error, an error event or a broken connection
    incomplete: str | None = None  # no [DONE] (lmforge), no finish_reason or usage, or tokens missing


@dataclass
class Run:
    seconds: float
    results: list[Result] = field(default_factory=list)
    peak_rss_mib: float | None = None

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.results)

    @property
    def completed(self) -> int:
        return sum(r.error is None and r.incomplete is None for r in self.results)

    def count(self, what: str) -> int:
        return sum(getattr(r, what) is not None for r in self.results)

    def ttft(self, q: float) -> float:
        return nearest_rank([r.ttft for r in self.results if r.ttft is not None], q)

    def itl(self, q: float) -> float:
        return nearest_rank([g for r in self.results for g in r.gaps], q)


def nearest_rank(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[max(0, math.ceil(q * len(values)) - 1)] if values else float("nan")


async def stream_one(http, peer: Peer, request: Request) -> Result:
    body = {"model": peer.model, "prompt": request.prompt, "max_tokens": request.max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}  # usage in streams, as OpenAI asks
    if peer.ignore_eos:
        body["ignore_eos"] = True
    result, finish, done, usage, pieces, last = Result(), None, False, False, [], None
    start = time.perf_counter()
    try:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                now, chunk = time.perf_counter(), json.loads(line[6:])
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message", chunk["error"]))
                    continue
                if chunk.get("choices"):
                    choice = chunk["choices"][0]
                    if choice.get("text"):
                        if last is None:
                            result.ttft = now - start
                        else:
                            result.gaps.append(now - last)
                        last = now
                        pieces.append(choice["text"])
                    finish = choice.get("finish_reason") or finish
                if chunk.get("usage"):
                    usage, result.tokens = True, chunk["usage"]["completion_tokens"]
    except Exception as e:  # noqa: BLE001  (a broken connection is one error, the run goes on)
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.text = "".join(pieces)
    stopped_early = finish == "stop" and not peer.ignore_eos
    if result.error is None and not ((done or not peer.sends_done) and usage and
                                     (finish == "length" and result.tokens == request.max_tokens or stopped_early)):
        result.incomplete = f"done={done} finish_reason={finish} completion_tokens={result.tokens}"
    return result


async def send(url: str, peer: Peer, requests: list[Request], sequential: bool = False) -> Run:
    import httpx

    limits = httpx.Limits(max_connections=len(requests) + 4, max_keepalive_connections=len(requests) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(900, connect=60), limits=limits) as http:
        start = time.perf_counter()

        async def arrive(r: Request) -> Result:
            await asyncio.sleep(max(0.0, start + r.at - time.perf_counter()))
            return await stream_one(http, peer, r)

        if sequential:
            results = [await stream_one(http, peer, r) for r in requests]
        else:
            results = await asyncio.gather(*(arrive(r) for r in requests))
        return Run(time.perf_counter() - start, list(results))


def measure(server: ServeProcess, peer: Peer, workload: str, requests: list[Request],
            sequential: bool = False) -> Run:
    with PeakRss(server) as rss:
        run = asyncio.run(send(server.url, peer, requests, sequential))
    run.peak_rss_mib = rss.peak
    progress(f"{peer.name}: {workload}{' one at a time' if sequential else ''}: {len(requests)} requests in "
             f"{run.seconds:.1f} s, {run.completed} completed")
    return run


def progress(message: str) -> None:
    print(f"[serve_load {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- main -------------------------------------------------------------------------------------


METRICS = (("requests_per_s", "requests/s", lambda r: r.completed / r.seconds),
           ("output_tokens_per_s", "tokens/s", lambda r: r.tokens / r.seconds),
           ("ttft_p50", "s", lambda r: r.ttft(0.5)),
           ("ttft_p99", "s", lambda r: r.ttft(0.99)),
           ("itl_p50", "s", lambda r: r.itl(0.5)),
           ("itl_p99", "s", lambda r: r.itl(0.99)),
           ("errors", "requests", lambda r: r.count("error")),
           ("incomplete", "requests", lambda r: r.count("incomplete")),
           ("peak_rss", "MiB", lambda r: r.peak_rss_mib))
METRIC = {name: f for name, _, f in METRICS}
PEER_IS = dict(lmforge="lmforge serve (its default --max-batched-tokens, or this script's)",
               lmforge_today="lmforge serve --max-batched-tokens 0",
               transformers="transformers serve --continuous-batching --device cpu --dtype float32")


def span(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    return int(low), int(high or low)


def rounded(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else round(x, 4)


def divide(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b and not math.isnan(a) and not math.isnan(b) else None


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=64, help="burst: concurrent streaming requests (default: 64)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="burst: prompt length (default: 32)")
    p.add_argument("--max-tokens", type=int, default=32, help="burst: new tokens per request (default: 32)")
    p.add_argument("--requests", type=int, default=64, help="mixed workloads: requests each (default: 64)")
    p.add_argument("--prompt-range", type=span, default=(16, 512), help="mixed prompt tokens LOW:HIGH (16:512)")
    p.add_argument("--output-range", type=span, default=(16, 128), help="mixed new tokens LOW:HIGH (16:128)")
    p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=None,
                   help="three Poisson request rates in req/s, e.g. 0.5,1,2 (default: 0.5x, 0.9x and 1.5x the "
                        "capacity measured by the saturation workload on lmforge)")
    p.add_argument("--shared-prefix-tokens", type=int, default=256, help="shared_prefix: system prompt (256)")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated peers to run beside lmforge "
                   f"(default: {','.join(PEERS)}; empty: none)")
    p.add_argument("--max-batch-size", type=int, default=None, help="the servers' (default: --clients)")
    p.add_argument("--max-batched-tokens", type=int, default=None,
                   help="lmforge's token budget per step (default: the server's own)")
    p.add_argument("--repeats", type=int, default=1, help="repeats; figures are medians (default: 1)")
    p.add_argument("--threads", type=int, default=None, help="the servers' torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="smoke run: a 2-layer 64-wide model, small workloads")
    args = p.parse_args()
    if args.quick:
        args.clients, args.prompt_tokens, args.max_tokens, args.repeats = 8, 16, 8, 1
        args.requests, args.prompt_range, args.output_range, args.shared_prefix_tokens = 12, (16, 96), (4, 16), 64
    if args.rates is not None and len(args.rates) != len(RATE_FACTORS):
        p.error(f"--rates takes {len(RATE_FACTORS)} values (below, near and above capacity)")
    args.peers = [x for x in args.peers.split(",") if x]
    if unknown := set(args.peers) - set(PEERS):
        p.error(f"unknown peers {sorted(unknown)}: choose from {', '.join(PEERS)}")
    args.max_batch_size = args.max_batch_size or args.clients
    return args


@dataclass
class Bench:
    """The workloads, the servers' settings, and every run so far (peer, workload) -> runs."""

    args: argparse.Namespace
    tokenizer: Tokenizer
    model_dir: Path
    burst: Workload
    mixed: list[Request]
    shared: Workload
    workloads: list[Workload]  # burst, saturation, then the Poisson ones once their rates are known
    skipped: dict[str, str]
    runs: dict[tuple[str, str], list[Run]] = field(default_factory=dict)
    sequential: list[Run] = field(default_factory=list)  # lmforge's burst sent one request at a time
    seen: dict[str, dict] = field(default_factory=dict)  # per peer: /metrics figures

    @classmethod
    def plan(cls, args: argparse.Namespace, tokenizer: Tokenizer, model_dir: Path, context: int,
             skipped: dict[str, str]) -> Bench:
        rng = random.Random(0)
        burst = Workload("burst", [Request(text_of(tokenizer, rng, args.prompt_tokens), args.max_tokens)
                                   for _ in range(args.clients)])
        mixed = mixed_requests(tokenizer, args.requests, args.prompt_range, args.output_range, context, 1)
        system = text_of(tokenizer, rng, args.shared_prefix_tokens)
        shared = Workload("shared_prefix", [Request(f"{system}\n{text_of(tokenizer, rng, 16)}", 16)
                                            for _ in range(args.clients)])
        bench = cls(args, tokenizer, model_dir, burst, mixed, shared, [burst, Workload("saturation", mixed)], skipped)
        if args.rates:
            bench.add_rates(dict(zip(RATE_FACTORS, args.rates)))
        return bench

    def add_rates(self, rates: dict[str, float]) -> None:
        self.workloads += [Workload(name, poisson(self.mixed, rate, 2), rate) for name, rate in rates.items()]

    def peer(self, name: str) -> Peer:
        every = [r for w in self.workloads + [self.shared] for r in w.requests]
        longest = max(map(len, self.tokenizer.encode_batch([r.prompt for r in every])))
        longest += max(r.max_tokens for r in every) + 8
        return make_peer(name, self.model_dir, self.args.max_batch_size, max(self.args.clients, self.args.requests) + 4,
                         longest, self.args.max_batched_tokens)

    def run(self, name: str, repeat: int) -> bool:
        """Every workload on a fresh server of this peer; False when transformers serve cannot start."""
        peer, started = self.peer(name), time.perf_counter()
        server = ServeProcess(peer, self.args.threads)
        try:
            try:
                server.wait_healthy()
            except RuntimeError as e:
                if name != "transformers":
                    raise SystemExit(f"{name}: {e}") from None
                self.skipped[name] = str(e)  # a peer that cannot start here is reported, not fatal
                progress(f"skipping peer {name}: {e}")
                return False
            progress(f"{name}: up in {time.perf_counter() - started:.1f} s")
            asyncio.run(send(server.url, peer, [Request(r.prompt, 4) for r in self.burst.requests[:2]]))  # warm-up
            for w in self.workloads:  # the saturation run appends the Poisson workloads when --rates is not given
                one_at_a_time = w is self.burst and name == "lmforge"
                if one_at_a_time and repeat % 2:  # interleaved with the burst, as in earlier versions
                    self.sequential.append(measure(server, peer, w.name, w.requests, sequential=True))
                self.runs.setdefault((name, w.name), []).append(measure(server, peer, w.name, w.requests))
                if one_at_a_time and not repeat % 2:
                    self.sequential.append(measure(server, peer, w.name, w.requests, sequential=True))
                if w.name == "saturation" and len(self.workloads) == 2:
                    run = self.runs[("lmforge", "saturation")][0]
                    if not run.completed:
                        raise SystemExit("saturation: no lmforge request completed, no capacity to derive rates "
                                         "from; pass --rates")
                    self.add_rates({k: f * run.completed / run.seconds for k, f in RATE_FACTORS.items()})
            before = server.metrics() if name != "transformers" else {}
            self.runs.setdefault((name, self.shared.name), []).append(
                measure(server, peer, self.shared.name, self.shared.requests))
            after = server.metrics() if name != "transformers" else {}
            self.seen[name] = dict(max_batch_seen=after.get("lmforge_max_batch_seen"), prefix_metrics={
                k: round(v - before.get(k, 0.0), 3) for k, v in after.items() if "prefix" in k})
            return True
        finally:
            server.close()

    def figure(self, peer: str, workload: str, f) -> float | None:
        values = [f(run) for run in self.runs.get((peer, workload), [])]
        return statistics.median(values) if values and None not in values else None


def report(bench: Bench, conditions: dict) -> None:
    """The figures: earlier versions' burst vs one at a time, each workload vs each peer, the targets."""
    args, runs, sequential, skipped = bench.args, bench.runs, bench.sequential, bench.skipped
    old = dict(conditions, greedy_texts_differ=sum(a.text != b.text for a, b in zip(
        runs[("lmforge", "burst")][0].results, sequential[0].results)),
        baseline="the same requests sent one at a time to the same server",
        client="httpx async streaming (SSE) in the benchmark process, sharing the CPU with the server")
    figures = (("serve_load_requests_per_s", "requests/s", lambda r: len(r.results) / r.seconds, {"target_ratio": 4}),
               ("serve_load_output_tokens_per_s", "tokens/s", lambda r: r.tokens / r.seconds, {"target_ratio": 4}),
               ("serve_load_ttft_p50", "s", lambda r: r.ttft(0.5), {}),
               ("serve_load_ttft_p99", "s", lambda r: r.ttft(0.99), {}),
               ("serve_load_errors", "requests", lambda r: r.count("error"), {}),
               ("serve_load_incomplete", "requests", lambda r: r.count("incomplete"), {}))
    for name, unit, f, extra in figures:
        value = statistics.median(f(run) for run in runs[("lmforge", "burst")])
        peer = statistics.median(f(run) for run in sequential)
        emit(name, round(value, 3), unit, round(peer, 3), round(value / peer, 2) if peer else None, **old, **extra)

    for w in bench.workloads + [bench.shared]:
        described = w.describe(bench.tokenizer)
        for metric, unit, f in METRICS:
            value = bench.figure("lmforge", w.name, f)
            for peer, suffix in (("lmforge_today", ""), ("transformers", "_vs_transformers")):
                if suffix and (peer not in args.peers or peer in skipped):
                    continue  # lmforge's own value is always there, with a null peer when today's did not run
                other = bench.figure(peer, w.name, f)
                emit(f"serve_load_{w.name}_{metric}{suffix}", rounded(value), unit, rounded(other),
                     divide(value, other), **conditions, **described, value_is=PEER_IS["lmforge"],
                     peer_is=PEER_IS[peer], peer_skipped=skipped.get(peer, None if peer in args.peers else "--peers"),
                     **(dict(lmforge_metrics=bench.seen["lmforge"], peer_metrics=bench.seen.get(peer))
                        if w is bench.shared else {}))

    def vs(metric: str, peer: str, workload: str = "burst", metric_of_peer: str | None = None) -> float | None:
        return divide(bench.figure("lmforge", workload, METRIC[metric]),
                      bench.figure(peer, workload, METRIC[metric_of_peer or metric]))

    targets = (("burst_ttft_p99_vs_today", vs("ttft_p99", "lmforge_today"), "<=", 0.5),
               ("burst_ttft_p99_vs_transformers", vs("ttft_p99", "transformers"), "<=", 0.5),
               ("burst_output_tokens_per_s_vs_today", vs("output_tokens_per_s", "lmforge_today"), ">=", 1.0),
               ("burst_output_tokens_per_s_vs_transformers", vs("output_tokens_per_s", "transformers"), ">=", 1.5),
               ("poisson_near_itl_p99_over_p50", vs("itl_p99", "lmforge", "poisson_near", "itl_p50"), "<=", 2.0),
               ("burst_concurrent_vs_sequential", divide(
                   bench.figure("lmforge", "burst", METRIC["output_tokens_per_s"]),
                   statistics.median(r.tokens / r.seconds for r in sequential)), ">=", 4.0))
    for name, value, op, bound in targets:
        met = None if value is None else (value <= bound if op == "<=" else value >= bound)
        emit(f"serve_load_target_{name}", value, "x", None, None, target=f"{op} {bound}", met=met,
             peers_skipped=skipped, **conditions)
        progress(f"target {name} {op} {bound}: {value} "
                 f"{'met' if met else 'NOT met' if met is False else 'not measured'}")


def main() -> int:
    args = parse_args()
    skipped: dict[str, str] = {}
    if "lmforge_today" in args.peers and not lmforge_has_budget():
        skipped["lmforge_today"] = ("`lmforge serve --help` has no --max-batched-tokens: this lmforge has no "
                                    "budget scheduler, so 'lmforge' is today's engine")
    if "transformers" in args.peers and (why := transformers_serve_missing()):
        skipped["transformers"] = why
    for name, why in skipped.items():
        progress(f"skipping peer {name}: {why}")
    others = [x for x in args.peers if x not in skipped]

    with tempfile.TemporaryDirectory(prefix="lmforge-serve-load-") as tmp:
        config, tokenizer = write_checkpoint(Path(tmp), TINY if args.quick else GPT2_SMALL, 50257)
        bench = Bench.plan(args, tokenizer, Path(tmp) / NAME, config.n_positions, skipped)
        for i in range(args.repeats):  # lmforge first (its saturation run sets the rates), the peers rotated
            k = i % max(1, len(others))
            for name in ["lmforge"] + others[k:] + others[:k]:
                if not bench.run(name, i):
                    others.remove(name)

    try:
        import transformers
    except ImportError:
        transformers = None
    conditions = dict(
        device="cpu", dtype="float32", threads=args.threads or torch.get_num_threads(),
        n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd, vocab_size=config.vocab_size,
        clients=args.clients, prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
        max_batch_size=args.max_batch_size, max_batched_tokens=args.max_batched_tokens or "the server's default",
        max_batch_seen=int(bench.seen["lmforge"]["max_batch_seen"] or 0),
        repeats=args.repeats, quick=args.quick, torch=torch.__version__,
        transformers=transformers and transformers.__version__, python=platform.python_version(),
        cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
        command=" ".join([Path(sys.executable).name, *sys.argv]))
    report(bench, conditions)

    failures = [(f"{peer}/{w}", r.error or r.incomplete) for (peer, w), rs in bench.runs.items() for run in rs
                for r in run.results if r.error or r.incomplete]
    failures += [("lmforge/burst one at a time", r.error or r.incomplete) for run in bench.sequential
                 for r in run.results if r.error or r.incomplete]
    for where, why in failures[:8]:
        print(f"{where}: {why}", file=sys.stderr)
    return 1 if any(not where.startswith("transformers/") for where, _ in failures) else 0


if __name__ == "__main__":
    sys.exit(main())
