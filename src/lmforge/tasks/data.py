"""Labeled examples for fine-tuning: the one reader of row files (JSONL, or CSV/TSV with a header
row) whose errors name `file:line`, and the batch sources the trainer draws from (shuffled epochs,
seeded, split across ranks, resumable). `lmforge finetune`, `run` and `evaluate` all read rows here.

A source has `next_batch() -> dict[str, Tensor]`, `state_dict()` / `load_state_dict()` (its
position) and `num_tokens(batch)`; `val_batches(...)` makes the zero-argument callable the trainer
uses for validation.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from lmforge.errors import DataError


@dataclass
class Record:
    """One JSONL row and where it came from (for error messages)."""

    row: dict[str, Any]
    path: str
    line: int
    table: bool = False  # from a CSV/TSV file: every value is text (or a JSON cell of a structured field)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def iter_jsonl(path: str | os.PathLike, option: str = "--data") -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line of a JSONL file; a missing file or a line
    that is not JSON fails naming the option and `file:line`."""
    path = check_input_file(path, option)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{option} {path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                f"{e.start + 1}); convert the file to UTF-8 (e.g. iconv -t UTF-8)") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{option} {path}:{lineno}: not valid JSON ({e.msg}); expected one JSON object per line") from None


# Row files by extension: a CSV or TSV file has a header row of column names, which are the field
# names a JSONL row would use as keys. Anything else is read as JSONL.
TABLE_DELIMITERS = {".csv": ",", ".tsv": "\t"}


def is_table(path: str | os.PathLike) -> bool:
    """Whether `path` is read as CSV/TSV (by its extension) rather than as JSONL."""
    return Path(path).suffix.lower() in TABLE_DELIMITERS


def iter_rows(path: str | os.PathLike, option: str = "--data", *, columns: Sequence[str] = (),
              json_fields: Sequence[str] = ()) -> Iterator[tuple[int, Any]]:
    """(line number, row) of every row of a row file: JSONL (one JSON value per line), or CSV/TSV by
    extension (a dict of column -> cell text per record). For a table, `columns` must all be in the
    header (else a DataError naming the file, the missing columns and the columns found), and a cell
    of a `json_fields` column that holds a JSON list or object (`["Paris", "paris"]`) is read as it;
    every other cell stays text."""
    if is_table(path):
        yield from iter_table(path, option, columns=columns, json_fields=json_fields)
    else:
        yield from iter_jsonl(path, option)


def iter_table(path: str | os.PathLike, option: str = "--data", *, columns: Sequence[str] = (),
               json_fields: Sequence[str] = ()) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, {column: cell}) of every record of a CSV (comma) or TSV (tab) file with a
    header row, read with the csv module (quoted cells may hold the delimiter, quotes and newlines);
    the line is where the record starts. Blank lines are skipped; a record with another number of
    cells than the header fails naming `file:line`."""
    path = check_input_file(path, option)
    kind = path.suffix.lower()[1:].upper()
    text = read_text_file(path, option).removeprefix("\ufeff")  # the byte-order mark spreadsheets write
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=TABLE_DELIMITERS[path.suffix.lower()], strict=True)
    try:
        header = next(reader, None)
        while header is not None and not any(cell.strip() for cell in header):
            header = next(reader, None)  # blank lines before the header
        if header is None:
            raise DataError(f"{option} {path}: the file is empty; a {kind} file needs a header row of column names "
                            f"(e.g. text,label) and then one row per example")
        names = [name.strip() for name in header]
        _check_header(names, path, option, reader.line_num, kind)
        missing = [c for c in columns if c not in names]
        if missing:
            other = "\t" if kind == "CSV" else ","
            hint = (f"; the file looks {'tab' if kind == 'CSV' else 'comma'}-separated: name it "
                    f"{path.with_suffix('.tsv' if kind == 'CSV' else '.csv').name}"
                    if len(names) == 1 and other in names[0] else "")
            raise DataError(f"{option} {path}: no column {_names(missing)} (the header row has {names}); name the "
                            f"columns in the first row of the file, or pick the right ones with the command's field "
                            f"options{hint}")
        wanted = [name for name in json_fields if name in names]
        start = reader.line_num + 1
        for cells in reader:
            line, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in cells) and len(cells) <= 1:
                continue
            if len(cells) != len(names):
                raise DataError(f"{option} {path}:{line}: {len(cells)} cells, but the header row has {len(names)} "
                                f"columns {names}; quote cells that hold the delimiter ({_show_delimiter(kind)}) "
                                f"or a line break")
            row: dict[str, Any] = dict(zip(names, cells))
            for name in wanted:
                row[name] = _json_cell(row[name])
            yield line, row
    except csv.Error as e:
        raise DataError(f"{option} {path}:{reader.line_num}: not valid {kind} ({e})") from None


def _check_header(names: list[str], path: Path, option: str, line: int, kind: str) -> None:
    if any(not name for name in names):
        raise DataError(f"{option} {path}:{line}: the header row {names} has an empty column name; the first row "
                        f"of a {kind} file names every column")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise DataError(f"{option} {path}:{line}: the header row names column(s) {twice} more than once")


def _names(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names)


def _show_delimiter(kind: str) -> str:
    return "a tab" if kind == "TSV" else "a comma"


def _json_cell(text: str) -> Any:
    """A cell holding a JSON list or object, parsed; any other text as it is."""
    stripped = text.strip()
    if stripped[:1] in ("[", "{"):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            return text
        if isinstance(value, (list, dict)):
            return value
    return text


def int_like(value: Any) -> bool:
    """A text cell holding a whole number ("3", "-1"): how a CSV/TSV file holds an integer."""
    return isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()) is not None


def check_input_file(path: str | os.PathLike, option: str) -> Path:
    """`path` as a Path when it is a readable file; a DataError naming the option otherwise."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{option} {path}: is a directory; pass a file")
    if not path.is_file():
        raise DataError(f"{option} {path}: no such file")
    return path


def read_text_file(path: str | os.PathLike, option: str) -> str:
    """The whole of a UTF-8 text file; a file that is not UTF-8 fails naming it, the line and the byte."""
    data = check_input_file(path, option).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{option} {path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                        f"convert the file to UTF-8 (e.g. iconv -t UTF-8)") from None


def read_records(path: str | os.PathLike, fields: Sequence[str] = (), option: str = "--train", *,
                 json_fields: Sequence[str] = ()) -> list[Record]:
    """Every row of a JSONL or CSV/TSV file (see iter_rows); fails on bad JSON, a non-object row or a
    missing field (column), naming the option, `file:line` and the fields the row does have."""
    records = []
    table = is_table(path)
    for lineno, row in iter_rows(path, option, columns=fields, json_fields=json_fields):
        if not isinstance(row, dict):
            raise DataError(f"{option} {path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        missing = [name for name in fields if name not in row]
        if missing:
            raise DataError(
                f"{option} {path}:{lineno}: missing field(s) {missing} (the row has {sorted(row)}); "
                f"pick the right field names with the field options of the command"
            )
        records.append(Record(row, str(path), lineno, table))
    if not records:
        raise DataError(f"{option} {path}: the file has no rows")
    return records


class ShuffledSource:
    """Batches of `batch_size` examples drawn in a seeded random order, epoch after epoch.

    Each epoch is a fresh permutation (seed + epoch), and the epochs follow one another as one
    stream. Every rank reads the whole global batch (batch_size x world_size examples) from that
    stream and keeps its own slice, as RandomBlocks does for pretraining: 2 processes x 2 examples
    see exactly the batches of 1 process x 4, whatever the number of examples, and no example is
    dropped at the end of an epoch. `collate(examples) -> dict` builds the tensors. The position
    (epoch, offset in the stream, the same on every rank) is the whole state: a resumed run
    continues with the same batches.

    lengths (optional, one per example) groups examples of similar length into the same batch, as
    transformers' group_by_length: each window of 64 global batches of the shuffled order is sorted
    by length, cut into global batches, and the batches of the epoch are shuffled again. Batches stay
    random but carry far less padding, which makes short-text data (sentences, phrases) several times faster.
    """

    GROUP_WINDOW = 64  # global batches per sorted window

    def __init__(
        self, examples: Sequence[Any], batch_size: int, collate: Callable[[list[Any]], dict[str, torch.Tensor]],
        *, seed: int = 0, rank: int = 0, world_size: int = 1, lengths: Sequence[int] | None = None,
    ) -> None:
        if not examples:
            raise DataError("no training examples to draw batches from")
        self.examples = examples
        self.batch_size = batch_size
        self.collate = collate
        self.seed, self.rank, self.world_size = seed, rank, world_size
        if lengths is not None and len(lengths) != len(examples):
            raise ValueError(f"lengths has {len(lengths)} entries for {len(examples)} examples")
        self.lengths = list(lengths) if lengths is not None else None
        self.epoch, self.offset = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.examples), generator=g).tolist()
        return order if self.lengths is None else self._grouped(order, g)

    def _grouped(self, order: list[int], g: torch.Generator) -> list[int]:
        """The order with each window sorted by length and the full global batches shuffled (a partial one last)."""
        size = self.batch_size * self.world_size
        window = size * self.GROUP_WINDOW
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start: start + window], key=lambda i: self.lengths[i])
            batches.extend(chunk[k: k + size] for k in range(0, len(chunk), size))
        full = [b for b in batches if len(b) == size]
        rest = [i for b in batches if len(b) != size for i in b]
        shuffled = [full[k] for k in torch.randperm(len(full), generator=g).tolist()]
        return [i for b in shuffled for i in b] + rest

    def next_batch(self) -> dict[str, torch.Tensor]:
        picked: list[int] = []
        size = self.batch_size * self.world_size
        while len(picked) < size:
            if self.offset >= len(self._order):
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = self._order[self.offset: self.offset + size - len(picked)]
            picked.extend(take)
            self.offset += len(take)
        mine = picked[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return self.collate([self.examples[i] for i in mine])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "size": len(self.examples)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("size", len(self.examples)) != len(self.examples):
            raise DataError(f"the training data changed since the run was saved: {state['size']} examples then, "
                            f"{len(self.examples)} now; resume with the same data or start a new run")
        self.seed = state.get("seed", self.seed)
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._permutation(self.epoch)

    @staticmethod
    def num_tokens(batch: dict[str, torch.Tensor]) -> int:
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def val_batches(
    examples: Sequence[Any], batch_size: int, collate: Callable[[list[Any]], dict[str, torch.Tensor]],
    *, rank: int = 0, world_size: int = 1,
) -> Callable[[], Iterator[dict[str, torch.Tensor]]]:
    """A zero-argument callable that yields the validation examples in order, in batches.

    Under torchrun the examples go through in global batches of batch_size x world_size and each rank
    scores its slice, so the trainer's summed loss covers every example once, as one process would.
    A rank whose slice of the last global batch is empty gets one example with every label -100
    (it counts nothing): all ranks run the same number of forward passes, which FSDP needs.
    """
    size = batch_size * world_size

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(examples), size):
            mine = list(examples[start + rank * batch_size: start + (rank + 1) * batch_size])
            if mine:
                yield collate(mine)
            else:
                batch = collate([examples[start]])
                batch["labels"] = torch.full_like(batch["labels"], -100)
                yield batch

    return batches
