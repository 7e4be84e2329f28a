"""Running a model over a dataset and scoring it: perplexity, multiple choice, classification,
generation tasks, and `score` for outputs that already exist. Each returns an `Evaluation`."""

from __future__ import annotations

import math
import os
import string
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

import torch

from lmforge import metrics
from lmforge.errors import ConfigError, DataError
from lmforge.evaluation.data import require_fields
from lmforge.tasks.data import int_like

# Zero-shot prompts for `evaluate generate`: simple, fixed, and recorded in every report.
PROMPT_TEMPLATES = {
    "translation": "Translate English to German:\n{source}\nGerman:",
    "summarization": "{document}\nTL;DR:",
    "qa": "Context: {context}\nQuestion: {question}\nAnswer:",
}
# Field holding the reference(s) of each task, most complete first (scitldr: all TLDRs in `summaries`).
REFERENCE_FIELDS = {"translation": ("target",), "summarization": ("summaries", "summary"), "qa": ("answers",)}
# New tokens per task when the caller sets no length: a sentence, a TL;DR, a short answer.
MAX_NEW_TOKENS = {"translation": 64, "summarization": 64, "qa": 32}
# The metric(s) each generation task is scored with.
TASK_METRICS = {"translation": ("bleu", "chrf"), "summarization": ("rouge",), "qa": ("squad",)}
# `score` metrics, by name; each takes (predictions, references).
SCORERS: dict[str, Callable[..., dict[str, Any]]] = {
    "bleu": metrics.bleu, "chrf": metrics.chrf, "rouge": metrics.rouge, "squad": metrics.squad,
    "classification": metrics.classification_metrics,
}
_ALIASES = {"qa": "squad", "exact_match": "squad", "f1": "squad", "accuracy": "classification", "chrf++": "chrf"}


@dataclass
class Evaluation:
    """What an evaluation produced: headline metrics, the settings used, per-example predictions.

    plot_data holds arrays for the plot (per-token NLL, a confusion matrix); it is not serialised.
    """

    task: str
    metrics: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    plot_data: dict[str, Any] = field(default_factory=dict, repr=False)


def evaluate_perplexity(
    model: torch.nn.Module, token_ids: torch.Tensor, *, progress: bool | None = False, **options: Any,
) -> Evaluation:
    """Sliding-window perplexity (see metrics.perplexity for the options: max_length, stride,
    batch_size, dtype)."""
    r = metrics.perplexity(model, token_ids, return_token_nll=True, progress=progress, **options)
    settings = {"max_length": r.max_length, "stride": r.stride, "batch_size": options.get("batch_size", 1),
                "dtype": str(options.get("dtype") or "model")}
    result = Evaluation("perplexity", {"perplexity": r.perplexity, "nll": r.nll, "n_tokens": r.n_tokens,
                                       "n_windows": r.n_windows,
                                       "by_context": perplexity_by_context(r.context_length, r.token_nll)}, settings)
    result.plot_data = {"token_nll": r.token_nll, "context_length": r.context_length}
    return result


def perplexity_by_context(context_length: torch.Tensor, token_nll: torch.Tensor) -> list[dict[str, float]]:
    """Perplexity of the scored tokens grouped by how much context they had: bins [1, 2), [2, 4), [4, 8), ..."""
    out, lo, top = [], 1, int(context_length.max())
    while lo <= top:
        sel = (context_length >= lo) & (context_length < 2 * lo)
        if sel.any():
            out.append({"context_from": lo, "context_to": min(2 * lo - 1, top), "n_tokens": int(sel.sum()),
                        "perplexity": math.exp(float(token_nll[sel].mean()))})
        lo *= 2
    return out


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids as lm-evaluation-harness makes them: trailing spaces of the
    context move to the continuation, the pair is encoded whole and split at the context's length
    (so merges across the boundary count for the continuation). The tokenizer's own special tokens are
    kept (Llama's bos starts the context, as the harness does with add_bos_token unset); an empty
    context becomes the start token alone (bos, else eos: the harness's prefix_token_id), with the
    continuation encoded after it without a second bos."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        bos = getattr(tokenizer, "bos_token_id", None)
        start = bos if bos is not None else tokenizer.eos_token_id
        ids = tokenizer.encode(continuation)
        if bos is not None and ids[:1] == [bos] and tokenizer.encode("")[:1] == [bos]:
            ids = ids[1:]  # the bos the tokenizer puts before every text: already the start token
        return [start], ids
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


def evaluate_choice(
    model: torch.nn.Module, tokenizer: Any, items: Sequence[dict[str, Any]], *, delimiter: str = " ",
    batch_size: int = 8, dtype: str | torch.dtype | None = None, progress: bool | None = False,
    path: str | os.PathLike = "items",
) -> Evaluation:
    """Zero-shot multiple choice by log-likelihood: each item's `context` followed by
    `delimiter + choice` for every one of its `choices`; `gold` is the index of the right choice
    (or its text). acc ranks by total log-probability, acc_norm by log-probability per character."""
    require_fields(items, ["context", "choices", "gold"], path)
    requests, golds = [], []
    for i, item in enumerate(items, 1):
        choices, gold = item["choices"], item["gold"]
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise DataError(f"--data {path}: row {i}: `choices` must be a non-empty list of non-empty strings "
                            f"(in a CSV/TSV file: a JSON list in the cell, e.g. [\"yes\", \"no\"])")
        if isinstance(gold, str) and gold not in choices and int_like(gold):
            gold = int(gold)  # an index as a CSV/TSV cell holds it
        if isinstance(gold, str):
            if gold not in choices:
                raise DataError(f"--data {path}: row {i}: gold {gold!r} is not one of its choices")
            gold = choices.index(gold)
        if not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise DataError(f"--data {path}: row {i}: gold must be a choice index 0..{len(choices) - 1}, got {gold!r}")
        golds.append(gold)
        requests.extend(encode_pair(tokenizer, item["context"], delimiter + c) for c in choices)
    scored = metrics.continuation_logprobs(model, requests, batch_size=batch_size, dtype=dtype, progress=progress)
    lls, lengths, k = [], [], 0
    for item in items:
        n = len(item["choices"])
        lls.append([s.logprob for s in scored[k: k + n]])
        lengths.append([len(c) for c in item["choices"]])
        k += n
    mc = metrics.multiple_choice(lls, golds, lengths)
    predictions = [
        {"context": item["context"], "choices": item["choices"], "gold": g, "prediction": p, "prediction_norm": pn,
         "logprobs": ll}
        for item, g, p, pn, ll in zip(items, golds, mc["predictions"], mc["predictions_norm"], lls)
    ]
    settings = {"delimiter": delimiter, "batch_size": batch_size, "dtype": str(dtype or "model"),
                "normalisation": "log-probability per character of the choice (lm-evaluation-harness acc_norm)"}
    return Evaluation("choice", {"acc": mc["acc"], "acc_norm": mc["acc_norm"], "n": mc["n"]}, settings, predictions)


def evaluate_classification(
    predict: Callable[[list[str]], Sequence[Hashable]], rows: Sequence[dict[str, Any]], *,
    text_field: str = "text", label_field: str = "label", batch_size: int = 32,
    progress: bool | None = False, path: str | os.PathLike = "data",
) -> Evaluation:
    """Classification metrics of any `predict(texts) -> labels` callable over rows of text and label."""
    from tqdm.auto import tqdm

    require_fields(rows, [text_field, label_field], path)
    texts = [str(r[text_field]) for r in rows]
    references = [r[label_field] for r in rows]
    predictions: list[Hashable] = []
    for i in tqdm(range(0, len(texts), batch_size), disable=None if progress is None else not progress,
                  desc="classify", leave=False):
        batch = list(predict(texts[i: i + batch_size]))
        if len(batch) != len(texts[i: i + batch_size]):
            raise DataError(f"the classifier returned {len(batch)} labels for {len(texts[i: i + batch_size])} texts")
        predictions.extend(batch)
    references = align_labels(predictions, references)
    report = metrics.classification_metrics(predictions, references)
    result = Evaluation("classify", report, {"text_field": text_field, "label_field": label_field},
                        [{"text": t, "label": r, "prediction": p} for t, r, p in zip(texts, references, predictions)])
    result.plot_data = {"confusion_matrix": report["confusion_matrix"], "labels": report["labels"]}
    return result


def align_labels(predictions: Sequence[Hashable], references: Sequence[Any]) -> list[Any]:
    """References of the predictions' kind: a classifier with integer labels scored on text labels
    that are whole numbers (a CSV/TSV cell "1") compares integers, and one with text labels scored
    on integers compares their text, so the file format never turns right answers into wrong ones."""
    refs = list(references)
    if predictions and all(isinstance(p, int) and not isinstance(p, bool) for p in predictions):
        if refs and all(int_like(r) or (isinstance(r, int) and not isinstance(r, bool)) for r in refs):
            return [int(r) for r in refs]
    elif predictions and all(isinstance(p, str) for p in predictions):
        if all(isinstance(r, (str, int)) and not isinstance(r, bool) for r in refs):
            return [str(r) for r in refs]
    return refs


def prompt_template(task: str, template: str | None = None) -> str:
    """`template`, else the task's default one; an unknown task fails naming --task."""
    if task not in PROMPT_TEMPLATES:
        raise ConfigError(f"unknown task {task!r} for --task: use one of {', '.join(PROMPT_TEMPLATES)}")
    if template is not None:
        from lmforge.tasks.sft import template_fields

        try:
            template_fields(template)  # the checks of a fine-tuning template: fields only, bounded widths
        except ValueError as e:
            raise ConfigError(f"--template {template!r} is not a valid format string: {e}") from None
    return template or PROMPT_TEMPLATES[task]


def build_prompt(task: str, row: dict[str, Any], template: str | None = None) -> str:
    return prompt_template(task, template).format(**row)


def task_references(task: str, row: dict[str, Any]) -> list[str]:
    """The reference texts of one row (several for scitldr `summaries` and SQuAD `answers`)."""
    for name in REFERENCE_FIELDS[task]:
        if name in row:
            value = row[name]
            return [value] if isinstance(value, str) else [str(v) for v in value]
    raise DataError(f"row lacks a reference field: one of {list(REFERENCE_FIELDS[task])}")


def first_line(text: str) -> str:
    """The answer part of a continuation: up to the first newline, without surrounding spaces.
    The prompts end in a label ("German:", "TL;DR:", "Answer:"), so the answer is one line
    (generation stops at a newline, as lm-evaluation-harness' `until: ["\\n"]`)."""
    return text.split("\n", 1)[0].strip()


def generation_config_for(task: str, **options: Any) -> Any:
    """The decoding settings of `evaluate generate`: greedy, MAX_NEW_TOKENS[task] new tokens,
    stopping at a newline; `options` (GenerationConfig names) override them."""
    from lmforge.generation.config import GenerationConfig

    prompt_template(task)  # an unknown task fails here
    return GenerationConfig(**{"max_new_tokens": MAX_NEW_TOKENS[task], "stop_strings": ["\n"], **options})


def generate_texts(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], generation_config: Any, *,
    batch_size: int = 8, progress: bool | None = False,
) -> tuple[list[str], int]:
    """Continuations of `prompts` from the generation engine (left-padded batches), decoded up to
    the first EOS. Prompts too long for the context lose their oldest tokens (the template's
    instruction may go, the question stays); returns (texts, number of prompts truncated)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    new_tokens = generation_config.max_new_tokens or 1
    keep = model.config.n_positions - new_tokens
    if keep < 1:
        raise ConfigError(f"max_new_tokens={new_tokens} leaves no room for a prompt in the model's context "
                          f"(n_positions={model.config.n_positions}); lower --max-new-tokens")
    eos = set(generation_config.eos_token_id or [tokenizer.eos_token_id])
    outputs: list[str] = []
    truncated = 0
    for i in tqdm(range(0, len(prompts), batch_size), disable=None if progress is None else not progress,
                  desc="generate", leave=False):
        enc = tokenizer(list(prompts[i: i + batch_size]), padding=True, padding_side="left", return_tensors="pt")
        input_ids, mask = enc["input_ids"], enc["attention_mask"]
        if input_ids.size(1) > keep:
            truncated += int((mask.sum(1) > keep).sum())
            input_ids, mask = input_ids[:, -keep:], mask[:, -keep:]
        out = model.generate(input_ids.to(device), mask.to(device), generation_config, tokenizer=tokenizer)
        for row in out[:, input_ids.size(1):].tolist():
            cut = next((j for j, t in enumerate(row) if t in eos), len(row))
            outputs.append(tokenizer.decode(row[:cut]))
    return outputs, truncated


def evaluate_generation(
    model: torch.nn.Module, tokenizer: Any, task: str, rows: Sequence[dict[str, Any]], *,
    generation_config: Any = None, batch_size: int = 8, template: str | None = None,
    score_options: dict[str, Any] | None = None, progress: bool | None = False, path: str | os.PathLike = "data",
) -> Evaluation:
    """Generate an answer per row from the task's prompt template, then score it:
    translation with BLEU and chrF, summarization with ROUGE, qa with SQuAD exact match / F1.
    generation_config defaults to generation_config_for(task); score_options go to the metric
    (e.g. {"use_stemmer": True} for ROUGE)."""
    template = prompt_template(task, template)
    fields = [f[1] for f in string.Formatter().parse(template) if f[1]]
    require_fields(rows, fields, path)
    references = []
    for i, row in enumerate(rows, 1):
        try:
            references.append(task_references(task, row))
        except DataError as e:
            raise DataError(f"--data {path}: row {i}: {e}") from None
    config = generation_config if generation_config is not None else generation_config_for(task)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if config.eos_token_id is None and eos_id is not None:
        config = config.replace(eos_token_id=eos_id)
    if config.pad_token_id is None and eos_id is not None:
        config = config.replace(pad_token_id=eos_id)
    prompts = [build_prompt(task, row, template) for row in rows]
    raw, truncated = generate_texts(model, tokenizer, prompts, config, batch_size=batch_size, progress=progress)
    predictions = [first_line(text) for text in raw]
    scores = score(predictions, references, ",".join(TASK_METRICS[task]), **(score_options or {}))
    settings = {"template": template, "postprocess": "first line, stripped",
                "batch_size": batch_size, "generation": config.to_dict(), "metric_options": score_options or {},
                "prompts_truncated": truncated}
    return Evaluation(f"generate-{task}", scores, settings, [
        {"prompt": p, "output": o, "prediction": pred, "references": refs}
        for p, o, pred, refs in zip(prompts, raw, predictions, references)
    ])


def score(predictions: Sequence[Any], references: Sequence[Any], metric: str = "bleu", **options: Any) -> dict[str, Any]:
    """Score existing outputs with one or more metrics ("bleu", "chrf", "rouge", "squad",
    "classification"; comma-separated for several). Returns {metric name: its result}."""
    names = [m.strip().lower() for m in metric.split(",") if m.strip()]
    if not names:
        raise ConfigError("--metric is empty: use one of " + ", ".join(SCORERS))
    results = {}
    for name in names:
        key = _ALIASES.get(name, name)
        if key not in SCORERS:
            import difflib

            hint = difflib.get_close_matches(name, list(SCORERS) + list(_ALIASES), n=1)
            raise ConfigError(f"unknown metric {name!r} for --metric{f'; did you mean {hint[0]!r}?' if hint else ''} "
                              f"(known: {', '.join(SCORERS)})")
        extra = {"word_order": 2} if name == "chrf++" else {}
        results[key if name != "chrf++" else name] = SCORERS[key](predictions, references, **extra, **options)
    return results
