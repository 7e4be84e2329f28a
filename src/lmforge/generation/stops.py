"""Stop strings: one search and one hold-back rule, for generate() and for the server.

A stop string counts once it appears in the decoded text and reaches into the newest text (what the
newest token added): earlier text was searched at earlier steps. generate() searches the decoded
ids, prompt included, stops at that token and keeps the string (transformers' StopStringCriteria).
The server searches the completion's text (generation/stream.py's TextStream), cuts the text before
the string and, while streaming, holds back any end of the text that could still begin one (OpenAI's).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


def find_stop(text: str, stops: Sequence[str], new_from: int) -> int:
    """Where the earliest stop string in `text` that ends after index `new_from` begins, or -1."""
    hits = (text.find(s, max(0, new_from - len(s) + 1)) for s in stops)
    return min((i for i in hits if i != -1), default=-1)


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that could begin a stop string (not yet safe to show)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


class StopStrings:
    """Which rows of a batch of token ids end with a stop string (checked on decoded text instead of
    transformers' vocabulary tables; the same stopping points)."""

    def __init__(self, strings: list[str], tokenizer: Any) -> None:
        if tokenizer is None or not hasattr(tokenizer, "decode"):
            raise ValueError("stop_strings needs a tokenizer: pass tokenizer=... to generate")
        self.strings = strings
        self.tokenizer = tokenizer
        # Enough trailing tokens to spell the longest stop string (a token is at least one byte).
        self.window = 4 * max(len(s) for s in strings) + 2

    def hits(self, sequences: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) bool: which rows of `sequences` (N, length) end with a stop string."""
        out = torch.zeros(sequences.size(0), dtype=torch.bool)
        tails = sequences[:, -self.window:].tolist()
        check = [True] * len(tails) if rows is None else rows.tolist()
        for i, (tail, wanted) in enumerate(zip(tails, check)):
            if not wanted:
                continue
            text = self.tokenizer.decode(tail)
            # Text before the newest token; an incomplete character there (U+FFFD) is what it completes.
            before = len(self.tokenizer.decode(tail[:-1]).rstrip("\ufffd"))
            out[i] = find_stop(text, self.strings, before) != -1
        return out.to(sequences.device)
