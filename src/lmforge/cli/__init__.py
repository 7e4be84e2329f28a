"""The `lmforge` command line. One small module per command; each parses flags and calls the API.

Every command module has `register(subparsers)`, which adds its parser and sets `func(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from lmforge.errors import LmforgeError

# Command modules, in the order `lmforge --help` lists them.
COMMAND_MODULES = [
    "lmforge.cli.info",
    "lmforge.cli.tokenizer",
    "lmforge.cli.prepare",
    "lmforge.cli.pretrain",
    "lmforge.cli.finetune",
    "lmforge.cli.lora",
    "lmforge.cli.generate",
    "lmforge.cli.run",
    "lmforge.cli.evaluate",
    "lmforge.cli.serve",
]


def build_parser() -> argparse.ArgumentParser:
    from lmforge import __version__

    parser = argparse.ArgumentParser(
        prog="lmforge",
        description="Transformer language models from the equations up: load, train, generate, evaluate, serve.",
    )
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (LmforgeError, ValueError, FileNotFoundError) as e:
        if os.environ.get("LMFORGE_DEBUG"):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"lmforge {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmforge {args.command}: interrupted", file=sys.stderr)
        return 130
