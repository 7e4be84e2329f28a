"""Reading text corpora: expand file globs and stream documents from plain text and JSONL files.

A document is a whole plain-text file, or one JSONL record's text field. Documents are streamed as
pieces of about `piece_chars` characters, so memory stays bounded for files larger than RAM. A piece
is cut only where byte-level BPE pre-tokenization (GPT-2's regex, and the cl100k/o200k family) has
a token boundary anyway: before a single space, or after a single newline, between two non-space
characters. Encoding the pieces one by one therefore gives the same ids as encoding the document
whole. Bad input is an error naming the file and the line or byte offset.
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Union

from lmforge.errors import ConfigError, DataError

Format = Literal["auto", "text", "jsonl"]
TextSource = Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]]
Errors = Literal["strict", "replace"]

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PIECE_CHARS = 1 << 16
_READ_BYTES = 1 << 20
# With no safe cut point this many pieces past the target (a 256K-character run without a space or
# newline), cut anyway: ids next to that cut may differ from whole-document encoding; the text is intact.
_LOOK_AHEAD = 4
_CUT_AFTER_NEWLINE = re.compile(r"(?<=\S)\n(?=\S)")
_CUT_BEFORE_SPACE = re.compile(r"(?<=\S) (?=\S)")


def expand_files(patterns: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Files named by paths and globs (`data/*.txt`, `corpus/**/*.jsonl`), in the order given.

    Each glob expands to its sorted matches; a pattern matching nothing is an error, as is a folder.
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    files: list[Path] = []
    for pattern in patterns:
        text = os.fspath(pattern)
        p = Path(text).expanduser()
        if p.is_file():
            files.append(p)
            continue
        if p.is_dir():
            raise DataError(f"{p}: is a folder; pass its files or a glob such as '{p / '*.txt'}'")
        if glob.has_magic(text):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(text), recursive=True) if os.path.isfile(m))
            if not matches:
                raise DataError(f"{text}: the glob matches no files; check the pattern and the working directory")
            files.extend(matches)
            continue
        raise DataError(f"{text}: no such file")
    if not files:
        raise DataError("no input files given; pass text or JSONL files (paths or globs)")
    return files


def file_format(path: Path, fmt: Format = "auto") -> Literal["text", "jsonl"]:
    """`text` or `jsonl`; with "auto", .jsonl/.ndjson files are JSONL and everything else is text."""
    if fmt not in ("auto", "text", "jsonl"):
        raise ConfigError(f"unknown input format {fmt!r}: use 'auto', 'text' or 'jsonl'")
    if fmt != "auto":
        return fmt
    return "jsonl" if path.suffix.lower() in JSONL_SUFFIXES else "text"


def iter_pieces(
    files: Iterable[Path],
    *,
    field: str = "text",
    fmt: Format = "auto",
    errors: Errors = "strict",
    piece_chars: int = PIECE_CHARS,
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[tuple[str, bool]]:
    """Yield `(piece, last)` for every document of every file, in order; `last` ends a document.

    errors: "strict" makes a non-UTF-8 byte a DataError with file and byte offset; "replace"
    decodes it as U+FFFD. on_bytes(n) is called as input bytes are consumed (for progress bars).
    """
    if errors not in ("strict", "replace"):
        raise ConfigError(f"unknown errors mode {errors!r}: use 'strict' (fail on bad UTF-8) or 'replace' (U+FFFD)")
    if piece_chars < 16:
        raise ConfigError(f"piece_chars={piece_chars} is too small; use at least 16")
    for path in files:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty; remove it from the inputs")
        if file_format(path, fmt) == "jsonl":
            yield from _jsonl_pieces(path, field, errors, piece_chars, on_bytes)
        else:
            yield from _text_pieces(path, errors, piece_chars, on_bytes)


def split_text(text: str, piece_chars: int = PIECE_CHARS) -> Iterator[str]:
    """Cut an in-memory text into pieces at safe points (see the module docstring)."""
    start = 0
    while len(text) - start > piece_chars:
        cut = _safe_cut(text, start, start + piece_chars, hard=True)
        yield text[start:cut]
        start = cut
    yield text[start:]


def _safe_cut(text: str, start: int, target: int, hard: bool) -> int:
    """A safe cut index in (start, len(text)) near `target`; -1 when more text is needed first.

    Looks back to the middle of the piece, then ahead up to _LOOK_AHEAD pieces, then back to the
    start; with no safe point at all the cut is made at `target` (see _LOOK_AHEAD).
    """
    lo = start + (target - start) // 2
    nl = _rfind_match(text, "\n", _CUT_AFTER_NEWLINE, lo, target)
    best = max(nl + 1 if nl >= 0 else -1, _rfind_match(text, " ", _CUT_BEFORE_SPACE, lo, target))
    if best > start:
        return best
    window_end = target + _LOOK_AHEAD * (target - start)
    limit = min(len(text), window_end)
    ahead = [m.start() + (m.group() == "\n") for m in (_CUT_AFTER_NEWLINE.search(text, target, limit),
                                                       _CUT_BEFORE_SPACE.search(text, target, limit)) if m]
    if ahead:
        return min(ahead)
    if hard or limit == window_end:
        nl = _rfind_match(text, "\n", _CUT_AFTER_NEWLINE, start + 1, lo)
        best = max(nl + 1 if nl >= 0 else -1, _rfind_match(text, " ", _CUT_BEFORE_SPACE, start + 1, lo))
        return best if best > start else target
    return -1


def _rfind_match(text: str, char: str, pattern: re.Pattern, lo: int, hi: int) -> int:
    """The last index i in [lo, hi) where `pattern` matches, scanning back from one `char` to the next."""
    i = text.rfind(char, lo, hi)
    while i >= lo:
        if pattern.match(text, i):
            return i
        i = text.rfind(char, lo, i)
    return -1


def _decode_error(path: Path, offset: int, e: UnicodeDecodeError, line: int | None = None) -> DataError:
    where = f"{path}:{line}" if line is not None else str(path)
    bad = e.object[e.start:e.end]
    return DataError(
        f"{where}: invalid UTF-8 at byte offset {offset} (bytes {bad.hex(' ')}: {e.reason}); "
        f"convert the file to UTF-8, or decode with replacement (errors='replace', --encoding-errors replace)"
    )


def _text_pieces(
    path: Path, errors: Errors, piece_chars: int, on_bytes: Callable[[int], None] | None,
) -> Iterator[tuple[str, bool]]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
    consumed = 0  # bytes handed to the decoder so far
    buf = ""
    with open(path, "rb") as f:
        while True:
            block = f.read(_READ_BYTES)
            final = not block
            pending = len(decoder.getstate()[0])
            try:
                buf += decoder.decode(block, final=final)
            except UnicodeDecodeError as e:  # e.start counts from the start of pending + block
                raise _decode_error(path, consumed - pending + e.start, e) from None
            consumed += len(block)
            if on_bytes and block:
                on_bytes(len(block))
            start = 0
            while len(buf) - start >= 2 * piece_chars or (final and len(buf) - start > piece_chars):
                cut = _safe_cut(buf, start, start + piece_chars, hard=final)
                if cut < 0:
                    break
                yield buf[start:cut], False
                start = cut
            buf = buf[start:]
            if final:
                yield buf, True
                return


def _jsonl_pieces(
    path: Path, field: str, errors: Errors, piece_chars: int, on_bytes: Callable[[int], None] | None,
) -> Iterator[tuple[str, bool]]:
    records = 0
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line_offset = offset
            offset += len(raw)
            if on_bytes:
                on_bytes(len(raw))
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, line_offset = raw[3:], line_offset + 3
            try:
                line = raw.decode("utf-8", errors=errors)
            except UnicodeDecodeError as e:
                raise _decode_error(path, line_offset + e.start, e, lineno) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                                f"each line of a JSONL file must be one JSON object") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object with a {field!r} field, "
                                f"got {type(record).__name__}")
            if field not in record:
                keys = ", ".join(map(repr, list(record)[:8])) or "none"
                raise DataError(f"{path}:{lineno}: the record has no {field!r} field (fields: {keys}); "
                                f"choose the text field with field=... / --field")
            text = record[field]
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field {field!r} is {type(text).__name__}, not a string")
            records += 1
            pieces = list(split_text(text, piece_chars)) if len(text) > piece_chars else [text]
            for i, piece in enumerate(pieces):
                yield piece, i == len(pieces) - 1
    if records == 0:
        raise DataError(f"{path}: no JSON records (only blank lines); remove it from the inputs")


def iter_source(
    source: TextSource, *, field: str = "text", errors: Errors = "strict", show_progress: bool = False,
) -> Iterator[tuple[str, bool]]:
    """Pieces of a training source: a str is the text itself; os.PathLike items (paths, or globs
    given as Path) are files; a list may mix both. A str naming an existing file (or a glob with a
    folder, like 'data/*.txt', that matches files) is an error: almost certainly a forgotten Path()."""
    if isinstance(source, str):
        looks_like_glob = "/" in source and glob.has_magic(source) and glob.glob(source)
        if len(source) < 4096 and "\n" not in source and (os.path.isfile(source) or looks_like_glob):
            raise ConfigError(f"{source!r} looks like a file name, but a str is the training text itself; pass Path({source!r})")
        yield source, True
        return
    items = [source] if isinstance(source, os.PathLike) else list(source)
    texts = [s for s in items if isinstance(s, str)]
    paths = [s for s in items if isinstance(s, os.PathLike)]
    for text in texts:
        yield text, True
    if paths:
        from tqdm.auto import tqdm

        files = expand_files(paths)
        with tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc="reading",
                  disable=not show_progress) as bar:
            yield from iter_pieces(files, field=field, errors=errors, on_bytes=bar.update)
