"""Continuous batching: one scheduler thread owns the model and decodes every running sequence at once.

The engine only schedules: the KV cache is model.KVCache, and choosing tokens (filters, penalties,
seeded draws), stop ids and strings and incremental detokenizing come from lmforge.generation, so a
request gives the tokens generate() gives with the same settings and seed.

Sequences join the running batch at the next decode step and leave as soon as they finish; nobody
waits for the slowest member of a batch. The layout is a set of static slots over one KV cache:

- Row r holds its sequence's keys/values left-aligned, positions[r] of them (model.RaggedRows): a
  decode step writes each row's new key/value at its own length and masks the positions past it, and
  its position ids count its own tokens. Its logits are therefore those of the sequence decoded alone
  (up to float rounding). Nothing moves when a sequence joins or leaves, however long it is.
- Each engine step has a token budget (max_batched_tokens, as vLLM's scheduler): every running row
  decodes one token first, then the rest of the budget goes to waiting prompts in arrival order, all in
  one forward pass (model.PackedKVCache led by the running rows). A prompt is prefilled in chunks into
  its own one-row cache (a long one over several steps, holding its rows meanwhile), the chunks of
  several prompts packed together; once complete, it picks its first token and its keys/values are
  copied into the next free row. With prefill_chunk_tokens (off by default), while rows decode and the
  queue is short, a step's prompt chunk is kept small so that streams are not stalled by long prompts
  (stall-free batching, as Sarathi-Serve), at the cost of those prompts' time to first token; with a
  queue, the whole budget goes to it. max_batched_tokens=0 is the
  previous scheduler: each new prompt prefilled whole and alone before the decode step.
- Prefix reuse (prefix_cache_tokens > 0, both schedulers): a completed prompt's one-row cache is kept in
  a PrefixCache (bounded by tokens, LRU); a new prompt starts from a copy of the longest cached prefix
  it shares (never its last token, whose logits choose the first new token) and prefills only the rest.
  Prompt keys/values only: a previous answer's tokens are recomputed when a chat sends them back.
- Rows 0..n-1 are always the running ones: a finished row is replaced by the last row, so a step costs
  n rows, not max_batch_size, and reads the positions of the longest. The capacity grows by doubling
  up to max_model_len, without zeroing the new memory (seconds for a large cache); each row's masked
  tail is zeroed once, when a step first reads it (_finite).

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
from typing import Any, Callable, ClassVar

import torch

from lmforge.config import checked
from lmforge.errors import ConfigError, LmforgeError
from lmforge.generation import GenerationConfig, resolve_config
from lmforge.generation.sampling import Sampler, choose_rows, token_logprobs
from lmforge.generation.stream import TextStream
from lmforge.model import GPT, KVCache, PackedKVCache, RaggedRows
from lmforge.serve.histogram import LATENCY_BUCKETS, TOKEN_BUCKETS, Histogram
from lmforge.serve.prefix_cache import PrefixCache

log = logging.getLogger("lmforge.serve")

# Waiting requests (not yet prefilling) from which a step spends its whole token budget on prompts,
# running streams or not (see Engine._prefill_allowance).
QUEUE_PRESSURE = 4


class QueueFullError(LmforgeError):
    """The waiting queue is full; the server answers 429 and the client should retry later."""


class RequestError(ConfigError):
    """A request the engine cannot take (it does not fit the context, an id is outside the vocabulary);
    `param` names the request field it comes from, for the server's error body."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EngineStoppedError(LmforgeError):
    """The engine is shutting down or stopped and takes no new requests (HTTP 503)."""


@checked
@dataclass
class EngineConfig:
    """Scheduler limits. max_model_len (prompt + completion) defaults to the model's context.

    max_batched_tokens: tokens one engine step computes, the running rows' decodes first, then chunks of
    waiting prompts (several prompts' chunks in one forward pass, a long prompt split over steps). 0: the
    previous scheduler (each prompt prefilled whole and alone while running rows wait). request_timeout:
    seconds a request may wait and run before it ends with an error (None: no limit).
    prefix_cache_tokens: prompt positions whose keys/values are kept for reuse by prompts that start
    with the same tokens (least recently used out first; 0: no reuse).
    prefill_chunk_tokens: while rows decode and fewer than QUEUE_PRESSURE requests wait, a step takes
    at most max(prefill_chunk_tokens, running rows) prompt tokens beside the decodes (0: always the
    rest of the budget), so that no step costs much more than a decode step (see _prefill_allowance)."""

    max_batch_size: int = 8
    max_model_len: int | None = None
    max_queue: int = 64  # requests waiting beyond the free rows; one more is refused (429)
    max_batched_tokens: int = 256
    request_timeout: float | None = None
    prefix_cache_tokens: int = 2048
    prefill_chunk_tokens: int = 0

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ConfigError(f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        budget = self.max_batched_tokens
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise ConfigError(f"max_batched_tokens must be an integer >= 0 (0: whole prompts prefilled alone), "
                              f"got {budget!r}")
        if 0 < budget <= self.max_batch_size:
            # Decodes always run; the budget must leave room for prompt tokens beside a full batch.
            raise ConfigError(f"max_batched_tokens {budget} must exceed max_batch_size {self.max_batch_size} "
                              "(a full batch of decodes must leave room for prompt tokens), or be 0")
        size = self.prefix_cache_tokens
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ConfigError(f"prefix_cache_tokens must be an integer >= 0 (0: no prefix reuse), got {size!r}")
        if self.prefill_chunk_tokens < 0:  # its type is checked by @checked
            raise ConfigError(f"prefill_chunk_tokens must be an integer >= 0 (0: always the whole budget), "
                              f"got {self.prefill_chunk_tokens!r}")
        timeout = self.request_timeout
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout > 0):
            raise ConfigError(f"request_timeout must be a number of seconds > 0 (or None: no limit), got {timeout!r}")


@checked
@dataclass
class SamplingParams:
    """Per-request decoding options, with OpenAI's names and meanings (top_k, repetition_penalty,
    stop_token_ids, ignore_eos are vLLM's extras). temperature 0 is greedy."""

    SEED_RANGE: ClassVar[range] = range(-2**63, 2**64)  # OpenAI's int64, or the generator's uint64

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
        for token, bias in self.logit_bias.items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ConfigError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
                raise ConfigError(f"logit_bias of token {token} must be a number in [-100, 100], got {bias!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generation_config(self, defaults: GenerationConfig) -> GenerationConfig:
        """These options as the GenerationConfig that makes generate() give the same tokens, over the
        model's `defaults` (its eos ids and bos). stop_token_ids stop even with ignore_eos, as in vLLM."""
        eos = [] if self.ignore_eos else list(defaults.eos_token_id or ())
        seed = None if self.seed is None else self.seed % 2**64  # OpenAI's int64 -> the generator's uint64
        sampling = {} if self.greedy else dict(
            do_sample=True, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=seed)
        return defaults.replace(
            max_new_tokens=self.max_tokens, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            logit_bias=dict(self.logit_bias) or None, stop_strings=list(self.stop) or None,
            eos_token_id=eos + [t for t in self.stop_token_ids if t not in eos], **sampling)


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
    code: str | None = None  # with an error: "timeout" when the request ran past request_timeout


class EngineRequest:
    """A submitted request: its prompts x n sequences, options (as given and as a GenerationConfig)
    and event callback; cancel() frees its slots."""

    def __init__(self, rid: int, prompts: list[list[int]], params: SamplingParams, config: GenerationConfig,
                 n: int, callback: Callable[[Output], None]) -> None:
        self.id = rid
        self.prompts = prompts
        self.params = params
        self.config = config
        self.stop_ids = frozenset(config.eos_token_id or ())
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
    """One choice being generated: its tokens, its sampler and its text so far."""

    def __init__(self, request: EngineRequest, index: int, prompt: list[int], tokenizer: Any,
                 device: torch.device) -> None:
        self.request = request
        self.params = request.params
        self.index = index
        self.prompt = prompt
        self.output: list[int] = []
        self.device = device
        config = request.config
        if config.seed is not None and index % request.n:
            # Choice j of a seeded request draws from seed + j: n samples differ, each reproducible.
            config = config.replace(seed=(config.seed + index % request.n) % 2**64)
        self.sampler = Sampler(config, prompt_length=len(prompt), device=device)
        # Prompt and output ids for the filters that read them (penalties), filled in as tokens come.
        self.ids = None if self.sampler.process is None else torch.tensor(prompt + [0] * self.params.max_tokens)
        self.text = TextStream(tokenizer, config.stop_strings or ())
        self.logprobs: tuple[float | None, list[tuple[int, float]] | None] = (None, None)  # of the newest token
        self.last_token_time = 0.0  # when the newest token was delivered (inter-token latency)

    def history(self) -> torch.Tensor:
        """Prompt and output so far, (1, length)."""
        return self.ids[None, : len(self.prompt) + len(self.output)].to(self.device)

    def add(self, token: int) -> tuple[str, str | None]:
        """Append a token; return (text to deliver now, finish reason or None)."""
        if self.ids is not None:
            self.ids[len(self.prompt) + len(self.output)] = token
        self.output.append(token)
        if token in self.request.stop_ids:
            return self.text.finish()[0], "stop"
        piece, stopped = self.text.push(token)
        if stopped:
            return piece, "stop"
        if len(self.output) >= self.params.max_tokens:
            rest, stopped = self.text.finish()
            return piece + rest, "stop" if stopped else "length"
        return piece, None


@dataclass
class _Prefill:
    """A prompt being prefilled chunk by chunk (it holds its sequences' rows): its keys/values so far in a
    one-row cache sized to the prompt. The n sequences of one prompt share it."""

    seqs: list[_Sequence]
    prompt: list[int]
    cache: KVCache

    @property
    def done(self) -> int:
        return self.cache.length

    @property
    def remaining(self) -> int:
        return len(self.prompt) - self.cache.length


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
        self.defaults = resolve_config(model)  # the model's eos ids and bos, resolved as generate() does

        self.cache = model.new_kv_cache(self.max_batch_size, min(self.max_model_len, 128))
        self.positions = torch.zeros(self.max_batch_size, dtype=torch.long, device=self.device)  # tokens per row
        self._written = [self.cache.max_length] * self.max_batch_size  # per row: positions 0.. hold numbers
        self.next_tokens = torch.zeros(self.max_batch_size, dtype=torch.long, device=self.device)
        self.rows: list[_Sequence] = []

        self._waiting: deque[_Sequence] = deque()
        self._prefilling: list[_Prefill] = []  # FIFO; only the last one started can be part-way through
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._admitting = 0  # sequences taken from the queue and not yet in a row (or finished)
        self._accepting = True
        self._stopping = False
        self._drain_deadline: float | None = None  # set by drain(): when what still runs is ended
        self._thread: threading.Thread | None = None
        self.counters: dict[str, int] = dict.fromkeys(
            ["requests_submitted", "requests_rejected", "requests_finished", "requests_failed", "requests_cancelled",
             "prompt_tokens", "generation_tokens", "decode_steps", "decode_rows", "joined_running_batch",
             "max_batch_seen", "kv_cache_grows", "scheduler_errors", "prefill_tokens", "prefill_forwards",
             "engine_steps", "requests_timed_out", "prefix_cache_queries", "prefix_cache_hits",
             "prefix_cache_hit_tokens"], 0)
        self.prefix_cache = PrefixCache(config.prefix_cache_tokens) if config.prefix_cache_tokens else None
        self.batch_size_steps = [0] * (self.max_batch_size + 1)  # decode steps run at each batch size
        self.histograms = {
            "step_tokens": Histogram(TOKEN_BUCKETS),  # tokens computed per engine step (decode + prefill)
            "step_prefill_tokens": Histogram(TOKEN_BUCKETS),  # prompt tokens per step that prefilled any
            "time_to_first_token_seconds": Histogram(LATENCY_BUCKETS),  # arrival -> first token, per choice
            "inter_token_latency_seconds": Histogram(LATENCY_BUCKETS),  # between a choice's tokens
        }

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
        while self.num_running + self.num_prefilling + self.num_waiting and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def drain(self, timeout: float) -> None:
        """Begin a shutdown without blocking (the server calls it on SIGTERM): take no new requests, let
        the admitted ones run for up to `timeout` seconds, then end each one still running with an error
        (code "shutdown") so that every client gets a clean answer before the connections close."""
        with self._cond:
            self._accepting = False
            self._drain_deadline = time.monotonic() + max(0.0, timeout)
            self._cond.notify_all()

    def check_prompt(self, prompt: list[int], max_tokens: int) -> None:
        """Raise RequestError when prompt + max_tokens does not fit the context or ids are out of range."""
        self._check_ids("prompt", prompt)
        length = max(1, len(prompt))
        if length + max_tokens > self.max_model_len:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{length + max_tokens} tokens ({length} in the prompt, {max_tokens} in the completion). "
                "Please reduce the length of the prompt or the completion (max_tokens).", param="prompt")

    def _check_ids(self, name: str, ids: Any) -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab_limit), None)
        if bad is not None:
            raise RequestError(f"{name} token id {bad} is outside the vocabulary 0..{self.vocab_limit - 1}", param=name)

    def submit(self, prompts: list[list[int]], params: SamplingParams, n: int = 1,
               callback: Callable[[Output], None] | None = None) -> EngineRequest:
        """Queue prompts x n sequences; events go to `callback`. Raises RequestError (does not fit),
        QueueFullError (no free row and the queue full) or EngineStoppedError (shutting down)."""
        if not prompts:
            raise RequestError("the request has no prompt", param="prompt")
        if not isinstance(n, int) or n < 1:
            raise RequestError(f"n must be an integer >= 1, got {n!r}", param="n")
        if len(prompts) * n > self.max_batch_size:
            raise RequestError(f"the request needs {len(prompts) * n} sequences (prompts x n) but the server runs "
                               f"at most {self.max_batch_size} at once (--max-batch-size)", param="n")
        for prompt in prompts:
            self.check_prompt(prompt, params.max_tokens)
        self._check_ids("logit_bias", params.logit_bias)
        self._check_ids("stop_token_ids", params.stop_token_ids)
        if any(not p for p in prompts) and self.defaults.start_token_id is None:
            raise RequestError("the prompt is empty and the model has no bos or eos token to start from",
                               param="prompt")
        # An empty prompt starts from bos, as in generate().
        request = EngineRequest(next(self._ids), [list(p) or [self.defaults.start_token_id] for p in prompts],
                                params, params.generation_config(self.defaults), n, callback or (lambda output: None))
        with self._cond:
            if not self._accepting:
                raise EngineStoppedError("the server is shutting down and takes no new requests")
            if self._queued_requests(len(request.prompts) * n) > self.config.max_queue:
                self.counters["requests_rejected"] += 1
                raise QueueFullError(f"the server is busy: every row runs and {self.config.max_queue} requests are "
                                     "already waiting; retry later")
            for i, prompt in enumerate(request.prompts):
                for j in range(n):
                    self._waiting.append(_Sequence(request, i * n + j, prompt, self.tokenizer, self.device))
            self.counters["requests_submitted"] += 1
            self.counters["prompt_tokens"] += request.prompt_tokens
            self._cond.notify_all()
        return request

    def cancel(self, request: EngineRequest) -> None:
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

    @property
    def num_prefilling(self) -> int:
        """Sequences whose prompt is being prefilled (they hold rows, not yet decoding)."""
        return sum(len(job.seqs) for job in self._prefilling)

    def _num_waiting_requests(self) -> int:
        return len({id(s.request) for s in self._waiting})

    def _queued_requests(self, new_sequences: int) -> int:
        """How many waiting requests, a new one of `new_sequences` last, free rows cannot take at once: the
        queue proper. Rows are taken first come, first served, so once one request does not fit, none
        behind it does. Called with the lock held."""
        free = self.max_batch_size - len(self.rows) - self._admitting
        per_request: dict[int, int] = {}
        for seq in self._waiting:
            per_request[id(seq.request)] = per_request.get(id(seq.request), 0) + 1
        queued = 0
        for count in [*per_request.values(), new_sequences]:
            free -= count
            queued += free < 0
        return queued

    def metrics(self) -> dict[str, Any]:
        """Counters and gauges (a snapshot; /metrics serves them in Prometheus' text format)."""
        with self._cond:
            waiting_requests = self._num_waiting_requests()
        steps = {size: count for size, count in enumerate(list(self.batch_size_steps)) if count}
        return dict(self.counters, num_running=self.num_running, num_waiting=self.num_waiting,
                    num_waiting_requests=waiting_requests, num_prefilling=self.num_prefilling,
                    max_batch_size=self.max_batch_size, max_model_len=self.max_model_len,
                    max_batched_tokens=self.config.max_batched_tokens, batch_size_steps=steps,
                    num_prefix_cache_tokens=self.prefix_cache.tokens if self.prefix_cache else 0,
                    max_prefix_cache_tokens=self.config.prefix_cache_tokens,
                    histograms={name: h.snapshot() for name, h in self.histograms.items()})

    # ---- the scheduler thread --------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self.rows and not self._prefilling:
                    self._cond.wait()
                if self._stopping:
                    break
            try:
                if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
                    self._abort_all("the server is shutting down: the request did not finish within its "
                                    "--shutdown-timeout", code="shutdown")
                self._expire()
                self._drop_cancelled()
                if self.config.max_batched_tokens:
                    self._budget_step(self.config.max_batched_tokens)
                else:
                    self._admit()
                    if self.rows:
                        self._step()
            except Exception as e:  # never let the thread die: fail what was running, keep serving
                log.exception("scheduler error")
                self.counters["scheduler_errors"] += 1
                for seq in list(self.rows):
                    self._fail(seq.request, f"internal error during decoding: {type(e).__name__}: {e}")
                self.rows.clear()
        self._abort_all("the server is shutting down")

    def _abort_all(self, message: str, code: str | None = None) -> None:
        with self._cond:
            pending = [seq for job in self._prefilling for seq in job.seqs] + list(self._waiting)
            self._waiting.clear()
        seen: set[int] = set()
        for seq in self.rows + pending:
            if id(seq.request) not in seen:
                seen.add(id(seq.request))
                self._fail(seq.request, message, code)
        self.rows.clear()
        self._drop_prefills(lambda job: True)

    def _emit(self, request: EngineRequest, output: Output) -> None:
        try:
            request.callback(output)
        except Exception:  # a broken consumer only loses its own request
            log.exception("request %s: event callback failed", request.id)
            request.cancel()

    def _fail(self, request: EngineRequest, message: str, code: str | None = None) -> None:
        if request.failed:
            return
        request.failed = True
        request.cancel()
        self.counters["requests_failed"] += 1
        self._emit(request, Output(index=-1, error=message, code=code))

    def _expire(self) -> None:
        """Fail the requests (waiting, prefilling or running) older than request_timeout; their rows are
        freed by _drop_cancelled right after."""
        timeout = self.config.request_timeout
        if timeout is None:
            return
        now = time.monotonic()
        with self._cond:
            seqs = self.rows + [seq for job in self._prefilling for seq in job.seqs] + list(self._waiting)
        for request in {id(s.request): s.request for s in seqs}.values():
            if not request.failed and now - request.arrival > timeout:
                self.counters["requests_timed_out"] += 1
                self._fail(request, f"request timed out after {timeout:g} s (the server's --request-timeout)",
                           code="timeout")

    def _drop_cancelled(self) -> None:
        for r in range(len(self.rows) - 1, -1, -1):
            seq = self.rows[r]
            if seq.request.cancelled:
                if not seq.request.failed:
                    self._emit(seq.request, Output(index=seq.index, finish_reason="abort"))
                self._remove_row(r)
        self._drop_prefills(lambda job: job.seqs[0].request.cancelled)
        with self._cond:
            if any(s.request.cancelled for s in self._waiting):
                self._waiting = deque(s for s in self._waiting if not s.request.cancelled)

    def _drop_prefills(self, which: Callable[[_Prefill], bool]) -> None:
        """Forget the prompts being prefilled that `which` picks; their rows become free."""
        dropped = [job for job in self._prefilling if which(job)]
        if dropped:
            with self._cond:
                self._prefilling = [job for job in self._prefilling if not which(job)]
                self._admitting -= sum(len(job.seqs) for job in dropped)

    def _admit(self) -> None:
        """Move waiting sequences into free rows: prefill alone, pick the first token, copy into a row."""
        prefilled: tuple[Any, ...] | None = None  # (request, prompt, cache, logits): n > 1 shares the prefill
        while len(self.rows) < self.max_batch_size:
            with self._cond:
                if not self._waiting:
                    return
                seq = self._waiting.popleft()
                self._admitting = 1  # holds its row for admission control until it is in self.rows
            request = seq.request
            try:
                if request.cancelled:
                    continue
                if prefilled is None or prefilled[0] is not request or prefilled[1] is not seq.prompt:
                    prefilled = (request, seq.prompt, *self._prefill(seq.prompt))
                self._join(seq, *prefilled[2:])
            except Exception as e:  # the prefill failed
                self._fail_one(seq, e)
            finally:
                with self._cond:
                    self._admitting = 0

    def _join(self, seq: _Sequence, cache: KVCache, logits: torch.Tensor) -> None:
        """A prefilled sequence: choose its first token from the prompt's last logits, send it, and take a
        running row unless that token already finished it. A failure fails only its request."""
        try:
            token = self._choose(logits[None], [seq])[0]
            if not self._deliver(seq, token):
                if self.rows:
                    self.counters["joined_running_batch"] += 1
                self._insert(seq, cache, token)
        except Exception as e:
            self._fail_one(seq, e)

    def _fail_one(self, seq: _Sequence, error: Exception) -> None:
        log.exception("request %s failed", seq.request.id)
        self._fail(seq.request, f"{type(error).__name__}: {error}")
        self._drop_cancelled()

    @torch.inference_mode()
    def _prefill(self, prompt: list[int]) -> tuple[KVCache, torch.Tensor]:
        cache = self.model.new_kv_cache(1, len(prompt), zeroed=False)  # every position written before read
        self._reuse_prefix(prompt, cache)
        ids = torch.tensor([prompt[cache.length:]], dtype=torch.long, device=self.device)
        hidden = self.model.forward_hidden(ids, kv_cache=cache)
        self.counters["prefill_forwards"] += 1
        self.counters["prefill_tokens"] += ids.size(1)
        if self.prefix_cache is not None:
            self.prefix_cache.add(prompt, cache)
        return cache, self.model.lm_head(hidden[0, -1]).float()

    @torch.inference_mode()
    def _reuse_prefix(self, prompt: list[int], cache: KVCache) -> None:
        """Start a prompt's empty one-row cache from the longest prefix the prefix cache holds."""
        if self.prefix_cache is None:
            return
        reused = self.prefix_cache.fill(prompt, cache)
        self.counters["prefix_cache_queries"] += 1
        if reused:
            self.counters["prefix_cache_hits"] += 1
            self.counters["prefix_cache_hit_tokens"] += reused

    # ---- the token-budget scheduler (max_batched_tokens > 0) -------------------------------

    def _budget_step(self, budget: int) -> None:
        """One engine step: every running row decodes one token (n tokens of the budget) and the rest of
        the budget goes to prompt chunks, first come first served, all in one forward pass (each weight
        read once for both); prompts that complete choose their first token and join the running rows
        for the next step."""
        decoded = len(self.rows)
        plan = self._plan_chunks(self._prefill_allowance(budget, decoded))
        prefilled = sum(take for _, take in plan)
        if plan:
            self._run_chunks(plan, decode=decoded > 0)
            self.histograms["step_prefill_tokens"].observe(prefilled)
        elif decoded:
            self._step()
        self.counters["engine_steps"] += 1
        self.histograms["step_tokens"].observe(decoded + prefilled)

    def _prefill_allowance(self, budget: int, decoded: int) -> int:
        """Prompt tokens this step may compute beside `decoded` running rows' decodes. With no row running,
        or with a queue (QUEUE_PRESSURE requests or more waiting for a row), the rest of the budget: time
        to first token and throughput come first. Otherwise at most max(prefill_chunk_tokens, decoded):
        each step then costs about as much as a decode step again at most, so the running streams' tokens
        keep coming at an even pace while a long prompt is prefilled (no stalls)."""
        room = budget - decoded
        chunk = self.config.prefill_chunk_tokens
        if not decoded or not chunk:
            return room
        with self._cond:  # submit() appends to the queue from other threads
            queued = self._num_waiting_requests()
        return room if queued >= QUEUE_PRESSURE else min(room, max(chunk, decoded))

    def _plan_chunks(self, budget: int) -> list[tuple[_Prefill, int]]:
        """(prompt, tokens to prefill now) in FIFO order: the prompts already started, then waiting ones
        while their rows are free, until the budget is spent (the last one may get part of its prompt)."""
        plan = []
        for job in self._prefilling:
            if budget <= 0:
                return plan
            take = min(budget, job.remaining)
            plan.append((job, take))
            budget -= take
        while budget > 0 and (job := self._start_prefill()) is not None:
            take = min(budget, job.remaining)
            plan.append((job, take))
            budget -= take
        return plan

    def _start_prefill(self) -> _Prefill | None:
        """Take the next waiting prompt (its n sequences together) if rows are free for them."""
        with self._cond:
            if not self._waiting:
                return None
            head = self._waiting[0]
            k = 0
            for seq in self._waiting:
                if seq.request is not head.request or seq.prompt is not head.prompt:
                    break
                k += 1
            if len(self.rows) + self._admitting + k > self.max_batch_size:
                return None
            seqs = [self._waiting.popleft() for _ in range(k)]
            self._admitting += k
            # every position is written (by its chunk or a reused prefix) before attention reads it
            job = _Prefill(seqs, head.prompt, self.model.new_kv_cache(1, len(head.prompt), zeroed=False))
            self._prefilling.append(job)
        self._reuse_prefix(job.prompt, job.cache)  # the engine thread alone touches a job's cache
        return job

    def _run_chunks(self, plan: list[tuple[_Prefill, int]], decode: bool = False) -> None:
        """Prefill the planned chunks, with `decode` the running rows' decode step in the same pass. An
        error fails the requests whose chunks were in the pass (and, with decode, the running ones)."""
        rows = self._decode_rows() if decode else None
        try:
            last_hidden = self._forward_chunks(plan, rows)
        except Exception as e:
            for job, _ in plan:
                self._fail(job.seqs[0].request, f"internal error during prefill: {type(e).__name__}: {e}")
            self._drop_prefills(lambda job: job.seqs[0].request.cancelled)
            if decode:
                raise  # the scheduler loop fails the running rows and counts the error
            log.exception("prefill failed")
            self.counters["scheduler_errors"] += 1
            return
        self.counters["prefill_forwards"] += 1
        self.counters["prefill_tokens"] += sum(take for _, take in plan)
        n = rows.index.numel() if rows is not None else 0
        complete = [(i, job) for i, (job, _) in enumerate(plan) if job.remaining == 0]
        with torch.inference_mode():  # the rows' next-token logits, then those of the completed prompts
            logits = self.model.lm_head(last_hidden[list(range(n)) + [n + i for i, _ in complete]]).float()
        if rows is not None:
            self._decoded(logits[:n])
        if not complete:
            return
        logits = logits[n:]
        self._drop_prefills(lambda job: job.remaining == 0)
        if self.prefix_cache is not None:
            for _, job in complete:
                self.prefix_cache.add(job.prompt, job.cache)
        with self._cond:  # the rows stay held until each sequence is in self.rows or finished
            self._admitting += sum(len(job.seqs) for _, job in complete)
        for (_, job), row_logits in zip(complete, logits):
            for seq in job.seqs:
                try:
                    if not seq.request.cancelled:
                        self._join(seq, job.cache, row_logits)
                finally:
                    with self._cond:
                        self._admitting -= 1

    @torch.inference_mode()
    def _forward_chunks(self, plan: list[tuple[_Prefill, int]], rows: RaggedRows | None = None) -> torch.Tensor:
        """One forward pass over the planned chunks (after one token of each running row, with `rows`);
        each prompt's cache grows by its chunk, each running row by its token. Returns the final hidden
        state of each running row's token, then of each chunk's last token, (n + len(plan), C).

        One prompt alone runs in its own cache. Otherwise the tokens are packed into one row (no padding)
        with position ids counting each sequence's own tokens; the weight products run on the whole row,
        attention per sequence on its own cache (model.PackedKVCache)."""
        if len(plan) == 1 and rows is None:
            job, take = plan[0]
            ids = torch.tensor([job.prompt[job.done: job.done + take]], dtype=torch.long, device=self.device)
            return self.model.forward_hidden(ids, kv_cache=job.cache)[:, -1]
        ids, position, ends = [], [], []
        if rows is not None:  # the running rows' next tokens at their own positions
            ids += self.next_tokens[: len(self.rows)].tolist()
            position += rows.lengths.tolist()
            ends += range(len(ids))
        for job, take in plan:
            ids += job.prompt[job.done: job.done + take]
            position += range(job.done, job.done + take)
            ends.append(len(ids) - 1)
        packed = PackedKVCache([job.cache for job, _ in plan], [take for _, take in plan],
                               self.model.config.sliding_window, rows)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        positions = torch.tensor([position], dtype=torch.long, device=self.device)
        hidden = self.model.forward_blocks(input_ids, positions, None, False, packed)
        packed.advance()
        return hidden[0, ends]

    def _insert(self, seq: _Sequence, prefilled: KVCache, token: int) -> None:
        """Copy a prefilled sequence into row n."""
        p, n = prefilled.length, len(self.rows)
        self._ensure_capacity(p + 1)
        self.cache.copy_row(n, prefilled)
        self._written[n] = max(self._written[n], p)
        self.positions[n] = p
        self.next_tokens[n] = token
        self.rows.append(seq)

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self.cache.max_length:
            return
        if needed > self.max_model_len:
            raise RuntimeError(f"KV cache needs {needed} positions, more than max_model_len {self.max_model_len}")
        n = len(self.rows)
        self.cache.grow(min(self.max_model_len, max(needed, 2 * self.cache.max_length)), rows=n)
        self.counters["kv_cache_grows"] += 1
        self._written[n:] = [0] * (self.max_batch_size - n)  # rows not kept: undefined

    def _finite(self, span: int) -> None:
        """Zero what running rows will read but never wrote (memory from grow): attention masks the
        positions past a row's length but reads them, up to the longest row's."""
        for r in range(len(self.rows)):
            if self._written[r] < span:
                end = min(self.cache.max_length, span + 64)  # a little ahead: not one position per step
                self.cache.k[:, r, :, self._written[r]:end] = 0
                self.cache.v[:, r, :, self._written[r]:end] = 0
                self._written[r] = end

    def _remove_row(self, r: int) -> None:
        last = len(self.rows) - 1
        if r != last:
            p = int(self.positions[last])
            self.cache.copy_row(r, self.cache, last, length=p)
            self._written[r] = max(self._written[r], p)
            self.positions[r] = self.positions[last]
            self.next_tokens[r] = self.next_tokens[last]
            self.rows[r] = self.rows[last]
        self.rows.pop()

    def _decode_rows(self) -> RaggedRows:
        """The running rows for a decode step, the cache grown and zeroed as far as the step reads."""
        lengths = self.positions[: len(self.rows)]
        span = int(lengths.max()) + 1
        self._ensure_capacity(span)
        self._finite(span)
        return RaggedRows(self.cache, lengths)

    def _step(self) -> None:
        """One decode step for all running rows (alone: no prompt chunks in the pass)."""
        n = len(self.rows)
        rows = self._decode_rows()
        with torch.inference_mode():
            hidden = self.model.forward_blocks(self.next_tokens[:n, None], rows.lengths[:, None],
                                               rows.mask(self.model.config.sliding_window), False, rows)
            logits = self.model.lm_head(hidden[:, -1]).float()
        self._decoded(logits)

    def _decoded(self, logits: torch.Tensor) -> None:
        """After a decode step: each row's next token from its (n, vocab) logits, finish checks, removals."""
        n = len(self.rows)
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

    def _choose(self, logits: torch.Tensor, seqs: list[_Sequence]) -> list[int]:
        """Each row's next token under its own sampler, among the ids the tokenizer can decode; the
        logprobs (of the raw model distribution) are left on the sequence for _deliver."""
        logits = logits[:, : self.vocab_limit]
        tokens = choose_rows(logits, [s.sampler for s in seqs], [s.history for s in seqs])
        for seq, row, token in zip(seqs, logits, tokens):
            if seq.params.logprobs is not None:
                seq.logprobs = token_logprobs(row, token, seq.params.logprobs)
        return tokens

    def _deliver(self, seq: _Sequence, token: int) -> bool:
        """Record a chosen token, send its event; True when the sequence is finished."""
        text, reason = seq.add(token)
        logprob, top = seq.logprobs
        self.counters["generation_tokens"] += 1
        now = time.monotonic()
        if len(seq.output) == 1:
            self.histograms["time_to_first_token_seconds"].observe(now - seq.request.arrival)
        else:
            self.histograms["inter_token_latency_seconds"].observe(now - seq.last_token_time)
        seq.last_token_time = now
        self._emit(seq.request, Output(seq.index, text, token, logprob, top, reason))
        if reason is not None:
            seq.request.unfinished -= 1
            if seq.request.unfinished == 0:
                self.counters["requests_finished"] += 1
        return reason is not None
