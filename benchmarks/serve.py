"""Serving throughput: continuous batching vs one request at a time, same model, same process, same run.

Two `lmforge` servers (real uvicorn on loopback, the full HTTP path) over one random model: one with
--max-batch-size N (continuous batching), one with --max-batch-size 1 (one at a time). N concurrent
clients each send --requests-per-client completions (greedy, --max-tokens new tokens, eos ignored).
Runs are interleaved (batched, one-at-a-time, batched, ...); each figure is the median of --repeats.
Prints one JSON object per figure: name, value, unit, peer (one-at-a-time), ratio (value / peer),
conditions.

    python benchmarks/serve.py                          # preset mini, 8 clients, 64 new tokens
    python benchmarks/serve.py --preset gpt2 --device cuda --dtype bf16 --clients 32
    python benchmarks/serve.py --quick                  # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lmforge import GPT, Tokenizer, preset  # noqa: E402
from lmforge.device import resolve_device, resolve_dtype  # noqa: E402
from lmforge.serve import Engine, EngineConfig, ServerConfig, create_app  # noqa: E402
from lmforge.serve.app import bind_socket  # noqa: E402


def emit(name: str, value, unit: str, peer=None, ratio=None, **conditions) -> None:
    print(json.dumps(dict(name=name, value=value, unit=unit, peer=peer, ratio=ratio, conditions=conditions)),
          flush=True)


class Server:
    def __init__(self, model: GPT, tokenizer, max_batch_size: int, clients: int) -> None:
        import uvicorn

        self.engine = Engine(model, tokenizer, EngineConfig(max_batch_size=max_batch_size, max_queue=clients + 1))
        app = create_app(self.engine, ServerConfig(log_level="warning"), model_name="bench")
        self.sock = bind_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


async def load(url: str, clients: int, per_client: int, prompt: str, max_tokens: int) -> tuple[float, int, int]:
    """N clients, each sending its requests one after another. Returns (seconds, requests, tokens)."""
    import httpx

    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    tokens = 0
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        async def client() -> None:
            nonlocal tokens
            for _ in range(per_client):
                r = await http.post("/v1/completions", json=body)
                r.raise_for_status()
                tokens += r.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        seconds = time.perf_counter() - start
    return seconds, clients * per_client, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mini")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny preset, 4 clients, 16 tokens, one repeat")
    args = p.parse_args()
    if args.quick:
        args.preset, args.clients, args.max_tokens, args.repeats, args.requests_per_client = "tiny", 4, 16, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = Tokenizer.byte_level()
    torch.manual_seed(0)
    config = preset(args.preset, vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_token_id)
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    model = GPT(config).eval().to(device=device, dtype=dtype)
    prompt = "abcdefgh" * (args.prompt_tokens // 8) + "x" * (args.prompt_tokens % 8)  # one byte = one token

    batched = Server(model, tokenizer, args.clients, args.clients)
    single = Server(model, tokenizer, 1, args.clients)
    runs: dict[str, list[tuple[float, int, int]]] = {"batched": [], "single": []}
    try:
        for server in (batched, single):  # warm-up
            asyncio.run(load(server.url, 2, 1, prompt, 4))
        for _ in range(args.repeats):
            for name, server in (("batched", batched), ("single", single)):
                runs[name].append(asyncio.run(load(server.url, args.clients, args.requests_per_client, prompt,
                                                   args.max_tokens)))
        seen = batched.engine.counters["max_batch_seen"]
    finally:
        batched.close()
        single.close()

    conditions = dict(
        device=str(device), dtype=str(dtype).removeprefix("torch."), threads=torch.get_num_threads(),
        preset=args.preset, n_layer=config.n_layer, n_embd=config.n_embd, clients=args.clients,
        requests_per_client=args.requests_per_client, prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
        repeats=args.repeats, max_batch_seen=seen, torch=torch.__version__, python=platform.python_version(),
        cpu=platform.processor() or platform.machine(),
        baseline="the same server with --max-batch-size 1 (one request at a time)")
    for figure, unit, index in (("serve_requests_per_s", "requests/s", 1), ("serve_tokens_per_s", "tokens/s", 2)):
        value = statistics.median(r[index] / r[0] for r in runs["batched"])
        peer = statistics.median(r[index] / r[0] for r in runs["single"])
        emit(figure, round(value, 2), unit, round(peer, 2), round(value / peer, 2), **conditions)


if __name__ == "__main__":
    main()
