"""Token datasets: `prepare` turns text / JSONL into memory-mapped token files; readers sample them.

A prepared directory holds
    dataset.json          the header: format, dtype, tokens and documents per split, tokenizer fingerprint
    train.bin, val.bin    raw token ids (uint16 when the vocab fits in 65536 ids, else uint32, native
                          byte order as np.memmap reads them); every document is followed by eos
    tokenizer/            the tokenizer that made them (so the directory is self-contained)
The validation split is the last `val_fraction` of the token stream (as nanoGPT), cut at the document
boundary nearest that point when one is within half the split's size, else inside a document (the
header then says "split_inside_document": true).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np
import torch

from lmforge._io import directory_lock, fsync_dir, make_dirs, remove_empty_dirs, remove_stale_temps
from lmforge.corpus import PIECE_CHARS, Errors, Format, expand_files, iter_pieces
from lmforge.errors import ConfigError, DataError
from lmforge.char_tokenizer import CharTokenizer
from lmforge.tokenizer import Tokenizer, TokenizerBase

HEADER_FILE = "dataset.json"
FORMAT = "lmforge.tokens"
VERSION = 1
TOKENIZER_DIR = "tokenizer"
SPLIT_FILES = {"train": "train.bin", "val": "val.bin"}
IGNORE_INDEX = -100  # target value of padding in sequential batches; lm_loss skips it
_SCAN_TOKENS = 1 << 24  # tokens per step when scanning or copying token files (bounded memory)
_BUILD_PREFIX = ".tmp-prepare-"  # a dataset is built in OUT/.tmp-prepare-PID, then moved into place


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise ConfigError(f"vocab_size {vocab_size} does not fit in 32-bit token ids")


# ---- prepare ---------------------------------------------------------------------------------


def prepare(
    data: str | os.PathLike | Iterable[str | os.PathLike],
    tokenizer: TokenizerBase | str | os.PathLike,
    out: str | os.PathLike,
    *,
    val_fraction: float = 0.1,
    field: str = "text",
    fmt: Format = "auto",
    errors: Errors = "strict",
    batch_chars: int | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Tokenize text / JSONL files (paths or globs) into `out`; return the header it writes.

    Streams: text is read, encoded (`batch_chars` characters at a time, on all cores through the
    tokenizers library; default 2 pieces of 64K characters per core, at least 16) and appended to
    disk, so memory does not grow with the corpus. Each
    document is followed by the eos token; special-token strings inside documents are encoded as
    plain text, so eos only ever separates documents. The dataset is built in a hidden folder inside
    `out` and moved into place at the end, the header last: a failed or killed prepare leaves an
    earlier dataset in `out` readable, and the next prepare there removes what a killed one left.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction={val_fraction} must be in [0, 1)")
    files = expand_files(data)
    tok = tokenizer if isinstance(tokenizer, TokenizerBase) else Tokenizer.from_pretrained(tokenizer)
    out = Path(out)
    if batch_chars is None:
        batch_chars = PIECE_CHARS * max(16, 2 * (os.cpu_count() or 1))
    try:
        created = make_dirs(out)
    except OSError as e:
        raise DataError(f"cannot write a dataset to {out}: {e.strerror or e}; choose another --out") from None
    try:
        with directory_lock(out, DataError, "prepare"):
            _remove_stale_builds(out)
            build = out / f"{_BUILD_PREFIX}{os.getpid()}"
            build.mkdir()
            try:
                header = _build(files, tok, tokenizer, build, val_fraction=val_fraction, field=field, fmt=fmt,
                                errors=errors, batch_chars=batch_chars, show_progress=show_progress)
                _swap_in(build, out)
            except OSError as e:
                raise DataError(f"could not write the dataset in {out}: {e}; what was there before is unchanged "
                                f"(free disk space or fix the permissions, then prepare again)") from e
            finally:
                shutil.rmtree(build, ignore_errors=True)
    except BaseException:
        remove_empty_dirs(created)
        raise
    return header


def _build(files: list[Path], tok: TokenizerBase, given: Any, build: Path, *, val_fraction: float, field: str,
           fmt: Format, errors: Errors, batch_chars: int, show_progress: bool) -> dict[str, Any]:
    """Write a complete dataset (token files, tokenizer, header) into the private folder `build`."""
    dtype = token_dtype(tok.vocab_size)
    eos = tok.eos_token_id
    sizes = [f.stat().st_size for f in files]
    train, val = build / SPLIT_FILES["train"], build / SPLIT_FILES["val"]
    digest = hashlib.sha256()

    from tqdm.auto import tqdm

    with tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="prepare", disable=not show_progress) as bar:
        pieces = iter_pieces(files, field=field, fmt=fmt, errors=errors, piece_chars=PIECE_CHARS, on_bytes=bar.update)
        with open(train, "wb") as f:
            n_tokens, n_docs = _write_tokens(pieces, tok, f, dtype, eos, batch_chars, bar, digest)
    if n_tokens == 0:
        raise DataError(f"the inputs hold no text to tokenize ({', '.join(map(str, files[:3]))})")
    cut = _split_point(train, dtype, n_tokens, val_fraction, eos)
    val_docs = _move_tail(train, val, dtype, cut, n_tokens, eos)
    inside = 0 < cut < n_tokens and (eos is None or int(np.fromfile(train, dtype, 1, offset=(cut - 1) * dtype.itemsize)[0]) != eos)
    tok.save_pretrained(build / TOKENIZER_DIR)
    header = {
        "format": FORMAT, "version": VERSION, "dtype": dtype.name, "byteorder": sys.byteorder,
        "tokens": n_tokens, "documents": n_docs, "split_inside_document": bool(inside), "tokens_sha256": digest.hexdigest(),
        "splits": {
            "train": {"file": SPLIT_FILES["train"], "tokens": cut, "documents": n_docs - val_docs},
            "val": {"file": SPLIT_FILES["val"], "tokens": n_tokens - cut, "documents": val_docs},
        },
        "tokenizer": _tokenizer_summary(tok, given),
        "inputs": [{"path": str(f), "bytes": s, "sha256": file_sha256(f)} for f, s in zip(files, sizes)],
        "text_bytes": sum(sizes), "field": field, "input_format": fmt, "encoding_errors": errors, "val_fraction": val_fraction,
    }
    (build / HEADER_FILE).write_text(json.dumps(header, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    for path in [train, val, build / HEADER_FILE, *sorted((build / TOKENIZER_DIR).rglob("*"))]:
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    return header


def _swap_in(build: Path, out: Path) -> None:
    """Move a finished build into `out`, the header last: until then no half-new dataset looks valid.
    Only the dataset's own entries are replaced; other files in `out` (its source text) stay."""
    (out / HEADER_FILE).unlink(missing_ok=True)
    for name in (*SPLIT_FILES.values(), TOKENIZER_DIR):
        target = out / name
        if target.is_dir() and not target.is_symlink():
            old = out / f"{_BUILD_PREFIX}old-{name}-{os.getpid()}"
            os.replace(target, old)
            os.replace(build / name, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(build / name, target)
    os.replace(build / HEADER_FILE, out / HEADER_FILE)
    fsync_dir(out)


def _remove_stale_builds(out: Path) -> None:
    """Delete what a killed prepare left in `out` (called under its lock, so nothing here is live):
    build folders, and the hidden temp files of the atomic writes earlier versions made there."""
    for p in out.iterdir():
        if p.name.startswith(_BUILD_PREFIX):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    remove_stale_temps(out, [*SPLIT_FILES.values(), HEADER_FILE])


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def dataset_fingerprint(header: dict[str, Any]) -> str:
    """What a prepared dataset is, not where it lies: its tokens' hash, its splits and its tokenizer.
    Equal fingerprints mean the same training data, in any folder. (Headers written before the
    token hash existed fall back to counts and sizes.)"""
    ident = {"tokens_sha256": header.get("tokens_sha256"), "dtype": header["dtype"],
             "splits": {k: v["tokens"] for k, v in sorted(header["splits"].items())},
             "tokenizer": header["tokenizer"]["fingerprint"]}
    if ident["tokens_sha256"] is None:
        ident.update(documents=header.get("documents"), text_bytes=header.get("text_bytes"))
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _tokenizer_summary(tok: TokenizerBase, given: Any) -> dict[str, Any]:
    return {
        "kind": "char" if isinstance(tok, CharTokenizer) else "bpe", "fingerprint": tok.fingerprint,
        "vocab_size": tok.vocab_size, "eos_token_id": tok.eos_token_id, "directory": TOKENIZER_DIR,
        "source": None if isinstance(given, TokenizerBase) else str(given),
    }


def _encode(tok: TokenizerBase, texts: list[str], dtype: np.dtype) -> list[np.ndarray]:
    if isinstance(tok, CharTokenizer):  # vectorised; skips the list round trip
        return [tok.encode_array(t, split_special_tokens=True).astype(dtype) for t in texts]
    rows = tok.encode_batch(texts, split_special_tokens=True, add_special_tokens=False)  # pieces of documents: no bos
    return [np.array(ids, dtype=dtype) for ids in rows]


def _write_tokens(
    pieces: Iterator[tuple[str, bool]], tok: TokenizerBase, f: BinaryIO, dtype: np.dtype,
    eos: int | None, batch_chars: int, bar: Any, digest: Any,
) -> tuple[int, int]:
    """Encode pieces in batches and append them (eos after each document); return (tokens, documents)."""
    eos_arr = np.array([] if eos is None else [eos], dtype=dtype)
    n_tokens = n_docs = 0
    batch: list[tuple[str, bool]] = []
    size = 0

    def flush() -> None:
        nonlocal n_tokens, n_docs, size
        arrays = []
        for ids, (_, last) in zip(_encode(tok, [p for p, _ in batch], dtype), batch):
            arrays.append(ids)
            if last:
                arrays.append(eos_arr)
                n_docs += 1
        block = np.concatenate(arrays)
        block.tofile(f)
        digest.update(block.tobytes())
        n_tokens += len(block)
        bar.set_postfix(tokens=f"{n_tokens:,}", refresh=False)
        batch.clear()
        size = 0

    doc_open = False
    for piece, last in pieces:
        if eos is None and not doc_open and (n_docs or any(b[1] for b in batch)):
            raise DataError("the inputs hold several documents, but the tokenizer has no eos token to separate them; "
                            "use a tokenizer with <|endoftext|> (the default when training one), or a single text file")
        batch.append((piece, last))
        doc_open = not last
        size += len(piece)
        if size >= batch_chars:
            flush()
    if batch:
        flush()
    return n_tokens, n_docs


def _split_point(path: Path, dtype: np.dtype, n: int, val_fraction: float, eos: int | None) -> int:
    """Where val starts: the document boundary nearest n * (1 - val_fraction), if within half the
    val size of it, else exactly there."""
    n_val = min(round(n * val_fraction), n - 1)
    if n_val <= 0:
        return n
    target = n - n_val
    if eos is None:
        return target
    window = max(1, n_val // 2)
    lo, hi = max(1, target - window), min(n - 1, target + window)  # candidate cuts
    tokens = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
    best = None
    for s in range(lo - 1, hi, _SCAN_TOKENS):  # a cut at c follows an eos at c - 1
        cuts = np.flatnonzero(np.asarray(tokens[s:min(s + _SCAN_TOKENS, hi)]) == eos) + s + 1
        if len(cuts):
            c = int(cuts[np.argmin(np.abs(cuts - target))])
            if best is None or abs(c - target) < abs(best - target):
                best = c
    del tokens
    return best if best is not None else target


def _move_tail(train: Path, val: Path, dtype: np.dtype, cut: int, n: int, eos: int | None) -> int:
    """Copy tokens[cut:] of `train` to `val`, truncate `train` to cut; return the eos count moved."""
    eos_count = 0
    step = _SCAN_TOKENS * dtype.itemsize
    with open(train, "rb") as src, open(val, "wb") as dst:
        src.seek(cut * dtype.itemsize)
        while chunk := src.read(step):
            dst.write(chunk)
            if eos is not None:
                eos_count += int(np.count_nonzero(np.frombuffer(chunk, dtype=dtype) == eos))
    os.truncate(train, cut * dtype.itemsize)
    return eos_count if eos is not None else int(cut < n)  # no eos: one document, ending in the last split


# ---- reading ---------------------------------------------------------------------------------


def read_header(directory: str | os.PathLike) -> dict[str, Any]:
    """The dataset.json of a prepared directory, checked for format and version."""
    path = Path(directory) / HEADER_FILE
    if not path.is_file():
        raise DataError(f"{directory}: not a prepared token dataset (no {HEADER_FILE}); "
                        f"run `lmforge prepare --data ... --tokenizer ... --out {directory}`")
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
        ok = (header.get("format") == FORMAT and header["dtype"] in ("uint16", "uint32")
              and isinstance(header["splits"], dict) and "fingerprint" in header["tokenizer"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: not a valid dataset header ({e}); prepare the data again") from None
    if not ok:
        raise DataError(f"{path}: not an lmforge token dataset header (format {header.get('format')!r}, dtype {header.get('dtype')!r})")
    if header.get("version", 0) > VERSION:
        raise DataError(f"{path}: format version {header['version']} is newer than this lmforge reads ({VERSION}); upgrade lmforge")
    if header.get("byteorder", sys.byteorder) != sys.byteorder:
        raise DataError(f"{path}: written on a {header['byteorder']}-endian machine; prepare the data again here")
    return header


def check_tokenizer(header: dict[str, Any], tokenizer: TokenizerBase, where: str | os.PathLike = "dataset") -> None:
    """Raise DataError when `tokenizer` is not the one the dataset was prepared with."""
    info = header["tokenizer"]
    if tokenizer.fingerprint != info["fingerprint"] or tokenizer.vocab_size != info["vocab_size"]:
        raise DataError(
            f"{where}: prepared with a different tokenizer ({info['kind']}, vocab_size {info['vocab_size']}, "
            f"fingerprint {info['fingerprint']}) than the one given ({tokenizer.vocab_size}, {tokenizer.fingerprint}); "
            f"use the tokenizer saved in {Path(where) / info.get('directory', TOKENIZER_DIR)}, or prepare the data again with this one"
        )


class TokenDataset:
    """One split of a prepared directory, memory-mapped (nothing is read until used).

    random_batch samples contiguous blocks at random positions (as nanoGPT's get_batch);
    sequential_batches walks the split once in order for evaluation. With world_size > 1 each rank
    reads only its contiguous 1/world_size share of the tokens, so ranks never see the same data.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        split: str = "train",
        *,
        tokenizer: TokenizerBase | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        self.directory = Path(directory)
        self.header = read_header(self.directory)
        splits = self.header["splits"]
        if split not in splits:
            raise DataError(f"{self.directory}: no split {split!r}; available: {', '.join(splits)}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank}, world_size={world_size}: need world_size >= 1 and 0 <= rank < world_size")
        self.split, self.rank, self.world_size = split, rank, world_size
        self.dtype = np.dtype(self.header["dtype"])
        self.tokens = self._open_tokens()
        n = len(self.tokens)
        self.start, self.stop = n * rank // world_size, n * (rank + 1) // world_size
        self._tokenizer = None
        if tokenizer is not None:
            check_tokenizer(self.header, tokenizer, self.directory)
            self._tokenizer = tokenizer
        self._generator = torch.Generator().manual_seed(seed)

    def _open_tokens(self) -> np.ndarray:
        info = self.header["splits"][self.split]
        path = self.directory / info["file"]
        n = int(info["tokens"])
        actual = path.stat().st_size if path.is_file() else None
        if actual != n * self.dtype.itemsize:
            raise DataError(f"{path}: {'missing' if actual is None else f'{actual} bytes'}, but {HEADER_FILE} says "
                            f"{n} {self.dtype.name} tokens ({n * self.dtype.itemsize} bytes); the dataset is incomplete "
                            f"or was modified: prepare it again")
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(n,)) if n else np.zeros(0, self.dtype)

    def __getstate__(self) -> dict[str, Any]:
        # Pickled for DataLoader workers / spawn: send the path, not a copy of the mapped tokens.
        return {k: v for k, v in self.__dict__.items() if k != "tokens"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.tokens = self._open_tokens()

    @property
    def tokenizer(self) -> TokenizerBase:
        """The tokenizer the data was prepared with (loaded from the dataset directory)."""
        if self._tokenizer is None:
            tok = Tokenizer.from_pretrained(self.directory / self.header["tokenizer"].get("directory", TOKENIZER_DIR))
            check_tokenizer(self.header, tok, self.directory)
            self._tokenizer = tok
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return int(self.header["tokenizer"]["vocab_size"])

    @property
    def eos_token_id(self) -> int | None:
        return self.header["tokenizer"]["eos_token_id"]

    def __len__(self) -> int:
        """Tokens in this rank's share of the split."""
        return self.stop - self.start

    def random_batch(
        self,
        batch_size: int,
        block_size: int,
        generator: torch.Generator | int | None = None,
        *,
        seed: int | None = None,
        device: str | torch.device | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), both (batch_size, block_size) int64, y = x shifted one token ahead.

        Start positions are uniform over this rank's share. Randomness: `generator` (a
        torch.Generator, or an int seed), else `seed`, else the dataset's own generator (seeded at
        construction), so a run is reproducible.
        """
        if batch_size < 1 or block_size < 1:
            raise ConfigError(f"batch_size={batch_size} and block_size={block_size} must be positive")
        if len(self) < block_size + 1:
            raise DataError(f"{self.directory}: split {self.split!r} has {len(self)} tokens"
                            f"{f' on rank {self.rank} of {self.world_size}' if self.world_size > 1 else ''}, fewer than "
                            f"block_size + 1 = {block_size + 1}; use a smaller block_size or prepare more data")
        if isinstance(generator, int):
            seed, generator = generator, None
        if generator is None:
            generator = torch.Generator().manual_seed(seed) if seed is not None else self._generator
        starts = torch.randint(self.start, self.stop - block_size, (batch_size,), generator=generator).numpy()
        rows = np.asarray(self.tokens[starts[:, None] + np.arange(block_size + 1)], dtype=np.int64)
        return _to_device(torch.from_numpy(rows[:, :-1].copy()), device), _to_device(torch.from_numpy(rows[:, 1:].copy()), device)

    def num_blocks(self, block_size: int) -> int:
        """How many blocks sequential_batches yields for this rank (the last may be partial)."""
        predictions = self._seq_stop() - self.start - 1
        return max(0, -(-predictions // block_size))

    def sequential_batches(
        self, batch_size: int, block_size: int, *, device: str | torch.device | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive non-overlapping blocks covering this rank's share once, for evaluation.

        Every token after the first is a target exactly once across all ranks. The last block is
        padded: x with eos (or 0), y with IGNORE_INDEX (-100), which lm_loss skips; weight batch
        losses by (y != -100).sum() when averaging.
        """
        if batch_size < 1 or block_size < 1:
            raise ConfigError(f"batch_size={batch_size} and block_size={block_size} must be positive")
        lo, hi = self.start, self._seq_stop()
        n_blocks = self.num_blocks(block_size)
        pad = self.eos_token_id or 0
        for b0 in range(0, n_blocks, batch_size):
            b1 = min(b0 + batch_size, n_blocks)
            s, e = lo + b0 * block_size, min(lo + b1 * block_size + 1, hi)
            chunk = np.asarray(self.tokens[s:e], dtype=np.int64)
            rows = b1 - b0
            x = np.full(rows * block_size, pad, dtype=np.int64)
            y = np.full(rows * block_size, IGNORE_INDEX, dtype=np.int64)
            x[:len(chunk) - 1], y[:len(chunk) - 1] = chunk[:-1], chunk[1:]
            yield (_to_device(torch.from_numpy(x.reshape(rows, block_size)), device),
                   _to_device(torch.from_numpy(y.reshape(rows, block_size)), device))

    def _seq_stop(self) -> int:
        # One token past the share, so the last token of a rank's share is a target on that rank.
        return min(self.stop + 1, len(self.tokens))

    def documents(self) -> Iterator[np.ndarray]:
        """Each document of the whole split as an array of ids, without its eos. When the split
        cut a document, the train split ends and the val split starts with a part of it."""
        eos = self.eos_token_id
        n = len(self.tokens)
        if eos is None:
            if n:
                yield np.array(self.tokens)
            return
        pending: list[np.ndarray] = []
        for s in range(0, n, _SCAN_TOKENS):
            chunk = np.asarray(self.tokens[s:s + _SCAN_TOKENS])
            prev = 0
            for e in np.flatnonzero(chunk == eos):
                yield np.concatenate([*pending, chunk[prev:e]]) if pending else chunk[prev:e].copy()
                pending, prev = [], e + 1
            if prev < len(chunk):
                pending.append(chunk[prev:].copy())
        if pending:
            yield np.concatenate(pending)

    def __repr__(self) -> str:
        share = f", rank {self.rank}/{self.world_size}" if self.world_size > 1 else ""
        return f"TokenDataset({str(self.directory)!r}, split={self.split!r}, tokens={len(self):,}{share}, dtype={self.dtype.name})"


def _to_device(t: torch.Tensor, device: str | torch.device | None) -> torch.Tensor:
    if device is None:
        return t
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
