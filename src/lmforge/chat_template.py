"""Chat templates, rendered as transformers renders them (its utils/chat_template_utils.py).

A template is Jinja run in a sandbox (ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks,
the loopcontrols extension and the {% generation %} tag) with transformers' helpers: raise_exception,
strftime_now, a tojson that keeps non-ASCII text, and dict / namespace that refuse private names. It
sees `messages`, `tools`, `documents`, `add_generation_prompt` and the tokenizer's special tokens
(bos_token, eos_token, ...). A model directory keeps its template in chat_template.jinja or in
tokenizer_config.json's "chat_template"; the file wins.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from lmforge.errors import ChatTemplateError, DataError

CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"  # more named templates, one NAME.jinja each
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker for continue_final_message
_PROBE = "lmforge end-of-turn probe"


def read_chat_template(directory: str | os.PathLike) -> str | dict[str, str] | None:
    """The chat template saved in a model or tokenizer directory, as transformers reads it:
    chat_template.jinja (plus additional_chat_templates/NAME.jinja), else tokenizer_config.json's
    "chat_template" (a string, or named templates as a list of {"name", "template"}); None if none."""
    directory = Path(directory)
    templates = {}
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        templates["default"] = (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if (directory / CHAT_TEMPLATE_DIR).is_dir():
        for f in sorted((directory / CHAT_TEMPLATE_DIR).glob("*.jinja")):
            templates[f.stem] = f.read_text(encoding="utf-8")
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    config = directory / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise DataError(f"{config}: not a valid JSON object ({e}); fix or delete the file") from None
    if isinstance(value, list):
        try:
            return {t["name"]: t["template"] for t in value}
        except (KeyError, TypeError):
            raise DataError(f"{config}: chat_template must be a string or a list of "
                            f"{{'name', 'template'}} objects") from None
    return value if isinstance(value, str) and value else None


def select_chat_template(templates: str | dict[str, str] | None, chat_template: str | None = None,
                         tools: Sequence[Any] | None = None) -> str:
    """The template source to render, as transformers' get_chat_template: `chat_template` (the text, or
    the name of one of several), else the tokenizer's own ("tool_use" when tools are given and it has
    one, else "default")."""
    if isinstance(templates, dict):
        if chat_template is not None:
            return templates.get(chat_template, chat_template)
        if tools is not None and "tool_use" in templates:
            return templates["tool_use"]
        if "default" in templates:
            return templates["default"]
        raise ChatTemplateError(f"this tokenizer has several chat templates and none is named 'default'; pass "
                                f"chat_template= one of {sorted(templates)}")
    if chat_template is not None:
        return chat_template
    if templates is None:
        raise ChatTemplateError(
            f"this tokenizer has no chat template (no {CHAT_TEMPLATE_FILE} and no chat_template in "
            f"tokenizer_config.json); pass chat_template= the Jinja text, or set tokenizer.chat_template")
    return templates


def render_chat_template(
    source: str,
    messages: Sequence[Any],
    *,
    add_generation_prompt: bool = False,
    continue_final_message: bool | str = False,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    **variables: Any,
) -> str:
    """One conversation rendered by the template `source`: what transformers' apply_chat_template(...,
    tokenize=False) returns. Messages are dicts (or pydantic models); keys whose value is None are
    dropped, as transformers does. `variables` (the special tokens, and any extra the template reads)
    are passed to the template as they are. continue_final_message leaves the last message open
    (its name: the field to continue, default "content") so the model continues it."""
    if not messages:
        raise ChatTemplateError("cannot apply a chat template to an empty conversation; give at least one message")
    if continue_final_message and add_generation_prompt:
        raise ChatTemplateError("continue_final_message and add_generation_prompt do not go together: the first "
                                "continues the last message, the second starts a new assistant message")
    if tools is not None and not all(isinstance(t, dict) for t in tools):
        raise ChatTemplateError("tools must be JSON schemas (dicts)")
    chat = [_plain_message(m) for m in messages]
    if continue_final_message:
        key = continue_final_message if isinstance(continue_final_message, str) else "content"
        final = chat[-1].get(key)
        if not isinstance(final, str):
            raise ChatTemplateError(f"continue_final_message: the last message has no text {key!r} to continue")
        chat[-1][key] = final + _CONTINUE_TAG
    template = compile_chat_template(source)
    from jinja2 import TemplateError

    try:
        text = template.render(messages=chat, tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **variables)
    except ChatTemplateError:
        raise
    except (TemplateError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as e:
        # the template's own bug on these messages (an undefined name, a wrong type), named for the user
        raise ChatTemplateError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from None
    if continue_final_message:
        at = text.rfind(_CONTINUE_TAG.strip())
        if at < 0 or final.strip() not in text:
            raise ChatTemplateError("continue_final_message: the chat template does not write the final message as "
                                    "given, so it cannot be continued")
        text = text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
    return text


def end_of_turn_tokens(source: str, special_tokens: Sequence[str], **variables: Any) -> list[str]:
    """The special token the template writes right after an assistant message (Llama 3's <|eot_id|>,
    ChatML's <|im_end|>, Mistral's </s>): generation of a reply stops there. Found by rendering a
    short exchange; empty when the turn ends otherwise (the default template's "\\nUser:")."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = render_chat_template(source, probe, **variables)
    except ChatTemplateError:
        return []
    at = text.rfind(_PROBE)
    tail = text[at + len(_PROBE):].lstrip() if at >= 0 else ""
    return [t for t in sorted(special_tokens, key=len, reverse=True) if t and tail.startswith(t)][:1]


@lru_cache(maxsize=32)
def compile_chat_template(source: str) -> Any:
    """A jinja2 Template for `source` in transformers' sandboxed environment (cached by source)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """{% generation %}...{% endgeneration %} marks the assistant's text for training masks; it renders its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """jinja's namespace(), refusing underscore names (a way out of the sandbox)."""

        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                _check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            _check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(), namespace=Namespace)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template is not valid Jinja: {e}") from None


def _plain_message(message: Any) -> dict[str, Any]:
    if callable(getattr(message, "model_dump", None)):
        message = message.model_dump()
    if not isinstance(message, dict):
        raise ChatTemplateError(f"chat messages must be dicts with 'role' and 'content', got {message!r}")
    return {k: v for k, v in message.items() if v is not None}


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"the chat template refused these messages: {message}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _check_name(name: Any) -> None:
    from jinja2.exceptions import SecurityError

    if isinstance(name, str) and name.startswith("_"):
        raise SecurityError(f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}")


class _Dict:
    """The template's dict(): builds dicts, with no attribute that leads out of the sandbox."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)
