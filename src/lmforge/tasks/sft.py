"""Supervised fine-tuning data: prompt/response pairs from JSONL rows, loss on the response only.

    L = -sum_i log P(y_i | x_i)     x = the prompt (template applied to the row), y = the response + eos

Each example is prompt ids + response ids + eos. As in pretraining, input_ids = ids[:-1] and
labels = ids[1:], but a label whose token belongs to the prompt is -100, so only response tokens
count. Too-long examples lose the end of their *document* field (the source sentence, the article,
the context), never the instruction or the answer; the count is reported. Packing puts several
short examples in one row (each still ends with eos; attention is not blocked between them, as
when pretraining on concatenated documents).
"""

from __future__ import annotations

import re
import string
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

from lmforge.config import checked
from lmforge.errors import ConfigError, DataError
from lmforge.tasks.data import Record

# The prompts are those of `lmforge evaluate generate`, so a fine-tuned model is scored with the
# prompt it learned; the response starts with a space because the prompt ends with a label.
CONFIG_KEY = "lmforge_sft"  # config.json key that records the template a model was tuned with


# The largest number a slot's format spec may hold (a width or a precision): "{text:>999999999}"
# would build a gigabyte string for every row.
MAX_FORMAT_NUMBER = 1000
_INDEXES = re.compile(r"(\[[^\[\]]*\])*")


def indexed_fields(text: str) -> list[str]:
    """The fields a format string indexes (`{answers[0]}` -> answers): they hold lists or objects."""
    return [re.match(r"[^.\[]*", name).group() for _, name, _, _ in string.Formatter().parse(text)
            if name and "[" in name]


def template_fields(text: str) -> list[str]:
    """The row fields a format string reads (`{answers[0]}` reads `answers`). ValueError for a slot
    that names no field, reads an attribute (`{x.__class__}`), nests a slot in its format spec, or
    asks for a width or precision above MAX_FORMAT_NUMBER."""
    names = []
    for _, name, spec, _ in string.Formatter().parse(text):
        if name is None:
            continue
        base, rest = re.match(r"([^.\[]*)(.*)", name, re.DOTALL).groups()
        if not base or base.isdigit():
            raise ValueError(f"slot {{{name}}} must name a field")
        if not _INDEXES.fullmatch(rest):
            raise ValueError(f"slot {{{name}}} reads an attribute; use {{field}} or {{field[0]}} / {{field[key]}}")
        if spec and "{" in spec:
            raise ValueError(f"slot {{{name}:{spec}}} has a slot inside its format spec")
        if spec and any(int(n) > MAX_FORMAT_NUMBER for n in re.findall(r"\d+", spec)):
            raise ValueError(f"slot {{{name}:{spec}}} asks for a width or precision above {MAX_FORMAT_NUMBER}")
        names.append(base)
    return names


@checked
@dataclass(frozen=True)
class SFTTemplate:
    """How a row becomes (prompt, response). `{field}` slots (`{answers[0]}` indexes a list);
    `document_field` is the slot cut first when an example is too long (None: cut nothing there)."""

    task: str
    prompt: str
    response: str
    document_field: str | None = None

    def __post_init__(self) -> None:
        for name, text in (("prompt", self.prompt), ("response", self.response)):
            try:
                fields = template_fields(text)
            except ValueError as e:
                raise ConfigError(f"{self.task} {name} template {text!r} is not a valid format string: {e}") from None
            if not fields:
                raise ConfigError(f"{self.task} {name} template {text!r} has no {{field}} slot")
        if self.document_field is not None and self.document_field not in template_fields(self.prompt):
            raise ConfigError(f"document field {self.document_field!r} is not a slot of the prompt template {self.prompt!r}")

    @property
    def fields(self) -> list[str]:
        return list(dict.fromkeys(template_fields(self.prompt) + template_fields(self.response)))

    @property
    def structured_fields(self) -> list[str]:
        """Fields whose values are lists or objects (indexed slots; chat's messages): a CSV/TSV cell
        of one holds JSON."""
        if self.task == "chat":
            return ["messages"]
        return list(dict.fromkeys(indexed_fields(self.prompt) + indexed_fields(self.response)))

    def render_prompt(self, row: dict[str, Any], where: str = "input") -> str:
        return _format(self.prompt, row, where)

    def render_response(self, row: dict[str, Any], where: str = "input") -> str:
        return _format(self.response, row, where)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SFTTemplate":
        return cls(**{k: d[k] for k in ("task", "prompt", "response", "document_field") if k in d})


TEMPLATES: dict[str, SFTTemplate] = {
    "translation": SFTTemplate("translation", "Translate English to German:\n{source}\nGerman:", " {target}", "source"),
    "summarization": SFTTemplate("summarization", "{document}\nTL;DR:", " {summary}", "document"),
    "qa": SFTTemplate("qa", "Context: {context}\nQuestion: {question}\nAnswer:", " {answers[0]}", "context"),
}
# "chat": each row's `messages` (a list of {"role", "content"}) rendered by the tokenizer's own chat
# template; the loss counts the assistant turns only (what the template writes for them, its
# end-of-turn token included).
CHAT = SFTTemplate("chat", "{messages}", "{messages}")
TASKS = (*TEMPLATES, "chat", "custom")


def _format(text: str, row: dict[str, Any], where: str) -> str:
    """`text` filled from `row`. A text value in an indexed slot (`{answers[0]}` with "Paris", as a
    CSV cell or a JSONL string gives it) is a one-item list, not indexed character by character."""
    texts = {name: [row[name]] for name in indexed_fields(text) if isinstance(row.get(name), str)}
    if texts:
        row = {**row, **texts}
    try:
        return text.format(**row)
    except KeyError as e:
        raise DataError(f"{where}: missing field {e.args[0]!r} for template {text!r} (the row has {sorted(row)})") from None
    except (IndexError, TypeError, AttributeError) as e:
        raise DataError(f"{where}: cannot fill template {text!r} ({type(e).__name__}: {e}); check the field's type") from None


def _literal_text(text: str) -> str:
    """A template with every slot left empty: what a response is when its fields hold nothing."""
    return "".join(literal for literal, _, _, _ in string.Formatter().parse(text))


def make_template(task: str, prompt: str | None = None, response: str | None = None,
                  document_field: str | None = None) -> SFTTemplate:
    """A task's template, with any part overridden; "custom" needs prompt and response."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    if task == "chat":
        if prompt is not None or response is not None or document_field is not None:
            raise ConfigError("--task chat renders rows with the tokenizer's chat template; "
                              "--prompt-template, --response-template and --document-field do not apply")
        return CHAT
    if task == "custom":
        if prompt is None or response is None:
            raise ConfigError("--task custom needs --prompt-template and --response-template "
                              "(e.g. 'Q: {question}\\nA:' and ' {answer}')")
        return SFTTemplate("custom", prompt, response, document_field)
    base = TEMPLATES[task]
    prompt = base.prompt if prompt is None else prompt
    doc = document_field if document_field is not None else base.document_field
    if doc is not None and doc not in template_fields(prompt):
        doc = None  # an overridden prompt without the default document slot
    return SFTTemplate(task, prompt, base.response if response is None else response, doc)


# ---- examples ----------------------------------------------------------------------------------


@dataclass
class SFTExample:
    """Token ids of one (or, packed, several) prompt + response + eos; targets[j] marks ids[j]
    as a response token (a position whose prediction counts in the loss)."""

    ids: list[int]
    targets: list[bool]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class SFTStats:
    examples: int = 0
    truncated: int = 0  # document field shortened
    response_truncated: int = 0
    dropped: int = 0  # prompt alone too long even with an empty document
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.examples} examples"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated on the document side")
        if self.response_truncated:
            parts.append(f"{self.response_truncated} with the response cut")
        if self.dropped:
            parts.append(f"{self.dropped} dropped (prompt longer than the context)")
        return ", ".join(parts)


def encode_example(
    tokenizer: Any, template: SFTTemplate, row: dict[str, Any], max_length: int, where: str = "input",
) -> tuple[SFTExample | None, str | None]:
    """Encode one row; returns (example, what was cut: None, "document", "response" or "dropped").

    `max_length` is the model's input length: an example holds at most max_length + 1 ids
    (inputs are ids[:-1]). The prompt and the response are encoded separately, exactly as a
    prompt is encoded at inference, so the model learns to continue the prompt it will be given.
    """
    if template.task == "chat":
        return encode_chat_example(tokenizer, row, max_length, where)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no eos token; SFT appends eos to every response")
    budget = max_length + 1
    prompt = template.render_prompt(row, where)
    response = template.render_response(row, where)
    if "".join(response.split()) == "".join(_literal_text(template.response).split()):  # fields add only whitespace
        raise DataError(f"{where}: empty target: the response field(s) {template_fields(template.response)} hold no text "
                        f"(response {response!r}); every SFT example needs a target, so fix or drop the row")
    response_ids = tokenizer.encode(response, add_special_tokens=False) + [eos]  # continues the prompt: no bos
    prompt_ids = tokenizer.encode(prompt)
    cut = None
    doc = template.document_field
    if len(prompt_ids) + len(response_ids) > budget and doc is not None and isinstance(row.get(doc), str):
        cut = "document"
        doc_ids = tokenizer.encode(row[doc], add_special_tokens=False)
        keep = len(doc_ids)
        for _ in range(8):  # re-encoding the shortened text can shift a token or two; converge
            overflow = len(prompt_ids) + len(response_ids) - budget
            if overflow <= 0 or keep == 0:
                break
            keep = max(0, keep - overflow)
            prompt_ids = tokenizer.encode(template.render_prompt({**row, doc: tokenizer.decode(doc_ids[:keep])}, where))
    if len(prompt_ids) >= budget - 1:
        return None, "dropped"
    if len(prompt_ids) + len(response_ids) > budget:
        response_ids = response_ids[: budget - len(prompt_ids)]
        cut = "response"
    ids = prompt_ids + response_ids
    return SFTExample(ids, [False] * len(prompt_ids) + [True] * len(response_ids)), cut


def encode_chat_example(
    tokenizer: Any, row: dict[str, Any], max_length: int, where: str = "input",
) -> tuple[SFTExample | None, str | None]:
    """A conversation rendered by the tokenizer's chat template, as at inference; targets mark what
    the template writes for each assistant turn: the ids between the conversation up to that turn
    rendered with the generation prompt and the conversation through that turn. Too long: the end is
    cut ("response"); nothing of an assistant turn left: dropped."""
    messages = row.get("messages")
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in messages)):
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\": ..., \"content\": ...}} "
                        "objects with string values (in a CSV/TSV file: that list as JSON in the messages cell)")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing to learn; add one or drop the row")

    def render(turns: list[dict[str, Any]], prompt: bool = False) -> list[int]:
        return list(tokenizer.apply_chat_template(turns, add_generation_prompt=prompt, return_dict=False))

    ids = render(messages)
    targets = [False] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], prompt=True), render(messages[: i + 1])
        if through[: len(before)] != before or ids[: len(through)] != through:
            raise DataError(f"{where}: the chat template does not render this conversation's turns as prefixes of "
                            "each other, so the assistant tokens cannot be found; use --task custom instead")
        targets[len(before): len(through)] = [True] * (len(through) - len(before))
    if len(ids) <= max_length + 1:
        return SFTExample(ids, targets), None
    ids, targets = ids[: max_length + 1], targets[: max_length + 1]
    return (SFTExample(ids, targets), "response") if any(targets[1:]) else (None, "dropped")


def build_sft_examples(
    records: Sequence[Record], tokenizer: Any, template: SFTTemplate, max_length: int,
) -> tuple[list[SFTExample], SFTStats]:
    """Encode every record (errors name `file:line`); count what had to be cut."""
    examples, stats = [], SFTStats()
    for record in records:
        example, cut = encode_example(tokenizer, template, record.row, max_length, record.where)
        if cut == "document":
            stats.truncated += 1
        elif cut == "response":
            stats.response_truncated += 1
        if example is None:
            stats.dropped += 1
            continue
        examples.append(example)
    stats.examples = len(examples)
    if not examples:
        raise DataError(f"no usable examples: all {len(records)} prompts are longer than the context ({max_length} tokens)")
    return examples, stats


def pack_examples(examples: Sequence[SFTExample], max_length: int) -> list[SFTExample]:
    """Greedily concatenate consecutive examples into rows of at most max_length + 1 ids."""
    packed: list[SFTExample] = []
    ids: list[int] = []
    targets: list[bool] = []
    for ex in examples:
        if ids and len(ids) + len(ex) > max_length + 1:
            packed.append(SFTExample(ids, targets))
            ids, targets = [], []
        ids, targets = ids + ex.ids, targets + ex.targets
    if ids:
        packed.append(SFTExample(ids, targets))
    return packed


def collate_sft(examples: Sequence[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch in the causal-LM convention: labels[t] is the token after input t,
    -100 where that token is prompt or padding."""
    width = max(len(ex) - 1 for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex) - 1
        ids = torch.tensor(ex.ids, dtype=torch.long)
        input_ids[i, :n] = ids[:-1]
        mask[i, :n] = 1
        target = torch.tensor(ex.targets[1:], dtype=torch.bool)
        labels[i, :n] = torch.where(target, ids[1:], torch.full_like(ids[1:], -100))
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
