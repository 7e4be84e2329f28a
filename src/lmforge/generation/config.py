"""GenerationConfig: how to decode, with Hugging Face's option names, defaults and meanings.

Everything a user can set is validated here, once, with a message naming the option; what can only
be checked against a model or a prompt (vocabulary, context length) is checked in decode.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from lmforge.config import check_known_fields, checked
from lmforge.errors import ConfigError

# Used when neither max_length nor max_new_tokens is given (Hugging Face's default: 20 new tokens).
DEFAULT_MAX_NEW_TOKENS = 20


@checked
@dataclass
class GenerationConfig:
    """Decoding options. Names, defaults and semantics follow `transformers.GenerationConfig`.

    Length: `max_new_tokens` (tokens after the prompt) wins over `max_length` (prompt + new tokens);
    with neither, 20 new tokens, capped at the model's context. Stopping: any id in `eos_token_id`
    (None: the model's; [] : never), or any of `stop_strings` appearing in the text (needs a tokenizer).
    Strategy: greedy (default), sampling (`do_sample`), beam search (`num_beams > 1`), beam sampling
    (both). The warpers temperature, top_k, top_p apply only when sampling; top_k=50 is the default, as
    in transformers. `seed` makes sampling reproducible without touching torch's global generator.
    OpenAI's `logit_bias` (token id -> added score) and presence/frequency penalties (over the new
    tokens only) are lmforge additions; they apply first, before the repetition penalty.
    """

    max_length: int | None = None
    max_new_tokens: int | None = None
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    no_repeat_ngram_size: int = 0
    num_return_sequences: int = 1
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    stop_strings: str | list[str] | None = None
    seed: int | None = None
    # Output: with return_dict_in_generate, generate returns a GenerationOutput instead of ids.
    return_dict_in_generate: bool = False
    output_scores: bool = False
    output_logits: bool = False
    # lmforge additions: drop the oldest prompt tokens to fit the context instead of failing, and
    # decode with a static-shape step under torch.compile (CUDA graphs on GPU, as in gpt-fast; the
    # first call per shape compiles for tens of seconds; checked on CPU, not yet measured on a GPU).
    truncate_prompt: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        self.eos_token_id = _normalize_eos(self.eos_token_id)
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]
        for name in ("max_length", "max_new_tokens", "pad_token_id", "bos_token_id", "seed"):
            value = getattr(self, name)
            if value is not None and not _is_int(value):
                raise ConfigError(f"GenerationConfig.{name} must be an integer or None, got {value!r}")
        for name in ("pad_token_id", "bos_token_id"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"{name} must be a token id >= 0, got {getattr(self, name)}")
        if self.max_length is not None and self.max_length < 1:
            raise ConfigError(f"max_length must be >= 1, got {self.max_length}")
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        for name in ("min_new_tokens", "top_k", "no_repeat_ngram_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                hint = " (0 disables it)" if name != "min_new_tokens" else ""
                raise ConfigError(f"{name} must be an integer >= 0{hint}, got {value!r}")
        for name in ("num_beams", "num_return_sequences"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                     "length_penalty"):
            value = getattr(self, name)
            if not _is_number(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
        if self.do_sample and not self.temperature > 0:
            raise ConfigError(
                f"temperature must be > 0 when do_sample=True, got {self.temperature}; "
                "for greedy decoding set do_sample=False"
            )
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p} (1 disables it)")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or not all(
                _is_int(t) and t >= 0 and _is_number(b) for t, b in self.logit_bias.items()
            ):
                raise ConfigError(f"logit_bias must map token ids >= 0 to finite numbers, got {self.logit_bias!r}")
            self.logit_bias = dict(self.logit_bias)
        if self.early_stopping not in (True, False, "never"):
            raise ConfigError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ConfigError(
                f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams ({self.num_beams}) "
                "in beam search; raise num_beams or lower num_return_sequences"
            )
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences > 1:
            raise ConfigError(
                f"num_return_sequences={self.num_return_sequences} with greedy decoding would return "
                "identical copies; set do_sample=True or num_beams >= num_return_sequences"
            )
        if self.stop_strings is not None:
            if not isinstance(self.stop_strings, (list, tuple)) or not all(
                isinstance(s, str) and s for s in self.stop_strings
            ):
                raise ConfigError(
                    f"stop_strings must be a non-empty string or a list of them, got {self.stop_strings!r}"
                )
            self.stop_strings = list(self.stop_strings)

    @property
    def is_beam_search(self) -> bool:
        return self.num_beams > 1

    @property
    def start_token_id(self) -> int | None:
        """The token an empty prompt starts from: bos, else the first eos (None when neither is set)."""
        if self.bos_token_id is not None:
            return self.bos_token_id
        return self.eos_token_id[0] if self.eos_token_id else None

    def replace(self, **options: Any) -> "GenerationConfig":
        """A copy with some options changed (validated again); unknown names fail with a hint."""
        check_option_names(options)
        return dataclasses.replace(self, **options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_option_names(options: dict[str, Any]) -> None:
    """Fail on an unknown option name with a "did you mean" (generate(**options) typos)."""
    check_known_fields(GenerationConfig, options, "unknown generation option", "known options")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _normalize_eos(eos: Any) -> list[int] | None:
    """One id or several: always stored as a list (or None), so callers need not ask which."""
    if eos is None:
        return None
    ids = [eos] if _is_int(eos) else eos
    if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in ids):
        raise ConfigError(f"eos_token_id must be a token id >= 0 or a list of them ([] never stops early), got {eos!r}")
    return list(ids)
