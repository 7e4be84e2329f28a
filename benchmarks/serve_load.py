"""Load test of `lmforge serve`: many concurrent streaming clients against one real server process.

A real `lmforge serve` subprocess on a free loopback port serves a random GPT-2-small-shaped
checkpoint (12 layers, 12 heads, 768 wide, vocabulary 50257, fp32) written to a temporary directory.
Its tokenizer is a synthetic GPT-2-format BPE of the same size (256 bytes + 50000 merges spelling
printable-ASCII pairs and triples + <|endoftext|>), so every id the random model samples decodes to
text, almost always whole characters as with GPT-2's own tokenizer, and nothing is downloaded.

Each of --clients requests is a streamed /v1/completions call (httpx, server-sent events) with its own
prompt of --prompt-tokens random token ids, greedy, --max-tokens new tokens, eos ignored. The same
requests are sent twice to the same server (--max-batch-size = --clients by default):
  concurrent  all clients at once, so the engine decodes them as one continuous batch;
  sequential  one at a time (the peer: the batch never holds more than one sequence).
A response counts as complete when its stream ends in `data: [DONE]`, its last choice has
finish_reason "length" and its usage says exactly --max-tokens completion tokens; anything else
(an HTTP error, an error event, a broken stream) is counted, and the script exits 1 if any occur.
Time to first token (TTFT) is measured per request from sending it to the first streamed chunk with a
choice; p99 is the nearest rank (with 64 requests, the slowest one).

Prints one JSON object per figure (name, value, unit, peer = the sequential run, ratio = value / peer,
conditions): requests/s, output tokens/s, TTFT p50 and p99, errors, incomplete responses. With
--repeats > 1 the two modes are interleaved (concurrent first, then sequential first, ...) and each
figure is the median over repeats. Target: concurrent throughput >= 4x sequential.

Sizes: 32-token prompts and 32 new tokens keep a GPT-2-small run on a 2-core CPU to a few minutes
(the sequential pass dominates: 64 x (one prefill + 32 batch-1 decode steps)), while still giving each
request enough decode steps for batching to matter; --max-batch-size 64 lets all 64 clients decode
together. The client runs in this process and shares the CPU with the server, as a local client would.

    python benchmarks/serve_load.py                        # 64 clients, GPT-2-small shape, CPU
    python benchmarks/serve_load.py --clients 32 --max-batch-size 16 --repeats 3
    python benchmarks/serve_load.py --quick                # smoke run: 8 clients, a 2-layer model, < 1 min
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import re
import signal
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


def write_checkpoint(directory: Path, shape: dict, vocab_size: int) -> GPTConfig:
    scratch = directory / "tokenizer-src"
    scratch.mkdir(parents=True)
    tokenizer = gpt2_shaped_tokenizer(vocab_size, scratch)
    assert tokenizer.vocab_size == vocab_size, tokenizer.vocab_size
    eos = tokenizer.eos_token_id
    config = GPTConfig(**shape, vocab_size=vocab_size, n_positions=1024, bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)
    GPT(config).save_pretrained(directory / NAME, tokenizer=tokenizer)
    return config


# ---- the server process -----------------------------------------------------------------------


class ServeProcess:
    """`lmforge serve` on a free loopback port; its stderr is drained so it never blocks."""

    def __init__(self, model_dir: Path, max_batch_size: int, max_queue: int, threads: int | None) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                                          os.environ.get("PYTHONPATH")]))}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmforge", "serve", "--model", str(model_dir), "--port", "0", "--device", "cpu",
             "--served-model-name", NAME, "--max-batch-size", str(max_batch_size), "--max-queue", str(max_queue),
             "--log-level", "warning"],
            stderr=subprocess.PIPE, text=True, env=env)
        self.log: deque[str] = deque(maxlen=20)
        line = self.proc.stderr.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not match:
            self.close()
            raise SystemExit(f"lmforge serve did not start: {line}{''.join(self.log)}")
        self.url = f"http://127.0.0.1:{match.group(1)}"
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()

    def wait_healthy(self, timeout: float = 120) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"lmforge serve did not come up:\n{''.join(self.log)}")
            time.sleep(0.1)

    def metrics(self) -> dict[str, float]:
        import httpx

        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M)}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---- the clients ------------------------------------------------------------------------------


@dataclass
class Result:
    ttft: float | None = None
    tokens: int = 0
    text: str = ""
    error: str | None = None  # an HTTP error, an error event or a broken connection
    incomplete: str | None = None  # the stream ended without [DONE], finish_reason 'length' or all tokens


@dataclass
class Run:
    seconds: float
    results: list[Result] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.results)

    def count(self, what: str) -> int:
        return sum(getattr(r, what) is not None for r in self.results)

    def ttft(self, q: float) -> float:
        times = sorted(r.ttft for r in self.results if r.ttft is not None)
        return times[max(0, math.ceil(q * len(times)) - 1)] if times else float("nan")


async def stream_one(http, prompt: list[int], max_tokens: int) -> Result:
    body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    result, finish, done, pieces = Result(), None, False, []
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
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                    continue
                if chunk.get("choices"):
                    if result.ttft is None:
                        result.ttft = time.perf_counter() - start
                    pieces.append(chunk["choices"][0]["text"])
                    finish = chunk["choices"][0]["finish_reason"] or finish
                if chunk.get("usage"):
                    result.tokens = chunk["usage"]["completion_tokens"]
    except Exception as e:  # noqa: BLE001  (a broken connection is one error, the run goes on)
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.text = "".join(pieces)
    if result.error is None and not (done and finish == "length" and result.tokens == max_tokens):
        result.incomplete = f"done={done} finish_reason={finish} completion_tokens={result.tokens}"
    return result


async def send(url: str, prompts: list[list[int]], max_tokens: int, concurrent: bool) -> Run:
    import httpx

    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600, connect=60), limits=limits) as http:
        start = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(stream_one(http, p, max_tokens) for p in prompts))
        else:
            results = [await stream_one(http, p, max_tokens) for p in prompts]
        return Run(time.perf_counter() - start, list(results))


# ---- main -------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=64, help="concurrent streaming requests (default: 64)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per request (default: 32)")
    p.add_argument("--max-batch-size", type=int, default=None, help="the server's (default: --clients)")
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats; figures are medians (default: 1)")
    p.add_argument("--threads", type=int, default=None, help="the server's torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="smoke run: 8 clients, a 2-layer 64-wide model, 8 tokens")
    args = p.parse_args()
    shape = GPT2_SMALL
    if args.quick:
        shape, args.clients, args.prompt_tokens, args.max_tokens, args.repeats = TINY, 8, 16, 8, 1
    max_batch_size = args.max_batch_size or args.clients
    vocab_size = 50257

    rng = random.Random(0)
    prompts = [[rng.randrange(vocab_size - 1) for _ in range(args.prompt_tokens)] for _ in range(args.clients)]
    runs: dict[str, list[Run]] = {"concurrent": [], "sequential": []}
    with tempfile.TemporaryDirectory(prefix="lmforge-serve-load-") as tmp:
        config = write_checkpoint(Path(tmp), shape, vocab_size)
        server = ServeProcess(Path(tmp) / NAME, max_batch_size, max_queue=args.clients, threads=args.threads)
        try:
            server.wait_healthy()
            asyncio.run(send(server.url, prompts[:2], 4, concurrent=True))  # warm-up
            for i in range(args.repeats):
                order = ("concurrent", "sequential") if i % 2 == 0 else ("sequential", "concurrent")
                for mode in order:
                    runs[mode].append(asyncio.run(send(server.url, prompts, args.max_tokens, mode == "concurrent")))
            metrics = server.metrics()
        finally:
            server.close()

    conditions = dict(
        device="cpu", dtype="float32", threads=args.threads or torch.get_num_threads(),
        n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd, vocab_size=config.vocab_size,
        clients=args.clients, prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
        max_batch_size=max_batch_size, max_batch_seen=int(metrics.get("lmforge_max_batch_seen", 0)),
        repeats=args.repeats, quick=args.quick, torch=torch.__version__, python=platform.python_version(),
        cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
        greedy_texts_differ=sum(a.text != b.text for a, b in zip(runs["concurrent"][0].results,
                                                                  runs["sequential"][0].results)),
        baseline="the same requests sent one at a time to the same server",
        client="httpx async streaming (SSE) in the benchmark process, sharing the CPU with the server")

    def median(mode: str, f) -> float:
        return statistics.median(f(run) for run in runs[mode])

    figures = (("serve_load_requests_per_s", "requests/s", lambda r: len(r.results) / r.seconds, {"target_ratio": 4}),
               ("serve_load_output_tokens_per_s", "tokens/s", lambda r: r.tokens / r.seconds, {"target_ratio": 4}),
               ("serve_load_ttft_p50", "s", lambda r: r.ttft(0.5), {}),
               ("serve_load_ttft_p99", "s", lambda r: r.ttft(0.99), {}),
               ("serve_load_errors", "requests", lambda r: r.count("error"), {}),
               ("serve_load_incomplete", "requests", lambda r: r.count("incomplete"), {}))
    for name, unit, f, extra in figures:
        value, peer = median("concurrent", f), median("sequential", f)
        ratio = round(value / peer, 2) if peer else None
        emit(name, round(value, 3), unit, round(peer, 3), ratio, **conditions, **extra)

    failures = [(mode, r.error or r.incomplete) for mode, rs in runs.items() for run in rs for r in run.results
                if r.error or r.incomplete]
    for mode, why in failures[:5]:
        print(f"{mode}: {why}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
