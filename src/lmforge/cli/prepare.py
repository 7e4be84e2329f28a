"""`lmforge prepare --data FILES_OR_GLOB --tokenizer PATH --out DIR`: text / JSONL -> token files."""

from __future__ import annotations

import argparse
import inspect
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmforge.data import prepare

    defaults = {k: p.default for k, p in inspect.signature(prepare).parameters.items()}
    p = subparsers.add_parser(
        "prepare", help="tokenize text / JSONL into memory-mapped train/val token files",
        description="Tokenize plain text and JSONL files into memory-mapped binary token files (uint16 or "
                    "uint32) with a JSON header and a copy of the tokenizer; documents end with the eos token; "
                    "the last --val-fraction of the tokens is the validation split.",
    )
    p.add_argument("--data", nargs="+", required=True, metavar="FILE_OR_GLOB",
                   help="input files or globs (quote globs: 'data/*.txt'); .jsonl/.ndjson are JSONL, the rest text")
    p.add_argument("--tokenizer", required=True, metavar="PATH",
                   help="tokenizer or model directory, Hub name, or 'byte-level' (256 bytes + <|endoftext|>)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--val-fraction", type=float, default=defaults["val_fraction"],
                   help="fraction of tokens for the val split (default: %(default)s)")
    p.add_argument("--field", default=defaults["field"], help="JSONL field holding the text (default: %(default)s)")
    p.add_argument("--format", dest="fmt", choices=["auto", "text", "jsonl"], default=defaults["fmt"],
                   help="input format (default: %(default)s, by file extension)")
    p.add_argument("--encoding-errors", dest="errors", choices=["strict", "replace"], default=defaults["errors"],
                   help="non-UTF-8 bytes: fail naming file and offset (strict), or decode as U+FFFD (replace)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def load_tokenizer(spec: str):
    """A tokenizer from a CLI argument: 'byte-level', or anything Tokenizer.from_pretrained takes."""
    from pathlib import Path

    from lmforge.tokenizer import Tokenizer

    if spec == "byte-level" and not Path(spec).exists():
        return Tokenizer.byte_level()
    return Tokenizer.from_pretrained(spec)


def run(args: argparse.Namespace) -> int:
    from lmforge.data import prepare

    tokenizer = load_tokenizer(args.tokenizer)
    t0 = time.perf_counter()
    header = prepare(args.data, tokenizer, args.out, val_fraction=args.val_fraction, field=args.field,
                     fmt=args.fmt, errors=args.errors, show_progress=not args.quiet)
    seconds = time.perf_counter() - t0
    mb = header["text_bytes"] / 1e6
    print(f"wrote {args.out}: {header['tokens']:,} tokens ({header['dtype']}) from {header['documents']:,} documents, "
          f"{mb:.1f} MB of text in {seconds:.1f} s ({mb / max(seconds, 1e-9):.1f} MB/s)")
    for name, split in header["splits"].items():
        print(f"  {name}: {split['tokens']:,} tokens, {split['documents']:,} documents -> {split['file']}")
    if header["split_inside_document"]:
        print("  (the train/val cut falls inside a document)")
    return 0
