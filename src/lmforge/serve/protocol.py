"""OpenAI request schemas (pydantic), with vLLM's few extras, and the error body OpenAI answers with.

Numbers are strict ("0.5" is not a temperature) and finite, ranges are OpenAI's (seed: int64,
logit_bias: -100..100), text anywhere in a body must be valid Unicode, and a field of the wrong shape
is refused with a message that names it; unknown fields are ignored, as vLLM does. Responses are built
as plain dicts in app.py, following the same reference (platform.openai.com/docs/api-reference,
vllm/entrypoints/openai/protocol.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AllowInfNan, BaseModel, ConfigDict, Field, Strict, field_validator, model_validator
from pydantic_core import PydanticCustomError

from lmforge.serve.engine import SamplingParams

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict(), AllowInfNan(False)]
Bool = Annotated[bool, Strict()]
TokenId = Annotated[int, Strict(), Field(ge=0)]
LOGIT_BIAS_LIMIT = 100.0  # OpenAI: "values between -100 and 100"


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def json_type(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words ("an array", "null"), for error messages."""
    if value is None:
        return "null"
    for kinds, name in ((bool, "a boolean"), ((int, float), "a number"), (str, "a string"), (list, "an array"),
                        (dict, "an object")):
        if isinstance(value, kinds):
            return name
    return type(value).__name__


def _surrogate_at(text: str) -> int | None:
    """The index of the first lone surrogate in `text` (JSON can spell one: "\\ud800"), else None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def _invalid_text(data: Any) -> tuple[tuple, str, int] | None:
    """(path, text, index) of the first string in a parsed body, keys included, that is not valid
    Unicode; None when all of it is. Iterative: a body may nest as deep as the JSON parser allows."""
    stack: list[tuple[tuple, Any]] = [((), data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            index = _surrogate_at(value)
            if index is not None:
                return path, value, index
        elif isinstance(value, dict):
            for key in value:
                index = _surrogate_at(key) if isinstance(key, str) else None
                if index is not None:
                    return (*path, "<a key>"), key, index
            stack.extend(((*path, key), item) for key, item in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend(((*path, i), item) for i, item in reversed(list(enumerate(value))))
    return None


class _Request(BaseModel):
    """Every request body: unknown fields are ignored; text must be valid Unicode wherever it is."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        found = _invalid_text(data) if isinstance(data, dict) else None
        if found is not None:
            path, text, index = found
            where = ".".join(str(p) for p in path) or "a field name"
            raise PydanticCustomError(
                "invalid_unicode", "{where}: the text holds a lone surrogate ({char}) at index {index}, which is not "
                "valid Unicode and cannot be tokenized; send UTF-8 text",
                {"where": where, "char": ascii(text[index]), "index": index,
                 "param": path[0] if path and path[0] != "<a key>" else None})
        return data


class StreamOptions(_Request):
    include_usage: Bool = False


class _SamplingRequest(_Request):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    n: Int = Field(1, ge=1, le=128)
    temperature: Float | None = Field(None, ge=0, le=2)
    top_p: Float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: Int | None = Field(None, ge=-2**63, le=2**63 - 1)  # OpenAI's int64
    stream: Bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Float | None = Field(None, ge=-2, le=2)
    frequency_penalty: Float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[int, float] | None = None  # JSON's keys are strings; _check_logit_bias makes them ids
    user: str | None = None
    # vLLM extras
    top_k: Int | None = Field(None, ge=-1)
    repetition_penalty: Float | None = Field(None, gt=0)
    ignore_eos: Bool = False
    stop_token_ids: list[TokenId] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value: Any) -> Any:
        stops = [value] if isinstance(value, str) else value
        if value is not None and not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
            raise ValueError(f"stop must be a string or a list of strings, got {json_type(value)}")
        if value is not None and not all(stops):
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _check_logit_bias(cls, value: Any) -> Any:
        """OpenAI's logit_bias: {"token id": bias} with the id as a string of digits and the bias a number
        in [-100, 100]. The vocabulary is checked by the engine, which knows it."""
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError(f"logit_bias must be an object mapping token ids to biases, got {json_type(value)}")
        bias = {}
        for key, number in value.items():
            if not (isinstance(key, str) and key.isascii() and key.isdigit()):
                raise ValueError(f"logit_bias key {key!r} is not a token id (a string of digits, such as \"50256\")")
            if len(key) > 18:
                raise ValueError(f"logit_bias token id {key[:18]}... is outside any vocabulary")
            if isinstance(number, bool) or not isinstance(number, (int, float)) or \
                    not -LOGIT_BIAS_LIMIT <= number <= LOGIT_BIAS_LIMIT:  # NaN fails both comparisons
                raise ValueError(f"logit_bias of token {key} must be a number in [-100, 100], "
                                 f"got {number if isinstance(number, (int, float)) else json_type(number)}")
            bias[int(key)] = float(number)
        return bias

    def sampling_params(self, max_tokens: int, logprobs: int | None, extra_stop: list[str] = ()) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(0, self.top_k or 0),
            seed=self.seed,
            stop=stop + [s for s in extra_stop if s not in stop],
            stop_token_ids=list(self.stop_token_ids or []),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=dict(self.logit_bias or {}),
            logprobs=logprobs,
            ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _check_prompt(value: Any) -> Any:
    """A prompt's shape, with one message for all the shapes it may not have (not one per union member)."""
    def ids(x: Any) -> bool:
        return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(value, str) or ids(value) or (isinstance(value, list) and (
            all(isinstance(p, str) for p in value) or all(ids(p) for p in value))):
        return value
    raise ValueError("prompt must be a string, a list of strings, a list of token ids or a list of lists of "
                     f"token ids, got {json_type(value)}")


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions. prompt: a string, a list of strings, token ids, or lists of token ids."""

    prompt: Union[str, list[str], list[Int], list[list[Int]]]
    max_tokens: Int | None = Field(16, ge=1)
    logprobs: Int | None = Field(None, ge=0, le=20)
    echo: Bool = False
    best_of: Int | None = Field(None, ge=1)
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        return _check_prompt(value)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _check_content(cls, value: Any) -> Any:
        """Text, or a list of text parts: this server reads no images, audio or files."""
        if value is None or isinstance(value, str):
            return value
        wanted = 'only text parts, {"type": "text", "text": "..."}'
        if not isinstance(value, list):
            raise ValueError(f"must be a string or a list of content parts ({wanted}), got {json_type(value)}")
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if not isinstance(part, dict):
                raise ValueError(f"part {i} is {json_type(part)}; this server takes {wanted}")
            if kind != "text":
                raise ValueError(f"part {i} has type {kind!r}; this server takes {wanted}")
            if not isinstance(part.get("text"), str):
                raise ValueError(f'part {i} (type "text") needs a string "text"')
        return value

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int | None = Field(None, ge=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: Bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=20)


class TokenizeRequest(_Request):
    """POST /tokenize (as vLLM's): the ids of a completion prompt or of chat messages rendered by the chat
    template, so that a client (the playground) can fit a conversation into the context."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: Bool = True
