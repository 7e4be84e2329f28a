"""OpenAI request schemas (pydantic), with vLLM's few extras, and the error body OpenAI answers with.

Numbers are strict ("0.5" is not a temperature) and ranges are OpenAI's; unknown fields are ignored,
as vLLM does. Responses are built as plain dicts in app.py, following the same reference
(platform.openai.com/docs/api-reference, vllm/entrypoints/openai/protocol.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, Strict

from lmforge.errors import ConfigError
from lmforge.serve.engine import SamplingParams

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: Bool = False


class _SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: Int = Field(1, ge=1, le=128)
    temperature: Float | None = Field(None, ge=0, le=2)
    top_p: Float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: Int | None = None
    stream: Bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Float | None = Field(None, ge=-2, le=2)
    frequency_penalty: Float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Float] | None = None
    user: str | None = None
    # vLLM extras
    top_k: Int | None = Field(None, ge=-1)
    repetition_penalty: Float | None = Field(None, gt=0)
    ignore_eos: Bool = False
    stop_token_ids: list[Int] | None = None

    def sampling_params(self, max_tokens: int, logprobs: int | None, extra_stop: list[str] = ()) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stop):
            raise ConfigError("stop strings must not be empty")
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                bias[int(key)] = max(-100.0, min(100.0, float(value)))
            except ValueError:
                raise ConfigError(f"logit_bias keys must be token ids, got {key!r}") from None
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
            logit_bias=bias,
            logprobs=logprobs,
            ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions. prompt: a string, a list of strings, token ids, or lists of token ids."""

    prompt: Union[str, list[str], list[Int], list[list[Int]]]
    max_tokens: Int | None = Field(16, ge=1)
    logprobs: Int | None = Field(None, ge=0, le=20)
    echo: Bool = False
    best_of: Int | None = Field(None, ge=1)
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

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
