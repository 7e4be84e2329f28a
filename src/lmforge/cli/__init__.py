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


# What a user's input or machine can cause, as opposed to a bug in lmforge: one line and exit code 2,
# no traceback (LMFORGE_DEBUG=1 shows it). OSError covers missing files, permissions, a directory
# where a file is expected, a full disk; UnicodeError text that is not UTF-8; OverflowError and
# MemoryError numbers and sizes too large for the machine.
EXPECTED_ERRORS = (LmforgeError, ValueError, OSError, UnicodeError, OverflowError, MemoryError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `lmforge info DIR | head`: the reader has gone, nothing to say
        _drop_stdout()
        return 141  # as a process killed by SIGPIPE
    except EXPECTED_ERRORS as e:
        if os.environ.get("LMFORGE_DEBUG"):
            raise
        print(f"lmforge {args.command}: error: {error_line(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # torch reports running out of memory as a RuntimeError
        if not out_of_memory(e) or os.environ.get("LMFORGE_DEBUG"):
            raise
        print(f"lmforge {args.command}: error: {error_line(MemoryError(str(e).splitlines()[0]))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmforge {args.command}: interrupted", file=sys.stderr)
        return 130


def out_of_memory(e: BaseException) -> bool:
    """Whether torch ran out of memory (CUDA's OutOfMemoryError, the CPU allocator's RuntimeError)."""
    return type(e).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(e)


def error_line(e: BaseException) -> str:
    """The one line the CLI prints for an expected error."""
    if isinstance(e, MemoryError):
        text = f"out of memory{f' ({e})' if str(e) else ''}; use smaller inputs, a smaller batch or model, or more memory"
    elif isinstance(e, OSError) and not isinstance(e, LmforgeError) and e.strerror:
        # "[Errno 28] No space left on device: 'x'" -> "No space left on device: x"
        names = [str(n) for n in (e.filename, e.filename2) if n is not None]
        text = f"{e.strerror}: {' -> '.join(names)}" if names else e.strerror
    else:
        text = str(e)
    return " ".join(text.split()) or type(e).__name__


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush at exit finds no broken pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a file descriptor (captured in tests)
        pass
