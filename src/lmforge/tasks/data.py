"""Labeled examples for fine-tuning: JSONL readers that name `file:line`, and the batch sources
the trainer draws from (shuffled epochs, seeded, split across ranks, resumable).

A source has `next_batch() -> dict[str, Tensor]`, `state_dict()` / `load_state_dict()` (its
position) and `num_tokens(batch)`; `val_batches(...)` makes the zero-argument callable the trainer
uses for validation.
"""

from __future__ import annotations

import json
import os
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


def read_records(path: str | os.PathLike, fields: Sequence[str] = (), option: str = "--train") -> list[Record]:
    """Every object of a JSONL file; fails on bad JSON, a non-object row or a missing field,
    naming the option, `file:line` and the fields the row does have."""
    records = []
    for lineno, row in iter_jsonl(path, option):
        if not isinstance(row, dict):
            raise DataError(f"{option} {path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        missing = [name for name in fields if name not in row]
        if missing:
            raise DataError(
                f"{option} {path}:{lineno}: missing field(s) {missing} (the row has {sorted(row)}); "
                f"pick the right field names with the field options of the command"
            )
        records.append(Record(row, str(path), lineno))
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
