"""The OpenAI-compatible HTTP server: FastAPI routes over the continuous-batching Engine.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models and /v1/models/{id}, POST
/tokenize (vLLM's: prompt ids, so that a client can fit a chat into the context), GET /health,
GET /metrics (Prometheus text), GET / (the playground page); every GET answers HEAD too. Streaming
answers are server-sent events exactly as OpenAI sends them (`data: {...}` chunks, then `data: [DONE]`).
Every error is an OpenAI-style `{"error": {...}}` body with a 4xx status naming the field at fault
(5xx only for the server's own failures); a request that fails never takes the server down.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI
from fastapi import Request as HTTPRequest  # the HTTP request (the engine has its own requests)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.errors import ConfigError, LmforgeError
from lmforge.serve.chat import ChatTemplate
from lmforge.serve.config import ServerConfig
from lmforge.serve.engine import Engine, EngineStoppedError, Output, QueueFullError, RequestError
from lmforge.serve.protocol import (
    ChatCompletionRequest, ChatMessage, CompletionRequest, TokenizeRequest, error_body, json_type,
)

log = logging.getLogger("lmforge.serve")
STATIC_DIR = Path(__file__).resolve().parent / "static"
_PUBLIC_PATHS = ("/health", "/")  # the page and its files hold no data; its API calls carry the key
SHUTDOWN_GRACE_S = 5.0  # after --shutdown-timeout: for the last error events to be written
RETRY_AFTER_S = 1  # what a 429 tells the client to wait: rows free up as fast as sequences finish


class _APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.body = status, error_body(message, type, param, code)


class _Failed(Exception):
    """The engine reported an error for this request."""

    code: str | None = None


class _TimedOut(_Failed):
    """The request ran past the engine's request_timeout (HTTP 504, code "timeout")."""

    code = "timeout"


class _ShutDown(_Failed):
    """The server stopped (SIGTERM) before the request finished within --shutdown-timeout (HTTP 503)."""

    code = "shutdown"


_FAILURES = {cls.code: cls for cls in (_TimedOut, _ShutDown)}


class _ErrorResponse(JSONResponse):
    """An error body that always renders: text echoed from a request (a model name, a key) may hold
    lone surrogates, which are written as JSON escapes rather than failing the response."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "backslashreplace")


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return _ErrorResponse(body, status_code=status, headers=headers)


def _key_credentials(api_key: str) -> list[bytes]:
    """The Authorization tokens that carry `api_key`: its UTF-8 bytes (curl, the playground page), and
    its Latin-1 bytes where it has them (what browsers' fetch, requests and http.client send)."""
    forms = [api_key.encode("utf-8")]
    with contextlib.suppress(UnicodeEncodeError):
        if api_key.encode("latin-1") != forms[0]:
            forms.append(api_key.encode("latin-1"))
    return forms


class _Limits:
    """Pure ASGI middleware: the API key on every route but the public ones, and a cap on body size.
    The key is compared as bytes, as the client sent them (a header is bytes, not text)."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.max_body = app, max_body_bytes
        self.credentials = _key_credentials(api_key) if api_key else []

    def authorized(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        ok = scheme.lower() == b"bearer"
        return any([hmac.compare_digest(token, form) for form in self.credentials]) and ok  # no early exit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        path = scope["path"]
        if self.credentials and path not in _PUBLIC_PATHS and not path.startswith("/static/"):
            if not self.authorized(headers.get("authorization", b"")):
                body = error_body("Incorrect or missing API key: send the header 'Authorization: Bearer <key>'",
                                  "authentication_error", code="invalid_api_key")
                return await _json(401, body)(scope, receive, send)
        length = headers.get("content-length", b"").decode("latin-1") or None
        too_large = error_body(f"request body is larger than the server's limit of {self.max_body} bytes",
                               code="request_too_large")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await _json(413, too_large)(scope, receive, send)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:  # a chunked body without Content-Length
                    raise StarletteHTTPException(413, too_large["error"]["message"])
            return message

        await self.app(scope, limited_receive, send)


# ---- errors: always OpenAI's body ----------------------------------------------------------

# Errors raised while handling a request -> (status, OpenAI error type, code); the message is str(exc).
_ERROR_STATUS: dict[type[Exception], tuple[int, str, str | None]] = {
    QueueFullError: (429, "rate_limit_error", "rate_limit_exceeded"),
    EngineStoppedError: (503, "server_error", "service_unavailable"),
    ConfigError: (400, "invalid_request_error", None),
    _TimedOut: (504, "server_error", "timeout"),
    _ShutDown: (503, "server_error", "shutdown"),
    _Failed: (500, "server_error", None),
}


async def _known_error(http: HTTPRequest, exc: Exception) -> JSONResponse:
    status, kind, code = next(_ERROR_STATUS[t] for t in type(exc).__mro__ if t in _ERROR_STATUS)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else None
    return _json(status, error_body(str(exc), kind, getattr(exc, "param", None), code), headers)


async def _api_error(http: HTTPRequest, exc: _APIError) -> JSONResponse:
    return _json(exc.status, exc.body)


async def _invalid(http: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    where = ".".join(loc)
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    ctx = first.get("ctx") or {}
    param = loc[0] if loc else None
    if "param" in ctx:  # a check over the whole body that knows which field it is about
        param = ctx["param"]
    elif first.get("type") == "json_invalid":
        message, param = f"the request body is not valid JSON: {ctx.get('error', message)}", None
    elif not loc:  # the body itself: empty, not JSON, or JSON but not an object
        message = _body_problem(http, first)
    elif not message.startswith(where):
        message = f"{where}: {message}"
    return _json(400, error_body(message, param=param))


def _body_problem(http: HTTPRequest, error: dict) -> str:
    """What is wrong with a body that is not a JSON object, in words a curl user can act on."""
    body = error.get("input")
    content_type = http.headers.get("content-type", "")
    if error.get("type") == "missing":
        return "the request body is empty: send a JSON object with the header 'Content-Type: application/json'"
    if isinstance(body, (bytes, bytearray)):  # FastAPI parses JSON only when the content type says JSON
        return (f"the request body must be JSON sent with the header 'Content-Type: application/json' "
                f"(this one came as {content_type!r}: with curl, add -H 'Content-Type: application/json')")
    return f"the request body must be a JSON object, got {json_type(body)}"


async def _http_error(http: HTTPRequest, exc: StarletteHTTPException) -> JSONResponse:
    message = str(exc.detail)
    if message == "There was an error parsing the body":  # FastAPI's words when json.loads fails oddly
        message = ("the request body could not be parsed as JSON: send a JSON object encoded as UTF-8, nested "
                   "less than a few hundred levels deep, with numbers of at most 4300 digits")
    return _json(exc.status_code, error_body(message, "invalid_request_error" if exc.status_code < 500
                                             else "server_error"), getattr(exc, "headers", None))


async def _crash(http: HTTPRequest, exc: Exception) -> JSONResponse:
    log.exception("unhandled error")
    return _json(500, error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"))


# ---- routes -----------------------------------------------------------------------------------


class _Routes:
    """The route handlers and what they share: the engine, the served model name, the chat template."""

    def __init__(self, engine: Engine, name: str, template: ChatTemplate) -> None:
        self.engine, self.name, self.template = engine, name, template
        self.tokenizer = engine.tokenizer
        self.created = int(time.time())

    async def health(self) -> PlainTextResponse:
        return PlainTextResponse("ok")

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "lmforge",
                "max_model_len": self.engine.max_model_len}

    async def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    async def model(self, model_id: str) -> dict:
        """GET /v1/models/{id}: the openai client's models.retrieve."""
        self.check_model(model_id)
        return self.model_card()

    async def metrics(self) -> PlainTextResponse:
        return PlainTextResponse(_prometheus(self.engine.metrics()))

    async def index(self) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        """The prompt ids the chat template makes of the messages (developer is OpenAI's new name for system)."""
        plain = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in messages]
        return self.template.encode(self.tokenizer, plain, add_generation_prompt)

    async def tokenize(self, body: TokenizeRequest) -> dict:
        """POST /tokenize: a prompt's or chat's ids and count, with the context to fit them in."""
        self.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise _APIError(400, "give either prompt (a string) or messages (a chat), not both or neither",
                            param="prompt")
        ids = (self.tokenizer.encode(body.prompt) if body.prompt is not None
               else self.chat_prompt(body.messages, body.add_generation_prompt))
        return {"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": ids}

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.name:
            raise _APIError(404, f"The model `{requested}` does not exist; this server serves `{self.name}`",
                            param="model", code="model_not_found")

    async def completions(self, body: CompletionRequest, http: HTTPRequest) -> Any:
        self.check_model(body.model)
        if body.echo:
            raise _APIError(400, "echo is not supported by this server", param="echo")
        if body.suffix:
            raise _APIError(400, "suffix is not supported by this server", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise _APIError(400, "best_of other than n is not supported by this server", param="best_of")
        prompt = body.prompt
        if isinstance(prompt, str):
            prompts = [self.tokenizer.encode(prompt)]
        elif prompt and all(isinstance(p, str) for p in prompt):
            prompts = [self.tokenizer.encode(p) for p in prompt]
        elif prompt and all(isinstance(p, list) for p in prompt):
            prompts = [list(p) for p in prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        else:
            raise _APIError(400, "prompt must be a non-empty string, list of strings, or token ids", param="prompt")
        params = body.sampling_params(body.max_tokens or 16, body.logprobs)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.name}
        job = _Job(self.engine, prompts, params, body.n)

        def logprobs(outs: list[Output], offset: int) -> dict | None:
            return None if body.logprobs is None else self.completion_logprobs(outs, offset)

        if body.stream:
            async def chunks() -> AsyncIterator[dict]:
                offsets = [0] * job.total
                async for out in job.events(http):
                    if not (out.text or out.finish_reason or body.logprobs is not None):
                        continue
                    choice = {"index": out.index, "text": out.text,
                              "logprobs": logprobs([out], offsets[out.index]), "finish_reason": out.finish_reason}
                    offsets[out.index] += len(out.text)
                    yield {**head, "choices": [choice]}
            return _sse(job, chunks(), head, body.include_usage)

        results = await job.collect(http)
        choices = [{"index": i, "text": "".join(o.text for o in outs), "logprobs": logprobs(outs, 0),
                    "finish_reason": outs[-1].finish_reason if outs else "abort"} for i, outs in enumerate(results)]
        return {**head, "choices": choices, "usage": job.usage()}

    def completion_logprobs(self, outs: list[Output], offset: int) -> dict:
        """The legacy completions' logprobs: tokens, their logprobs, the top alternatives, text offsets."""
        outs = [o for o in outs if o.token_id is not None]
        tokens = [self.tokenizer.decode([o.token_id]) for o in outs]
        tops, offsets = [], []
        for o, tok in zip(outs, tokens):
            tops.append(None if o.top_logprobs is None else
                        {self.tokenizer.decode([t]): lp for t, lp in o.top_logprobs})
            offsets.append(offset)
            offset += len(tok)
        return {"tokens": tokens, "token_logprobs": [o.logprob for o in outs], "top_logprobs": tops,
                "text_offset": offsets}

    async def chat_completions(self, body: ChatCompletionRequest, http: HTTPRequest) -> Any:
        self.check_model(body.model)
        prompt = self.chat_prompt(body.messages)
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:
            max_tokens = self.engine.max_model_len - max(1, len(prompt))
            if max_tokens < 1:
                raise _APIError(400, f"This model's maximum context length is {self.engine.max_model_len} tokens; "
                                     f"the messages take {len(prompt)}. Please reduce the length of the messages.",
                                param="messages")
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = body.sampling_params(max_tokens, top, extra_stop=self.template.stop)
        params.stop_token_ids += [t for t in self.template.stop_token_ids if t not in params.stop_token_ids]
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            job = _Job(self.engine, [prompt], params, body.n)
        except RequestError as e:  # the prompt of a chat is its messages
            e.param = "messages" if e.param == "prompt" else e.param
            raise

        def logprobs(outs: list[Output]) -> dict | None:
            return None if top is None else self.chat_logprobs(outs)

        if body.stream:
            head = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": self.name,
                    "system_fingerprint": None}

            async def chunks() -> AsyncIterator[dict]:
                for i in range(job.total):  # the role comes first, as OpenAI sends it
                    yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]}
                async for out in job.events(http):
                    if not (out.text or out.finish_reason or top is not None):
                        continue
                    delta = {"content": out.text} if out.text else {}
                    yield {**head, "choices": [{"index": out.index, "delta": delta, "logprobs": logprobs([out]),
                                                "finish_reason": out.finish_reason}]}
            return _sse(job, chunks(), head, body.include_usage)

        results = await job.collect(http)
        choices = [{"index": i, "message": {"role": "assistant", "content": "".join(o.text for o in outs)},
                    "logprobs": logprobs(outs), "finish_reason": outs[-1].finish_reason if outs else "abort"}
                   for i, outs in enumerate(results)]
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.name,
                "system_fingerprint": None, "choices": choices, "usage": job.usage()}

    def chat_logprobs(self, outs: list[Output]) -> dict:
        """Chat's logprobs: per token its text, logprob, UTF-8 bytes and top alternatives."""
        content = []
        for o in outs:
            if o.token_id is None:
                continue
            token = self.tokenizer.decode([o.token_id])
            top = [{"token": (t := self.tokenizer.decode([i])), "logprob": lp, "bytes": list(t.encode())}
                   for i, lp in (o.top_logprobs or [])]
            content.append({"token": token, "logprob": o.logprob, "bytes": list(token.encode()), "top_logprobs": top})
        return {"content": content}


def create_app(engine: Engine, config: ServerConfig | None = None, chat_template: ChatTemplate | None = None,
               model_name: str = "model") -> FastAPI:
    """The FastAPI application; its lifespan starts the engine and stops it (cancelling what still runs).
    chat_template: default, the tokenizer's own template (else the User:/Assistant: one)."""
    config = config or ServerConfig()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Limits, api_key=config.api_key, max_body_bytes=config.max_body_bytes)
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    for exc_type in _ERROR_STATUS:
        app.add_exception_handler(exc_type, _known_error)
    app.add_exception_handler(_APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _crash)
    template = chat_template or ChatTemplate.for_tokenizer(engine.tokenizer)
    routes = _Routes(engine, config.served_model_name or model_name, template)
    read = ["GET", "HEAD"]  # HEAD: what GET would answer, without the body (uptime checks, curl -I)
    app.add_api_route("/health", routes.health, methods=read)
    app.add_api_route("/v1/models", routes.models, methods=read)
    app.add_api_route("/v1/models/{model_id:path}", routes.model, methods=read)  # ids may hold "/" (org/name)
    app.add_api_route("/metrics", routes.metrics, methods=read)
    app.add_api_route("/", routes.index, methods=read)
    app.add_api_route("/v1/completions", routes.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", routes.chat_completions, methods=["POST"])
    app.add_api_route("/tokenize", routes.tokenize, methods=["POST"])
    return app


class _Job:
    """One request in flight: submits to the engine, turns its thread-side events into an async stream,
    and cancels the request in the engine when the client goes away or the handler is cancelled."""

    def __init__(self, engine: Engine, prompts: list[list[int]], params: Any, n: int) -> None:
        self.engine = engine
        self.total = len(prompts) * n
        self.prompt_tokens = sum(max(1, len(p)) for p in prompts)
        self.completion_tokens = 0
        self.finished = 0
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Output] = asyncio.Queue()
        self.request = engine.submit(prompts, params, n, self._push)  # raises ConfigError / QueueFullError

    def _push(self, output: Output) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, output)

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    @property
    def done(self) -> bool:
        return self.finished >= self.total

    async def events(self, http: HTTPRequest) -> AsyncIterator[Output]:
        """Outputs until every choice has finished; raises _Failed on an engine error."""
        try:
            while not self.done:
                try:
                    out = await asyncio.wait_for(self.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
                if out.error is not None:
                    self.finished = self.total
                    raise _FAILURES.get(out.code, _Failed)(out.error)
                if out.token_id is not None:
                    self.completion_tokens += 1
                if out.finish_reason is not None:
                    self.finished += 1
                yield out
        finally:
            if not self.done:
                self.engine.cancel(self.request)  # the client left: free the slots at the next step

    async def collect(self, http: HTTPRequest) -> list[list[Output]]:
        results: list[list[Output]] = [[] for _ in range(self.total)]
        async for out in self.events(http):
            results[out.index].append(out)
        return results


def _sse(job: _Job, chunks: AsyncIterator[dict], head: dict, include_usage: bool) -> StreamingResponse:
    """Server-sent events as OpenAI streams them. Usage comes in a last chunk with no choices when
    stream_options.include_usage is set, else on the chunk that finishes the last choice."""

    def event(data: dict | str) -> bytes:
        text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        return f"data: {text}\n\n".encode()

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                if include_usage:
                    chunk["usage"] = None
                elif job.done and chunk["choices"] and chunk["choices"][0].get("finish_reason"):
                    chunk["usage"] = job.usage()
                yield event(chunk)
            if include_usage:
                yield event({**head, "choices": [], "usage": job.usage()})
        except _Failed as e:
            yield event(error_body(str(e), "server_error", code=e.code))
        yield event("[DONE]")

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _prometheus(metrics: dict[str, Any]) -> str:
    lines = []
    for key, value in metrics.items():
        if key == "batch_size_steps":
            lines.append("# TYPE lmforge_batch_size_steps counter")
            lines += [f'lmforge_batch_size_steps{{size="{size}"}} {count}' for size, count in sorted(value.items())]
        elif key == "histograms":
            for name, h in value.items():
                metric = f"lmforge_{name}"
                lines.append(f"# TYPE {metric} histogram")
                lines += [f'{metric}_bucket{{le="{"+Inf" if bound == float("inf") else f"{bound:g}"}"}} {count}'
                          for bound, count in h["buckets"]]
                lines += [f"{metric}_sum {h['sum']:.6g}", f"{metric}_count {h['count']}"]
        elif isinstance(value, (int, float)):
            counter = not key.startswith(("num_", "max_"))
            metric = f"lmforge_{key}_total" if counter else f"lmforge_{key}"
            lines.append(f"# TYPE {metric} {'counter' if counter else 'gauge'}")
            lines.append(f"{metric} {value}")
    return "\n".join(lines) + "\n"


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """A warning when the server listens beyond this machine with no API key; None when it does not."""
    if api_key:
        return None
    try:
        address = ipaddress.ip_address(host.split("%")[0])
        loopback = (getattr(address, "ipv4_mapped", None) or address).is_loopback
    except ValueError:  # a name: only localhost is known to stay on this machine
        loopback = host == "localhost"
    if loopback:
        return None
    return (f"WARNING: serving on {host} without an API key: anyone who can reach this port can use the model. "
            "Set --api-key (or $LMFORGE_API_KEY), or bind 127.0.0.1 to stay on this machine.")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready socket on host:port (port 0: a free port; read it from getsockname())."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def run_server(engine: Engine, config: ServerConfig, chat_template: ChatTemplate | None = None,
               model_name: str = "model", on_listen: Any = None) -> int:
    """Serve until SIGTERM/SIGINT: stop accepting, give running requests config.shutdown_timeout
    seconds to finish, cancel the rest, return 0. `on_listen(host, port)` is called once bound."""
    import uvicorn

    app = create_app(engine, config, chat_template, model_name)
    sock = bind_socket(config.host, config.port)
    host, port = sock.getsockname()[:2]
    warning = exposure_warning(host, config.api_key)
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            engine.drain(config.shutdown_timeout)  # new requests get 503 from now on
            super().handle_exit(sig, frame)

    # The engine ends what still runs at shutdown_timeout with an error event; uvicorn waits a little
    # longer, so those events reach the clients before it closes the connections.
    server = Server(uvicorn.Config(app, log_level=config.log_level, access_log=False,
                                   timeout_graceful_shutdown=config.shutdown_timeout + SHUTDOWN_GRACE_S,
                                   lifespan="on"))
    received: list[int] = []
    main = threading.current_thread() is threading.main_thread()
    # uvicorn re-raises the signal it stopped on after shutting down; a handler of our own turns that
    # into a normal return, so the process exits 0 after a graceful stop.
    previous = {s: signal.signal(s, lambda sig, frame: received.append(sig)) for s in (signal.SIGTERM,)} if main else {}
    if on_listen is not None:
        on_listen(host, port)
    try:
        server.run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sock.close()
    if not server.started:
        raise LmforgeError(f"the server on {host}:{port} failed to start (see the log above)")
    return 0
