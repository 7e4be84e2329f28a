"""Apply a pipeline to a row file (JSONL, CSV or TSV): one output row per input row (the row plus the
result fields), as JSONL, or as CSV/TSV when the output's name ends in .csv / .tsv.

    run_file("sentiment-analysis", "runs/sst2/best", "reviews.jsonl", "scored.jsonl")
    run_file("translation", "runs/mt/best", "en.jsonl", "de.jsonl", max_new_tokens=40)

Input fields: `text` for text-generation, text-classification, translation and summarization
(`field=` picks another), `question` and `context` for question-answering: JSONL keys, or the
column names of a CSV/TSV file's header row. Every row is read and
checked before the model loads, so a bad row fails fast with `file:line`. The output is written to a
temporary file beside the target and renamed into place only when every row is done: a failed or
interrupted run leaves no partial output (and an existing file untouched).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

from lmforge._io import atomic_path, check_writable
from lmforge.errors import ConfigError, DataError
from lmforge.tasks.data import TABLE_DELIMITERS, Record, is_table, read_records
from lmforge.tasks.pipelines import TASK_ALIASES

DEFAULT_FIELD = "text"
QA_FIELDS = ("question", "context")
# Result fields whose name the input row already uses (e.g. a gold "label") get this prefix.
CLASH_PREFIX = "predicted_"


@dataclass
class RunSummary:
    task: str
    rows: int
    output: str
    seconds: float


def task_kind(task: str) -> str:
    """The canonical pipeline task of a name or alias (ConfigError for an unknown one)."""
    kind = TASK_ALIASES.get(task) or ("translation" if task.startswith("translation_") else None)
    if kind is None:
        raise ConfigError(f"unknown task {task!r}: use one of {', '.join(TASK_ALIASES)}")
    return kind


def input_fields(kind: str, field: str | None) -> list[str]:
    if kind == "question-answering":
        if field is not None:
            raise ConfigError("question-answering reads the fields 'question' and 'context'; --field does not apply")
        return list(QA_FIELDS)
    return [field or DEFAULT_FIELD]


def read_inputs(path: str | os.PathLike, fields: Sequence[str]) -> list[Record]:
    """The input rows; every needed field must be a string (errors name `file:line`)."""
    records = read_records(path, fields, "--input")
    for r in records:
        for name in fields:
            if not isinstance(r.row[name], str):
                raise DataError(f"--input {r.where}: field {name!r} must be a string, got "
                                f"{type(r.row[name]).__name__} ({r.row[name]!r:.60})")
    return records


def merge_result(row: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """The input row plus the result fields; a result name the row already has becomes predicted_NAME."""
    out = dict(row)
    for key, value in result.items():
        out[CLASH_PREFIX + key if key in row else key] = value
    return out


def _results(pipe: Any, kind: str, rows: list[dict[str, Any]], field: str, options: dict[str, Any]) -> list[dict]:
    if kind == "question-answering":
        return pipe([{k: r[k] for k in QA_FIELDS} for r in rows], **options)
    texts = [r[field] for r in rows]
    if kind == "text-classification":
        return pipe(texts)
    if kind == "text-generation":
        groups = pipe(texts, **options)
        return [g[0] if len(g) == 1 else {"generated_text": [d["generated_text"] for d in g]} for g in groups]
    return pipe(texts, **options)


def run_file(
    task: str, model: Any, input_path: str | os.PathLike, output_path: str | os.PathLike, *,
    field: str | None = None, batch_size: int = 8, device: str | None = None, dtype: str | None = None,
    quantize: str | None = None, tokenizer: Any = None, progress: bool | None = None, **generate_kwargs: Any,
) -> RunSummary:
    """Apply the `task` pipeline of `model` to every row of `input_path` and write `output_path`
    (JSONL, atomically). generate_kwargs (max_new_tokens, num_beams, ...) go to generative tasks;
    quantize ("int8") quantizes the model's weights (lmforge.quantize)."""
    import time

    from tqdm.auto import tqdm

    from lmforge.tasks.pipelines import pipeline

    kind = task_kind(task)
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be >= 1")
    options = {k: v for k, v in generate_kwargs.items() if v is not None}
    if kind == "text-classification" and options:
        raise ConfigError(f"{task} does not generate; generation options {sorted(options)} do not apply")
    fields = input_fields(kind, field)
    check_writable(output_path, ConfigError, "--output")  # before any row is read or generated
    records = read_inputs(input_path, fields)
    start = time.perf_counter()
    pipe = pipeline(task, model=model, tokenizer=tokenizer, device=device, dtype=dtype, batch_size=batch_size,
                    quantize=quantize)
    table = is_table(output_path)
    with atomic_path(output_path) as tmp, open(tmp, "w", encoding="utf-8", newline="" if table else None) as out:
        bar = tqdm(total=len(records), unit="row", desc=f"{kind}", disable=None if progress is None else not progress)
        rows_out = []
        for i in range(0, len(records), batch_size):
            chunk = [r.row for r in records[i: i + batch_size]]
            for row, result in zip(chunk, _results(pipe, kind, chunk, fields[0], options)):
                if table:
                    rows_out.append(merge_result(row, result))
                else:
                    out.write(json.dumps(merge_result(row, result), ensure_ascii=False) + "\n")
            bar.update(len(chunk))
        bar.close()
        if table:
            write_table(out, rows_out, TABLE_DELIMITERS[os.path.splitext(output_path)[1].lower()])
        out.flush()
    return RunSummary(kind, len(records), str(output_path), time.perf_counter() - start)


def write_table(out: Any, rows: Sequence[dict[str, Any]], delimiter: str) -> None:
    """Rows as CSV/TSV with a header row (every column of any row, in order of appearance); a list or
    object value is written as JSON text, which lmforge reads back as such."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    writer = csv.writer(out, delimiter=delimiter)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)
