"""`lmforge serve`: an OpenAI-compatible HTTP server (completions, chat, streaming, continuous batching)
with a web playground at /.

    lmforge serve --model gpt2 --port 8000 --max-batch-size 16
    lmforge serve --preset tiny --api-key secret          # offline: a random model, byte-level tokenizer

Flag defaults come from EngineConfig and ServerConfig, so the two never disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmforge.cli.generate import add_quantize_flag
    from lmforge.serve.config import ServerConfig
    from lmforge.serve.engine import EngineConfig

    server = {f.name: f.default for f in dataclasses.fields(ServerConfig)}
    engine = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API, with a web playground",
        description="Serve a checkpoint (directory or Hub name) or a random preset over an OpenAI-compatible API: "
                    "/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics, and a chat page at /.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="PATH_OR_NAME", help="checkpoint directory or Hub name (e.g. gpt2)")
    source.add_argument("--preset", metavar="NAME", help="a randomly initialised preset (e.g. tiny): works offline")
    p.add_argument("--tokenizer", metavar="PATH", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument("--host", default=server["host"], help=f"address to bind (default: {server['host']}, loopback only)")
    p.add_argument("--port", type=int, default=server["port"], help=f"port (default: {server['port']}; 0: any free port)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health and the page "
                        "(default: $LMFORGE_API_KEY, else none; an empty key is refused, and binding a "
                        "non-loopback --host without a key prints a warning)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the model's name)")
    p.add_argument("--max-batch-size", type=int, default=engine["max_batch_size"],
                   help=f"sequences decoded together (default: {engine['max_batch_size']})")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + completion limit (default: the context)")
    p.add_argument("--max-queue", type=int, default=engine["max_queue"],
                   help=f"requests that may wait for a slot; more get 429 (default: {engine['max_queue']})")
    p.add_argument("--max-batched-tokens", type=int, default=engine["max_batched_tokens"], metavar="N",
                   help="tokens computed per engine step: every running sequence's next token first, then chunks "
                        "of waiting prompts (several batched, a long one split over steps); must exceed "
                        "--max-batch-size, or 0 to prefill each prompt whole and alone "
                        f"(default: {engine['max_batched_tokens']})")
    p.add_argument("--prefill-chunk-tokens", type=int, default=engine["prefill_chunk_tokens"], metavar="N",
                   help="while sequences are decoding and fewer than 4 requests wait, a step adds at most "
                        "max(N, running sequences) prompt tokens to their decodes, so that streams get their "
                        "tokens at an even pace while long prompts are prefilled; 0: always the whole "
                        f"--max-batched-tokens (default: {engine['prefill_chunk_tokens']})")
    p.add_argument("--request-timeout", type=float, default=engine["request_timeout"], metavar="SECONDS",
                   help="end a request that has waited and run longer with an error (HTTP 504, or an error "
                        "event in a stream) and free its row (default: no limit)")
    p.add_argument("--prefix-cache-tokens", type=int, default=engine["prefix_cache_tokens"], metavar="N",
                   help="prompt positions whose keys/values are kept so that prompts starting with the same "
                        "tokens (a system prompt, few-shot examples, the chat so far) reuse them instead of "
                        "recomputing them; least recently used out first; 0 disables reuse "
                        f"(default: {engine['prefix_cache_tokens']})")
    p.add_argument("--chat-template", default=None, metavar="FILE_OR_JINJA",
                   help="Jinja chat template (file or text; default: the tokenizer's own, else User:/Assistant:)")
    p.add_argument("--chat-stop", action="append", default=None, metavar="TEXT",
                   help="stop string added to every chat request (repeatable; default template: '\\nUser:')")
    p.add_argument("--max-body-bytes", type=int, default=server["max_body_bytes"],
                   help=f"largest request body accepted (default: {server['max_body_bytes']})")
    p.add_argument("--shutdown-timeout", type=float, default=server["shutdown_timeout"],
                   help=f"on SIGTERM, seconds running requests get to finish before they end with an "
                        f"error (default: {server['shutdown_timeout']})")
    p.add_argument("--log-level", default=server["log_level"], choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
    add_quantize_flag(p)
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--seed", type=int, default=None, help="seed of --preset's random weights (default: 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmforge.cli.generate import load
    from lmforge.serve import ChatTemplate, Engine, EngineConfig, ServerConfig, run_server

    engine_config = EngineConfig(max_batch_size=args.max_batch_size, max_model_len=args.max_model_len,
                                 max_queue=args.max_queue, max_batched_tokens=args.max_batched_tokens,
                                 request_timeout=args.request_timeout, prefix_cache_tokens=args.prefix_cache_tokens,
                                 prefill_chunk_tokens=args.prefill_chunk_tokens)
    api_key = args.api_key if args.api_key is not None else os.environ.get("LMFORGE_API_KEY")  # "" is refused
    server_config = ServerConfig(
        host=args.host, port=args.port, api_key=api_key,
        served_model_name=args.served_model_name, max_body_bytes=args.max_body_bytes,
        shutdown_timeout=args.shutdown_timeout, log_level=args.log_level)
    model, tokenizer = load(args)
    template = ChatTemplate.for_tokenizer(tokenizer, args.chat_template, stop=args.chat_stop)
    name = args.preset or (Path(args.model).name if Path(args.model).exists() else args.model)
    engine = Engine(model, tokenizer, engine_config)

    def listening(host: str, port: int) -> None:
        print(f"lmforge serve: {name} on http://{host}:{port} (playground at /, API at /v1)", file=sys.stderr,
              flush=True)

    return run_server(engine, server_config, template, model_name=name, on_listen=listening)
