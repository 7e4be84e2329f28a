"""Reading evaluation data: rows (JSONL, CSV or TSV) with required fields, prediction/reference
columns, token streams."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

from lmforge.errors import ConfigError, DataError
from lmforge.tasks.data import check_input_file, is_table, iter_rows, read_text_file


def read_rows(path: str | os.PathLike, option: str = "--data", *, columns: Sequence[str] = (),
              json_fields: Sequence[str] = ()) -> list[Any]:
    """Every row of a JSONL file (one JSON value per line) or a CSV/TSV file (by extension: a header
    row of column names, then {column: text} rows; `columns` must be among them, and cells of
    `json_fields` columns may hold JSON lists); errors name the file (and the CLI option) and the line."""
    rows = [row for _, row in iter_rows(path, option, columns=columns, json_fields=json_fields)]
    if not rows:
        raise DataError(f"{option} {path}: the file is empty")
    return rows


read_jsonl = read_rows  # the name it had when only JSONL was read


def require_fields(rows: Sequence[Any], fields: Sequence[str], path: str | os.PathLike, option: str = "--data") -> None:
    """Fail on the first row that is not an object with all of `fields`, naming the file and line."""
    for i, row in enumerate(rows, 1):
        missing = [f for f in fields if not isinstance(row, dict) or f not in row]
        if missing:
            have = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"{option} {path}: row {i} lacks field(s) {missing} (it has {have})")


def read_column(path: str | os.PathLike, candidates: Sequence[str], option: str) -> list[Any]:
    """Predictions or references from a file: `.txt` (one per line, blank line = empty string),
    `.jsonl` (a JSON value per line, or an object read at the first of `candidates` it has) or
    `.csv` / `.tsv` (the first of `candidates` among the header's columns; a cell may hold a JSON
    list of several references)."""
    path = check_input_file(path, option)
    if path.suffix != ".jsonl" and not is_table(path):
        lines = read_text_file(path, option).splitlines()
        if not lines:
            raise DataError(f"{option} {path}: the file is empty")
        return lines
    rows = read_rows(path, option, json_fields=candidates)
    if is_table(path) and not any(c in rows[0] for c in candidates):
        raise DataError(f"{option} {path}: none of the columns {list(candidates)} (the header row has "
                        f"{list(rows[0])}); name the column with the command's field option")
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
    - a `.jsonl`, `.csv` or `.tsv` file (its `text_field` values joined by blank lines) or any
      other file as UTF-8 text, encoded with `tokenizer`.
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
        if path.suffix == ".jsonl" or is_table(path):
            rows = read_rows(path, columns=[text_field])
            require_fields(rows, [text_field], path)
            text = "\n\n".join(str(r[text_field]) for r in rows)
        else:
            text = read_text_file(path, "--data")
        if max_tokens is not None:
            text = text[: max_tokens * 16]  # ample for any tokenizer; cut to max_tokens below
        arr = np.asarray(tokenizer.encode(text), dtype=np.int64)
    ids = torch.from_numpy(np.asarray(arr[:max_tokens]).astype(np.int64))
    if ids.numel() < 2:
        raise DataError(f"--data {path}: {ids.numel()} token(s); perplexity needs at least 2 (is the file empty?)")
    return ids
