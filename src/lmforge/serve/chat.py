"""Chat templates: how a list of messages becomes one prompt for a base (non-chat) model.

Templates are Jinja, as in Hugging Face tokenizers (`tokenizer_config.json`'s "chat_template") and
vLLM's `--chat-template`: they see `messages` (dicts with role and content), `add_generation_prompt`,
`bos_token` and `eos_token`, and render in a sandbox. The default suits base GPT-2 models:

    {system}\\n\\nUser: {user}\\nAssistant: {assistant}\\nUser: ...\\nAssistant:

and stops at "\\nUser:" so the model does not write the user's next turn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    """A compiled Jinja chat template plus the stop strings that end an assistant turn."""

    source: str = DEFAULT_CHAT_TEMPLATE
    stop: list[str] = field(default_factory=lambda: list(DEFAULT_CHAT_STOP))
    bos_token: str = ""
    eos_token: str = ""

    def __post_init__(self) -> None:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
        env.globals["raise_exception"] = _raise
        try:
            self._template = env.from_string(self.source)
        except TemplateError as e:
            raise ConfigError(f"the chat template is not valid Jinja: {e}") from None

    @classmethod
    def load(cls, spec: str | None = None, model_dir: str | Path | None = None, stop: list[str] | None = None,
             **tokens: str) -> "ChatTemplate":
        """The template to use: `spec` (a file, or the template text itself), else the model directory's
        tokenizer_config.json "chat_template", else the default. The default template brings its stop
        strings; another template has none unless `stop` gives them."""
        source = None
        if spec:
            source = spec
            if "{{" not in spec and "{%" not in spec:
                path = Path(spec)
                if not path.is_file():
                    raise ConfigError(f"chat template {spec}: no such file (pass a file or the Jinja text itself)")
                source = path.read_text(encoding="utf-8")
        elif model_dir is not None:
            config = Path(model_dir) / "tokenizer_config.json"
            if config.is_file():
                template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
                source = template if isinstance(template, str) and template else None
        if source is None:
            return cls(stop=list(DEFAULT_CHAT_STOP) if stop is None else stop, **tokens)
        return cls(source, stop=[] if stop is None else stop, **tokens)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as e:
            raise ConfigError(f"the chat template failed on these messages: {e}") from None


def _raise(message: str) -> None:
    raise ConfigError(message)
