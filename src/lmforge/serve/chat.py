"""Chat templates for the server and `lmforge generate --chat`: how a list of messages becomes one prompt.

A model's own template (chat_template.jinja or tokenizer_config.json's "chat_template") is rendered by
lmforge.chat_template exactly as transformers renders it, and a reply stops at the template's
end-of-turn token (<|eot_id|>, <|im_end|>, ...). A model without one (base GPT-2) gets a default
that suits base models:

    {system}\\n\\nUser: {user}\\nAssistant: {assistant}\\nUser: ...\\nAssistant:

which stops at "\\nUser:" so the model does not write the user's next turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.chat_template import (
    compile_chat_template, end_of_turn_tokens, read_chat_template, render_chat_template, select_chat_template,
)
from lmforge.errors import ConfigError

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
DEFAULT_CHAT_STOP = ["\nUser:"]


@dataclass
class ChatTemplate:
    """A Jinja chat template with the special tokens it sees and what ends an assistant turn: stop
    strings and stop token ids."""

    source: str = DEFAULT_CHAT_TEMPLATE
    stop: list[str] = field(default_factory=lambda: list(DEFAULT_CHAT_STOP))
    bos_token: str = ""
    eos_token: str = ""
    stop_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        compile_chat_template(self.source)  # a broken template fails here, not on the first request

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, spec: str | None = None, stop: list[str] | None = None) -> ChatTemplate:
        """The template to chat with `tokenizer`: `spec` (a file, or the template text itself), else the
        tokenizer's own, else the default. A template's stop token ids are its end-of-turn tokens;
        the default brings its stop strings, another template has none unless `stop` gives them."""
        own = getattr(tokenizer, "chat_template", None)
        if spec:
            source = _read_spec(spec)
        else:
            source = None if own is None else select_chat_template(own)
        tokens = {"bos_token": getattr(tokenizer, "bos_token", None) or "",
                  "eos_token": getattr(tokenizer, "eos_token", None) or ""}
        if source is None:
            return cls(stop=list(DEFAULT_CHAT_STOP) if stop is None else stop, **tokens)
        ends = end_of_turn_tokens(source, tokenizer.special_tokens, **_set(tokens))
        return cls(source, stop=[] if stop is None else stop, stop_token_ids=[tokenizer.token_to_id(t) for t in ends],
                   **tokens)

    @classmethod
    def load(cls, spec: str | None = None, model_dir: str | Path | None = None, stop: list[str] | None = None,
             **tokens: str) -> ChatTemplate:
        """The template to use: `spec` (a file, or the template text itself), else the model directory's
        (chat_template.jinja or tokenizer_config.json's "chat_template"), else the default. The default
        template brings its stop strings; another template has none unless `stop` gives them.
        ChatTemplate.for_tokenizer also finds the template's end-of-turn token ids."""
        source = _read_spec(spec) if spec else None
        if source is None and model_dir is not None:
            saved = read_chat_template(model_dir)
            source = None if saved is None else select_chat_template(saved)
        if source is None:
            return cls(stop=list(DEFAULT_CHAT_STOP) if stop is None else stop, **tokens)
        return cls(source, stop=[] if stop is None else stop, **tokens)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text, as transformers' apply_chat_template(..., tokenize=False) renders it."""
        return render_chat_template(self.source, messages, add_generation_prompt=add_generation_prompt,
                                    **_set({"bos_token": self.bos_token, "eos_token": self.eos_token}))

    def encode(self, tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """The prompt ids. A model's template writes its own special tokens (transformers encodes it
        without adding any); the default one is encoded as a plain prompt (with the tokenizer's bos)."""
        text = self.render(messages, add_generation_prompt)
        return tokenizer.encode(text, add_special_tokens=self.source == DEFAULT_CHAT_TEMPLATE)


def _read_spec(spec: str) -> str:
    """A template given on the command line: its text, or a file holding it."""
    if "{{" in spec or "{%" in spec:
        return spec
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"chat template {spec}: no such file (pass a file or the Jinja text itself)")
    return path.read_text(encoding="utf-8")


def _set(tokens: dict[str, str]) -> dict[str, str]:
    """The special tokens that are set: transformers passes only those to a template."""
    return {k: v for k, v in tokens.items() if v}
