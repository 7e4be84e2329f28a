"""Continuous batching: one scheduler thread owns the model and decodes every running sequence at once.

Sequences join the running batch at the next decode step and leave as soon as they finish; nobody
waits for the slowest member of a batch. The layout is a set of static slots over one KV cache with a
shared length (model.KVCache's contract: every row writes its next key/value at the same index):

- Row r's tokens are right-aligned so they end at the shared `length`; the positions before its first
  token are left padding, masked out through the attention mask, and its position ids count only its
  own tokens. Its logits are therefore those of the sequence decoded alone (up to float rounding).
- A new sequence is prefilled alone (batch 1), then its keys/values are copied into the next free row,
  right-aligned. A prompt longer than the shared length shifts the running rows right first.
- Rows 0..n-1 are always the running ones: a finished row is replaced by the last row, so a step costs
  n rows, not max_batch_size. When the shared length reaches the capacity, the common left padding is
  cut (compaction); the capacity grows by doubling up to max_model_len.

Each sequence samples with its own parameters and (when seeded) its own generator, so a seeded or
greedy request gives the same tokens alone or batched. The thread never dies from one request: an
error inside a sequence fails that request only; an error in the batched forward fails the running
requests and the scheduler carries on.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from lmforge.errors import ConfigError, LmforgeError
from lmforge.generation.sampling import apply_repetition_penalty, top_k_filter, top_p_filter
from lmforge.generation.stream import IncrementalDecoder
from lmforge.model import GPT

log = logging.getLogger("lmforge.serve")


class QueueFullError(LmforgeError):
    """The waiting queue is full; the server answers 429 and the client should retry later."""


class EngineStoppedError(LmforgeError):
    """The engine is shutting down or stopped and takes no new requests (HTTP 503)."""


@dataclass
class EngineConfig:
    """Scheduler limits. max_model_len (prompt + completion) defaults to the model's context."""

    max_batch_size: int = 8
    max_model_len: int | None = None
    max_queue: int = 64  # requests waiting for a slot; one more is refused (429)

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ConfigError(f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")


@dataclass
class SamplingParams:
    """Per-request decoding options, with OpenAI's names and meanings (top_k, repetition_penalty,
    stop_token_ids, ignore_eos are vLLM's extras). temperature 0 is greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # alternatives per token to return (0: only the chosen token's)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0 <= self.temperature <= 2:
            raise ConfigError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ConfigError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError("stop must be a non-empty string or a list of non-empty strings")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ConfigError(f"logprobs must be in [0, 20], got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Output:
    """One event of one sequence: a new token (text may be "" while held back), its end, or an error."""

    index: int  # the choice index within the request (prompt i, sample j -> i * n + j); -1: whole request
    text: str = ""
    token_id: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort"
    error: str | None = None


class Request:
    """A submitted request: its prompts x n sequences, parameters and event callback; cancel() frees its slots."""

    def __init__(self, rid: int, prompts: list[list[int]], params: SamplingParams, n: int,
                 callback: Callable[[Output], None]) -> None:
        self.id = rid
        self.prompts = prompts
        self.params = params
        self.n = n
        self.callback = callback
        self.cancelled = False
        self.failed = False
        self.unfinished = len(prompts) * n
        self.arrival = time.monotonic()

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def cancel(self) -> None:
        self.cancelled = True


class _Sequence:
    """One choice being generated: its tokens, text so far, stop-string hold-back, sampler state."""

    def __init__(self, request: Request, index: int, prompt: list[int], tokenizer: Any, device: torch.device) -> None:
        self.request = request
        self.params = p = request.params
        self.index = index
        self.prompt = prompt
        self.output: list[int] = []
        self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True)
        self.text = ""
        self.sent = 0  # characters of text already delivered
        self.generator = None
        if p.seed is not None and not p.greedy:
            # Choice j of a seeded request draws from seed + j: n samples differ, each reproducible.
            self.generator = torch.Generator(device=device).manual_seed(p.seed + index % request.n)
        self.counts: torch.Tensor | None = None  # occurrences of each token in the output (penalties)
        self.logprobs: tuple[float | None, list[tuple[int, float]] | None] = (None, None)  # of the newest token

    def add(self, token: int, stop_ids: set[int]) -> tuple[str, str | None]:
        """Append a token; return (text to deliver now, finish reason or None)."""
        self.output.append(token)
        p = self.params
        if token in stop_ids:
            return self._finish("stop")
        self.text += self.decoder.push(token)
        if p.stop:
            hit = min((i for i in (self.text.find(s, self.sent) for s in p.stop) if i != -1), default=-1)
            if hit != -1:
                delta, self.sent = self.text[self.sent:hit], hit
                return delta, "stop"
        if len(self.output) >= p.max_tokens:
            return self._finish("length")
        end = len(self.text) - _held_back(self.text, p.stop)
        delta, self.sent = self.text[self.sent:end], max(self.sent, end)
        return delta, None

    def _finish(self, reason: str) -> tuple[str, str]:
        self.text += self.decoder.flush()
        end = len(self.text)
        for s in self.params.stop:  # the flushed tail can still complete a stop string
            i = self.text.find(s, self.sent)
            if i != -1:
                end, reason = min(end, i), "stop"
        delta, self.sent = self.text[self.sent:end], end
        return delta, reason


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that could begin a stop string (not yet safe to send)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


class _RowsView:
    """The first n rows of the engine's cache, with the update/advance interface GPT.forward_hidden uses."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, n: int, length: int) -> None:
        self.k, self.v, self.length = k[:, :n], v[:, :n], length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.size(2)
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


class Engine:
    """The continuous-batching scheduler. submit() from any thread; events arrive through callbacks
    called on the engine thread (keep them short: hand the event to your own loop)."""

    def __init__(self, model: GPT, tokenizer: Any, config: EngineConfig | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config = config or EngineConfig()
        context = model.config.n_positions
        if config.max_model_len is not None and config.max_model_len > context:
            raise ConfigError(f"max_model_len {config.max_model_len} exceeds the model's context n_positions={context}")
        self.max_model_len = config.max_model_len or context
        self.max_batch_size = config.max_batch_size
        self.device = model.device
        vocab = getattr(tokenizer, "vocab_size", model.config.vocab_size)
        self.vocab_limit = min(vocab, model.config.vocab_size)  # never sample ids the tokenizer cannot decode
        eos = tokenizer.eos_token_id if getattr(tokenizer, "eos_token_id", None) is not None else model.config.eos_token_id
        self.eos_ids = {eos} if eos is not None else set()
        self.start_token = eos if eos is not None else 0  # an empty prompt starts from <|endoftext|>, as GPT-2

        cfg = model.config
        self._capacity = min(self.max_model_len, 128)
        shape = (cfg.n_layer, self.max_batch_size, cfg.n_head, self._capacity, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=model.dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=model.dtype, device=self.device)
        self.mask = torch.zeros(self.max_batch_size, self._capacity, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(self.max_batch_size, dtype=torch.long, device=self.device)
        self.next_tokens = torch.zeros(self.max_batch_size, dtype=torch.long, device=self.device)
        self.length = 0
        self.rows: list[_Sequence] = []

        self._waiting: deque[_Sequence] = deque()
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._accepting = True
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.counters: dict[str, int] = dict.fromkeys(
            ["requests_submitted", "requests_rejected", "requests_finished", "requests_failed", "requests_cancelled",
             "prompt_tokens", "generation_tokens", "decode_steps", "decode_rows", "joined_running_batch",
             "max_batch_seen", "compactions", "scheduler_errors"], 0)
        self.batch_size_steps = [0] * (self.max_batch_size + 1)  # decode steps run at each batch size

    # ---- public API (any thread) ---------------------------------------------------------

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, drain_timeout: float = 0.0) -> None:
        """Stop taking requests, let running ones finish for up to drain_timeout seconds, cancel the rest."""
        with self._cond:
            self._accepting = False
        deadline = time.monotonic() + drain_timeout
        while self.num_running + self.num_waiting and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def check_prompt(self, prompt: list[int], max_tokens: int) -> None:
        """Raise ConfigError when prompt + max_tokens does not fit the context or ids are out of range."""
        if any(not 0 <= t < self.vocab_limit for t in prompt):
            bad = next(t for t in prompt if not 0 <= t < self.vocab_limit)
            raise ConfigError(f"prompt token id {bad} is outside the vocabulary 0..{self.vocab_limit - 1}")
        length = max(1, len(prompt))
        if length + max_tokens > self.max_model_len:
            raise ConfigError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{length + max_tokens} tokens ({length} in the prompt, {max_tokens} in the completion). "
                "Please reduce the length of the prompt or the completion (max_tokens).")

    def submit(self, prompts: list[list[int]], params: SamplingParams, n: int = 1,
               callback: Callable[[Output], None] | None = None) -> Request:
        """Queue prompts x n sequences; events go to `callback`. Raises ConfigError (does not fit),
        QueueFullError (queue full) or EngineStoppedError (shutting down)."""
        if not prompts:
            raise ConfigError("the request has no prompt")
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"n must be an integer >= 1, got {n!r}")
        if len(prompts) * n > self.max_batch_size:
            raise ConfigError(f"the request needs {len(prompts) * n} sequences (prompts x n) but the server runs "
                              f"at most {self.max_batch_size} at once (--max-batch-size)")
        for prompt in prompts:
            self.check_prompt(prompt, params.max_tokens)
        bad = [t for t in params.logit_bias if not 0 <= t < self.vocab_limit]
        if bad:
            raise ConfigError(f"logit_bias token id {bad[0]} is outside the vocabulary 0..{self.vocab_limit - 1}")
        request = Request(next(self._ids), [list(p) or [self.start_token] for p in prompts], params, n,
                          callback or (lambda output: None))
        with self._cond:
            if not self._accepting:
                raise EngineStoppedError("the server is shutting down and takes no new requests")
            if self._num_waiting_requests() >= self.config.max_queue:
                self.counters["requests_rejected"] += 1
                raise QueueFullError(f"the server is busy: {self.config.max_queue} requests are already waiting; "
                                     "retry later")
            for i, prompt in enumerate(request.prompts):
                for j in range(n):
                    self._waiting.append(_Sequence(request, i * n + j, prompt, self.tokenizer, self.device))
            self.counters["requests_submitted"] += 1
            self.counters["prompt_tokens"] += request.prompt_tokens
            self._cond.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        """Drop a request (its client went away); its rows leave the batch before the next step."""
        if not request.cancelled:
            self.counters["requests_cancelled"] += 1
        request.cancel()
        with self._cond:
            self._cond.notify_all()

    def generate(self, prompts: list[list[int]], params: SamplingParams, n: int = 1,
                 timeout: float | None = None) -> list[list[Output]]:
        """Submit and wait (for scripts and tests): the events of each choice, in choice order."""
        done = threading.Event()
        events: list[Output] = []
        total = len(prompts) * n
        finished = [0]

        def collect(output: Output) -> None:
            events.append(output)
            if output.error is not None or output.finish_reason is not None:
                finished[0] += 1 if output.index >= 0 else total
                if finished[0] >= total:
                    done.set()

        self.submit(prompts, params, n, collect)
        if not done.wait(timeout):
            raise TimeoutError(f"generation did not finish within {timeout} s")
        errors = [e.error for e in events if e.error is not None]
        if errors:
            raise LmforgeError(errors[0])
        return [[e for e in events if e.index == i] for i in range(total)]

    @property
    def num_running(self) -> int:
        return len(self.rows)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def _num_waiting_requests(self) -> int:
        return len({id(s.request) for s in self._waiting})

    def metrics(self) -> dict[str, Any]:
        """Counters and gauges (a snapshot; /metrics serves them in Prometheus' text format)."""
        with self._cond:
            waiting_requests = self._num_waiting_requests()
        steps = {size: count for size, count in enumerate(list(self.batch_size_steps)) if count}
        return dict(self.counters, num_running=self.num_running, num_waiting=self.num_waiting,
                    num_waiting_requests=waiting_requests, max_batch_size=self.max_batch_size,
                    max_model_len=self.max_model_len, batch_size_steps=steps)

    # ---- the scheduler thread --------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self.rows:
                    self._cond.wait()
                if self._stopping:
                    break
            try:
                self._drop_cancelled()
                self._admit()
                if self.rows:
                    self._step()
            except Exception as e:  # never let the thread die: fail what was running, keep serving
                log.exception("scheduler error")
                self.counters["scheduler_errors"] += 1
                for seq in list(self.rows):
                    self._fail(seq.request, f"internal error during decoding: {type(e).__name__}: {e}")
                self.rows.clear()
                self.length = 0
        self._abort_all("the server is shutting down")

    def _abort_all(self, message: str) -> None:
        with self._cond:
            pending = list(self._waiting)
            self._waiting.clear()
        seen: set[int] = set()
        for seq in self.rows + pending:
            if id(seq.request) not in seen:
                seen.add(id(seq.request))
                self._fail(seq.request, message)
        self.rows.clear()

    def _emit(self, request: Request, output: Output) -> None:
        try:
            request.callback(output)
        except Exception:  # a broken consumer only loses its own request
            log.exception("request %s: event callback failed", request.id)
            request.cancel()

    def _fail(self, request: Request, message: str) -> None:
        if request.failed:
            return
        request.failed = True
        request.cancel()
        self.counters["requests_failed"] += 1
        self._emit(request, Output(index=-1, error=message))

    def _drop_cancelled(self) -> None:
        for r in range(len(self.rows) - 1, -1, -1):
            seq = self.rows[r]
            if seq.request.cancelled:
                if not seq.request.failed:
                    self._emit(seq.request, Output(index=seq.index, finish_reason="abort"))
                self._remove_row(r)
        with self._cond:
            if any(s.request.cancelled for s in self._waiting):
                self._waiting = deque(s for s in self._waiting if not s.request.cancelled)

    def _admit(self) -> None:
        """Move waiting sequences into free rows: prefill alone, pick the first token, copy into a row."""
        prefilled: tuple[Any, ...] | None = None  # (request, prompt, k, v, logits): n > 1 shares the prefill
        while len(self.rows) < self.max_batch_size:
            with self._cond:
                if not self._waiting:
                    return
                seq = self._waiting.popleft()
            request = seq.request
            if request.cancelled:
                continue
            try:
                if prefilled is None or prefilled[0] is not request or prefilled[1] is not seq.prompt:
                    prefilled = (request, seq.prompt, *self._prefill(seq.prompt))
                _, _, k, v, logits = prefilled
                token = self._choose(logits[None], [seq])[0]
                finished = self._deliver(seq, token)
                if not finished:
                    if self.rows:
                        self.counters["joined_running_batch"] += 1
                    self._insert(seq, k, v, token)
            except Exception as e:
                log.exception("request %s failed", request.id)
                self._fail(request, f"{type(e).__name__}: {e}")
                self._drop_cancelled()

    @torch.inference_mode()
    def _prefill(self, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        view = _RowsView(*self._scratch(len(prompt)), 1, 0)
        hidden = self.model.forward_hidden(ids, kv_cache=view)
        logits = self.model.lm_head(hidden[0, -1]).float()
        return view.k[:, 0, :, : len(prompt)], view.v[:, 0, :, : len(prompt)], logits

    def _scratch(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.model.config
        shape = (cfg.n_layer, 1, cfg.n_head, length, cfg.head_dim)
        return (torch.empty(shape, dtype=self.model.dtype, device=self.device),
                torch.empty(shape, dtype=self.model.dtype, device=self.device))

    def _insert(self, seq: _Sequence, k: torch.Tensor, v: torch.Tensor, token: int) -> None:
        """Copy a prefilled sequence into row n, right-aligned at the shared length."""
        p = k.size(2)
        if not self.rows:
            self.length = 0
        if p > self.length:
            self._ensure_capacity(p + 1)
            self._shift(p - self.length)
        r, end = len(self.rows), self.length
        self.k[:, r, :, end - p:end] = k
        self.v[:, r, :, end - p:end] = v
        self.mask[r].zero_()
        self.mask[r, end - p:end] = 1
        self.positions[r] = p
        self.next_tokens[r] = token
        self.rows.append(seq)

    def _shift(self, d: int) -> None:
        """Move every running row d positions right (d > 0) or left (d < 0) within the cache."""
        n, L = len(self.rows), self.length
        if d > 0:
            for buf in (self.k, self.v):
                buf[:, :n, :, d:d + L] = buf[:, :n, :, :L].clone()
            self.mask[:n, d:d + L] = self.mask[:n, :L].clone()
            self.mask[:n, :d] = 0
        elif d < 0:
            d = -d
            for buf in (self.k, self.v):
                buf[:, :n, :, : L - d] = buf[:, :n, :, d:L].clone()
            self.mask[:n, : L - d] = self.mask[:n, d:L].clone()
            self.mask[:n, L - d:] = 0
            d = -d
        self.length = L + d

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self._capacity:
            return
        if needed > self.max_model_len:
            raise RuntimeError(f"KV cache needs {needed} positions, more than max_model_len {self.max_model_len}")
        new = min(self.max_model_len, max(needed, 2 * self._capacity))
        L = self.length
        for name in ("k", "v"):
            old = getattr(self, name)
            buf = torch.zeros((*old.shape[:3], new, old.size(4)), dtype=old.dtype, device=old.device)
            buf[:, :, :, :L] = old[:, :, :, :L]
            setattr(self, name, buf)
        mask = torch.zeros(self.max_batch_size, new, dtype=torch.long, device=self.device)
        mask[:, :L] = self.mask[:, :L]
        self.mask, self._capacity = mask, new

    def _make_room(self) -> None:
        """Before a step: one free position after the shared length (grow, else cut common padding)."""
        if self.length < self._capacity:
            return
        if self._capacity < self.max_model_len:
            self._ensure_capacity(self.length + 1)
            return
        n = len(self.rows)
        padding = int((self.length - self.positions[:n]).min())
        if padding < 1:  # cannot happen: every running row still fits max_model_len
            raise RuntimeError("KV cache full with no padding to reclaim")
        self.counters["compactions"] += 1
        self._shift(-padding)

    def _remove_row(self, r: int) -> None:
        last = len(self.rows) - 1
        if r != last:
            L = self.length
            self.k[:, r, :, :L] = self.k[:, last, :, :L]
            self.v[:, r, :, :L] = self.v[:, last, :, :L]
            self.mask[r] = self.mask[last]
            self.positions[r] = self.positions[last]
            self.next_tokens[r] = self.next_tokens[last]
            self.rows[r] = self.rows[last]
        self.rows.pop()
        if not self.rows:
            self.length = 0
        else:
            self._maybe_compact()

    def _maybe_compact(self) -> None:
        """After rows leave: cut the common left padding when it is a quarter of the attention span or more."""
        n = len(self.rows)
        padding = int((self.length - self.positions[:n]).min())
        if padding > 0 and 4 * padding >= self.length:
            self.counters["compactions"] += 1
            self._shift(-padding)

    def _step(self) -> None:
        """One decode step for all running rows, then each row's next token, finish checks, removals."""
        self._make_room()
        n, L = len(self.rows), self.length
        self.mask[:n, L] = 1
        view = _RowsView(self.k, self.v, n, L)
        with torch.inference_mode():
            hidden = self.model.forward_hidden(
                self.next_tokens[:n, None], self.mask[:n, : L + 1], self.positions[:n, None], view)
            logits = self.model.lm_head(hidden[:, -1]).float()
        self.length = view.length
        self.positions[:n] += 1
        self.counters["decode_steps"] += 1
        self.counters["decode_rows"] += n
        self.counters["max_batch_seen"] = max(self.counters["max_batch_seen"], n)
        self.batch_size_steps[n] += 1

        tokens = self._choose(logits, self.rows)
        done: list[int] = []
        for r, (seq, token) in enumerate(zip(self.rows, tokens)):
            try:
                if self._deliver(seq, token):
                    done.append(r)
                else:
                    self.next_tokens[r] = token
            except Exception as e:
                log.exception("request %s failed", seq.request.id)
                self._fail(seq.request, f"{type(e).__name__}: {e}")
        for r in range(len(self.rows) - 1, -1, -1):
            if r in done or self.rows[r].request.cancelled:
                self._remove_row(r)

    def _deliver(self, seq: _Sequence, token: int) -> bool:
        """Record a chosen token, send its event; True when the sequence is finished."""
        stop_ids = set(seq.params.stop_token_ids)
        if not seq.params.ignore_eos:
            stop_ids |= self.eos_ids
        text, reason = seq.add(token, stop_ids)
        logprob, top = seq.logprobs
        self.counters["generation_tokens"] += 1
        self._emit(seq.request, Output(seq.index, text, token, logprob, top, reason))
        if reason is not None:
            seq.request.unfinished -= 1
            if seq.request.unfinished == 0:
                self.counters["requests_finished"] += 1
        return reason is not None

    # ---- sampling ---------------------------------------------------------------------------

    def _choose(self, logits: torch.Tensor, seqs: list[_Sequence]) -> list[int]:
        """Each row's next token under its own parameters; logprobs (of the raw model distribution)
        are left on the sequence for _deliver."""
        logits = logits[:, : self.vocab_limit]
        greedy = logits.argmax(dim=-1).tolist()
        tokens = []
        for i, seq in enumerate(seqs):
            p = seq.params
            row = logits[i]
            adjusted = bool(p.logit_bias or p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0)
            if adjusted:
                row = self._penalize(row, seq)
            if p.greedy:
                token = int(row.argmax()) if adjusted else greedy[i]
            else:
                scores = row[None] / p.temperature
                if p.top_k:
                    scores = top_k_filter(scores, p.top_k)
                if p.top_p < 1:
                    scores = top_p_filter(scores, p.top_p)
                probs = torch.softmax(scores, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=seq.generator))
            if p.logprobs is not None:
                lps = torch.log_softmax(logits[i], dim=-1)
                top = None
                if p.logprobs > 0:
                    values, ids = lps.topk(p.logprobs)
                    top = list(zip(ids.tolist(), values.tolist()))
                seq.logprobs = (float(lps[token]), top)
            if seq.counts is not None:
                seq.counts[token] += 1
            tokens.append(token)
        return tokens

    def _penalize(self, row: torch.Tensor, seq: _Sequence) -> torch.Tensor:
        """logit_bias, then OpenAI's presence/frequency penalties over the output so far, then
        vLLM's repetition penalty (prompt and output)."""
        p = seq.params
        row = row.clone()
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=row.device)
            row[ids] += torch.tensor(list(p.logit_bias.values()), device=row.device, dtype=row.dtype)
        if p.presence_penalty or p.frequency_penalty:
            if seq.counts is None:
                seq.counts = torch.zeros_like(row)
                for t in seq.output:
                    seq.counts[t] += 1
            row = row - p.frequency_penalty * seq.counts - p.presence_penalty * (seq.counts > 0).to(row.dtype)
        if p.repetition_penalty != 1.0:
            ids = torch.tensor([seq.prompt + seq.output], device=row.device)
            row = apply_repetition_penalty(row[None], ids, p.repetition_penalty)[0]
        return row
