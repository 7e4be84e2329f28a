"""`lmforge train-tokenizer --data FILES --vocab-size N --out DIR [--char]`: train and save a tokenizer."""

from __future__ import annotations

import argparse
import inspect


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmforge.tokenizer import Tokenizer

    defaults = {k: p.default for k, p in inspect.signature(Tokenizer.train).parameters.items()}
    p = subparsers.add_parser(
        "train-tokenizer", help="train a byte-level BPE (or character) tokenizer on text / JSONL",
        description="Train a GPT-2-style byte-level BPE tokenizer (or, with --char, a character-level one) and save "
                    "it to DIR in the formats lmforge and transformers' GPT2TokenizerFast load.",
    )
    p.add_argument("--data", nargs="+", required=True, metavar="FILE_OR_GLOB",
                   help="training files or globs (quote globs); .jsonl/.ndjson are JSONL, the rest text")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to save the tokenizer in")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="number of ids, 256 bytes and special tokens included (required for BPE)")
    p.add_argument("--char", action="store_true", help="character-level vocabulary (the corpus' characters)")
    p.add_argument("--special-tokens", nargs="*", default=list(defaults["special_tokens"]), metavar="TOKEN",
                   help="special tokens (default: %(default)s); the first named <|endoftext|> or the first one is eos")
    p.add_argument("--pad-token", default=defaults["pad_token"], help="a padding token to add (default: none)")
    p.add_argument("--min-frequency", type=int, default=defaults["min_frequency"],
                   help="minimum pair count for a BPE merge (default: %(default)s)")
    p.add_argument("--field", default=defaults["field"], help="JSONL field holding the text (default: %(default)s)")
    p.add_argument("--encoding-errors", dest="errors", choices=["strict", "replace"], default=defaults["errors"],
                   help="non-UTF-8 bytes: fail naming file and offset (strict), or decode as U+FFFD (replace)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lmforge.corpus import expand_files
    from lmforge.errors import ConfigError
    from lmforge.char_tokenizer import CharTokenizer
    from lmforge.tokenizer import EOS, Tokenizer

    from lmforge._io import check_writable

    check_writable(Path(args.out) / "tokenizer.json", ConfigError, "--out")  # before training, not after
    files = expand_files(args.data)
    specials = args.special_tokens
    eos = EOS if EOS in specials else (specials[0] if specials else None)
    common = dict(special_tokens=specials, eos_token=eos, pad_token=args.pad_token, field=args.field,
                  errors=args.errors, show_progress=not args.quiet)
    if args.char:
        if args.vocab_size is not None:
            raise ConfigError("--vocab-size does not apply to --char: the vocabulary is the corpus' characters")
        tok = CharTokenizer.train([Path(f) for f in files], **common)
    else:
        if args.vocab_size is None:
            raise ConfigError("--vocab-size is required for a BPE tokenizer (e.g. --vocab-size 8192), or pass --char")
        tok = Tokenizer.train([Path(f) for f in files], args.vocab_size, min_frequency=args.min_frequency, **common)
    tok.save_pretrained(args.out)
    kind = "character" if args.char else "byte-level BPE"
    print(f"saved a {kind} tokenizer to {args.out}: vocab_size {tok.vocab_size}, eos {tok.eos_token!r} "
          f"(id {tok.eos_token_id}), trained on {len(files)} file(s)")
    if not args.char and tok.vocab_size < args.vocab_size:
        print(f"  note: the corpus supports only {tok.vocab_size} of the {args.vocab_size} ids asked for "
              f"(no more pairs with count >= {args.min_frequency})")
    return 0
