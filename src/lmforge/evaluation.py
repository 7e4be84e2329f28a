"""Run a model over a dataset, score it with lmforge.metrics, and write the report, predictions and plots.

Each `evaluate_*` function returns an `Evaluation` (metrics, settings, per-example predictions);
`write_report` saves it as `REPORT.json` (atomic) with the predictions beside it in
`REPORT.predictions.jsonl` and, on request, a PNG plot in `REPORT.png`. The CLI
(`lmforge evaluate ...`) is a thin layer over these functions.

Data files are JSONL (one object per line) with the fields of ../shared/data:
translation `source`/`target`, summarization `document`/`summary` (+ `summaries`, all references),
QA `context`/`question`/`answers`, classification `text`/`label`, multiple choice
`context`/`choices`/`gold`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence

import torch

from lmforge import metrics
from lmforge._io import atomic_path, write_json_atomic
from lmforge.errors import ConfigError, DataError
from lmforge.tasks.data import iter_jsonl

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


# ---- reading data ------------------------------------------------------------------------------


def read_jsonl(path: str | os.PathLike, option: str = "--data") -> list[Any]:
    """Every line of a JSONL file, parsed; errors name the file (and the CLI option) and the line."""
    rows = [row for _, row in iter_jsonl(path, option)]
    if not rows:
        raise DataError(f"{option} {path}: the file is empty")
    return rows


def require_fields(rows: Sequence[Any], fields: Sequence[str], path: str | os.PathLike, option: str = "--data") -> None:
    """Fail on the first row that is not an object with all of `fields`, naming the file and line."""
    for i, row in enumerate(rows, 1):
        missing = [f for f in fields if not isinstance(row, dict) or f not in row]
        if missing:
            have = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"{option} {path}: row {i} lacks field(s) {missing} (it has {have})")


def read_column(path: str | os.PathLike, candidates: Sequence[str], option: str) -> list[Any]:
    """Predictions or references from a file: `.txt` (one per line, blank line = empty string) or
    `.jsonl` (a JSON value per line, or an object read at the first of `candidates` it has)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{option} {path}: no such file")
    if path.suffix != ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        if not lines:
            raise DataError(f"{option} {path}: the file is empty")
        return lines
    rows = read_jsonl(path, option)
    values = []
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            values.append(row)
            continue
        key = next((c for c in candidates if c in row), None)
        if key is None:
            raise DataError(f"{option} {path}: row {i} has none of the fields {list(candidates)} (it has {sorted(row)})")
        values.append(row[key])
    return values


def load_tokens(path: str | os.PathLike, tokenizer: Any = None, text_field: str = "text",
                max_tokens: int | None = None, split: str = "val") -> torch.Tensor:
    """One token stream for perplexity, from
    - a directory made by `lmforge prepare` (its `split`, documents separated by EOS; checked
      against `tokenizer` when one is given),
    - a `.bin` token file (the dtype of a dataset.json beside it, else uint16) or a `.npy` array,
    - a `.jsonl` file (its `text_field` values joined by blank lines) or any other file as UTF-8
      text, encoded with `tokenizer`.
    `max_tokens` keeps only the first tokens (a quick estimate)."""
    import numpy as np

    path = Path(path)
    if path.is_dir():
        from lmforge.data import TokenDataset

        arr = TokenDataset(path, split, tokenizer=tokenizer).tokens
    elif not path.is_file():
        raise DataError(f"--data {path}: no such file or prepared dataset directory")
    elif path.suffix == ".npy":
        arr = np.load(path, mmap_mode="r").reshape(-1)
    elif path.suffix == ".bin":
        from lmforge.data import HEADER_FILE, read_header

        dtype = read_header(path.parent)["dtype"] if (path.parent / HEADER_FILE).is_file() else "uint16"
        arr = np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, np.uint16)
    else:
        if tokenizer is None:
            raise ConfigError(f"--data {path} is text: a tokenizer is needed to encode it (--tokenizer)")
        if path.suffix == ".jsonl":
            rows = read_jsonl(path)
            require_fields(rows, [text_field], path)
            text = "\n\n".join(str(r[text_field]) for r in rows)
        else:
            text = path.read_text(encoding="utf-8")
        if max_tokens is not None:
            text = text[: max_tokens * 16]  # ample for any tokenizer; cut to max_tokens below
        arr = np.asarray(tokenizer.encode(text), dtype=np.int64)
    ids = torch.from_numpy(np.asarray(arr[:max_tokens]).astype(np.int64))
    if ids.numel() < 2:
        raise DataError(f"--data {path}: {ids.numel()} token(s); perplexity needs at least 2 (is the file empty?)")
    return ids


# ---- running models -----------------------------------------------------------------------------


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


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids as lm-evaluation-harness makes them: trailing spaces of the
    context move to the continuation, the pair is encoded whole and split at the context's length
    (so merges across the boundary count for the continuation); an empty context becomes EOS."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        return [tokenizer.eos_token_id], tokenizer.encode(continuation)
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
            raise DataError(f"--data {path}: row {i}: `choices` must be a non-empty list of non-empty strings")
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
    report = metrics.classification_metrics(predictions, references)
    result = Evaluation("classify", report, {"text_field": text_field, "label_field": label_field},
                        [{"text": t, "label": r, "prediction": p} for t, r, p in zip(texts, references, predictions)])
    result.plot_data = {"confusion_matrix": report["confusion_matrix"], "labels": report["labels"]}
    return result


def build_prompt(task: str, row: dict[str, Any], template: str | None = None) -> str:
    if task not in PROMPT_TEMPLATES:
        raise ConfigError(f"unknown task {task!r} for --task: use one of {', '.join(PROMPT_TEMPLATES)}")
    return (template or PROMPT_TEMPLATES[task]).format(**row)


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

    if task not in PROMPT_TEMPLATES:
        raise ConfigError(f"unknown task {task!r} for --task: use one of {', '.join(PROMPT_TEMPLATES)}")
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
    if task not in PROMPT_TEMPLATES:
        raise ConfigError(f"unknown task {task!r} for --task: use one of {', '.join(PROMPT_TEMPLATES)}")
    fields = [f[1] for f in string.Formatter().parse(template or PROMPT_TEMPLATES[task]) if f[1]]
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
    settings = {"template": template or PROMPT_TEMPLATES[task], "postprocess": "first line, stripped",
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


# ---- reports ------------------------------------------------------------------------------------


def library_versions() -> dict[str, str]:
    """Versions of everything that can change a score."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("lmforge", "torch", "numpy", "tokenizers", "sacrebleu", "rouge-score", "scikit-learn"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def describe_model(model: torch.nn.Module | None, path: str | os.PathLike | None = None) -> dict[str, Any] | None:
    if model is None:
        return {"path": str(path)} if path else None
    c = model.config
    p = next(model.parameters())
    return {"path": str(path or getattr(model, "checkpoint_dir", "")), "n_layer": c.n_layer, "n_head": c.n_head,
            "n_embd": c.n_embd, "n_positions": c.n_positions, "vocab_size": c.vocab_size,
            "parameters": model.num_parameters() if hasattr(model, "num_parameters") else sum(q.numel() for q in model.parameters()),
            "dtype": str(p.dtype).removeprefix("torch."), "device": str(p.device)}


def describe_file(path: str | os.PathLike, **extra: Any) -> dict[str, Any]:
    """Path, size and SHA-256 of a data file, so a report says exactly what was scored."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": digest.hexdigest(), **extra}


def build_report(result: Evaluation, *, dataset: dict[str, Any] | None, model: dict[str, Any] | None,
                 started: float) -> dict[str, Any]:
    """The JSON report: metrics, dataset, model, settings, library versions and time."""
    return {
        "task": result.task, "metrics": _jsonable(result.metrics), "dataset": dataset, "model": model,
        "settings": _jsonable(result.settings), "versions": library_versions(),
        "time": {"started": _dt.datetime.fromtimestamp(started, _dt.timezone.utc).isoformat(timespec="seconds"),
                 "seconds": round(time.time() - started, 3)},
    }


def report_paths(report_path: str | os.PathLike) -> dict[str, Path]:
    """REPORT.json -> the report, REPORT.predictions.jsonl and REPORT.png beside it."""
    path = Path(report_path)
    stem = path.with_suffix("") if path.suffix == ".json" else path
    return {"report": stem.with_suffix(".json"), "predictions": Path(f"{stem}.predictions.jsonl"),
            "plot": stem.with_suffix(".png")}


def write_report(result: Evaluation, report: dict[str, Any], report_path: str | os.PathLike, *,
                 plot: bool = False, run_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write the report (atomically), the predictions beside it, with `plot` the PNG, and with
    `run_dir` that training run's loss curves (REPORT.loss.png). Returns the paths written."""
    paths = report_paths(report_path)
    written = {}
    if result.predictions:
        with atomic_path(paths["predictions"]) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for row in result.predictions:
                f.write(json.dumps(_jsonable(row), ensure_ascii=False) + "\n")
        written["predictions"] = paths["predictions"]
        report = {**report, "predictions_file": paths["predictions"].name}
    if plot:
        if "confusion_matrix" in result.plot_data:
            plot_confusion_matrix(result.plot_data["confusion_matrix"], result.plot_data["labels"], paths["plot"])
            written["plot"] = paths["plot"]
        elif "token_nll" in result.plot_data:
            plot_perplexity_by_context(result.plot_data["context_length"], result.plot_data["token_nll"], paths["plot"])
            written["plot"] = paths["plot"]
    if run_dir is not None:
        loss_png = Path(f"{paths['report'].with_suffix('')}.loss.png")
        plot_loss_curves(run_dir, loss_png)
        written["loss_plot"] = loss_png
    if plot or run_dir is not None:
        report = {**report, "plots": [p.name for k, p in written.items() if k.endswith("plot")]}
    write_json_atomic(paths["report"], report)
    written["report"] = paths["report"]
    return written


_NOT_IN_TABLE = ("confusion_matrix", "labels", "per_example", "by_context", "predictions", "predictions_norm",
                 "per_class", "macro", "micro", "weighted", "signature")


def format_table(result: Evaluation) -> str:
    """The headline numbers as aligned `name  value` rows (nested results flattened with dots), then
    sacrebleu signatures, and for classification a per-class report and the confusion matrix."""
    rows = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if k not in _NOT_IN_TABLE:
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, bool):
            rows.append((prefix, str(value)))
        elif isinstance(value, float):
            rows.append((prefix, f"{value:.4f}"))
        elif isinstance(value, (int, str)):
            rows.append((prefix, str(value)))

    walk("", result.metrics)
    rows += [("signature", sig) for sig in _find_key(result.metrics, "signature")]
    width = max((len(name) for name, _ in rows), default=0)
    lines = [result.task] + [f"  {name:<{width}}  {value}" for name, value in rows]
    for report in _find_dicts_with(result.metrics, "confusion_matrix"):
        lines += _classification_lines(report)
    return "\n".join(lines)


def _classification_lines(report: dict[str, Any]) -> list[str]:
    """scikit-learn's classification_report layout, then the confusion matrix."""
    labels = [str(x) for x in report["labels"]]
    w = max([len(x) for x in labels] + [12])
    lines = [f"  {'':>{w}}  {'precision':>9}  {'recall':>9}  {'f1':>9}  {'support':>9}"]
    named = list(zip(labels, report["per_class"].values())) + [
        (f"{avg} avg", report[avg]) for avg in ("macro", "micro", "weighted")]
    for name, m in named:
        lines.append(f"  {name:>{w}}  {m['precision']:9.4f}  {m['recall']:9.4f}  {m['f1']:9.4f}  {m['support']:9d}")
    matrix = report["confusion_matrix"]
    c = max([len(x) for x in labels] + [len(str(v)) for r in matrix for v in r] + [4])
    lines.append("  confusion matrix (rows: reference, columns: prediction)")
    lines.append("  " + " " * c + "  " + "  ".join(f"{x:>{c}}" for x in labels))
    lines += [f"  {label:>{c}}  " + "  ".join(f"{v:>{c}}" for v in r) for label, r in zip(labels, matrix)]
    return lines


def _find_dicts_with(obj: Any, key: str) -> list[dict[str, Any]]:
    if not isinstance(obj, dict):
        return []
    return ([obj] if key in obj else []) + [d for v in obj.values() for d in _find_dicts_with(v, key)]


def _find_key(obj: Any, key: str) -> list[Any]:
    if not isinstance(obj, dict):
        return []
    return ([obj[key]] if key in obj else []) + [x for v in obj.values() for x in _find_key(v, key)]


def _jsonable(obj: Any) -> Any:
    """Plain JSON types: tensors and numpy values become lists/numbers, dict keys strings."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item") and hasattr(obj, "dtype"):  # numpy scalar
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


# ---- plots --------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], labels: Sequence[Any], path: str | os.PathLike) -> None:
    """A heat map of counts, rows = reference label, columns = predicted label."""
    plt = _pyplot()
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * n, 1.0 + 0.8 * n))
    im = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), [str(x) for x in labels], rotation=45, ha="right")
    ax.set_yticks(range(n), [str(x) for x in labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    peak = max((v for r in matrix for v in r), default=0)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(matrix[i][j]), ha="center", va="center",
                    color="white" if matrix[i][j] > peak / 2 else "black")
    fig.colorbar(im, ax=ax)
    ax.set_title("confusion matrix")
    _save_figure(fig, path)


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


def plot_perplexity_by_context(context_length: torch.Tensor, token_nll: torch.Tensor, path: str | os.PathLike) -> None:
    """Perplexity against the number of context tokens: how much the model uses its context."""
    plt = _pyplot()
    bins = perplexity_by_context(context_length, token_nll)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([b["context_from"] for b in bins], [b["perplexity"] for b in bins], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xticks([b["context_from"] for b in bins], [str(b["context_from"]) for b in bins])
    ax.minorticks_off()
    ax.set_xlabel("tokens of context (bin start)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"perplexity by context length ({int(token_nll.numel())} tokens)")
    ax.grid(True, alpha=0.3)
    _save_figure(fig, path)


LOG_FILES = ("metrics.jsonl", "log.jsonl", "train_log.jsonl", "history.jsonl")


def read_run_log(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSONL training log of a run directory (the first of LOG_FILES, or a .jsonl file itself)."""
    run = Path(run_dir)
    log = run if run.is_file() else next((run / n for n in LOG_FILES if (run / n).is_file()), None)
    if log is None:
        raise DataError(f"--run-dir {run}: no training log found (looked for {', '.join(LOG_FILES)})")
    return [r for r in read_jsonl(log, "--run-dir") if isinstance(r, dict)]


def plot_loss_curves(run_dir: str | os.PathLike, path: str | os.PathLike) -> None:
    """Every `*loss*` series of a run's log against its `step` (train and validation loss together)."""
    rows = read_run_log(run_dir)
    keys = sorted({k for r in rows for k, v in r.items() if "loss" in k and isinstance(v, (int, float))})
    if not keys:
        raise DataError(f"--run-dir {run_dir}: the training log has no loss values to plot")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        pts = [(r.get("step", i), r[key]) for i, r in enumerate(rows) if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key, marker="." if len(pts) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"loss curves: {Path(run_dir).name}")
    ax.legend()
    ax.grid(True, alpha=0.3)
    _save_figure(fig, path)
