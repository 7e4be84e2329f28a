"""Prefix reuse for the serving engine: the keys/values of recent prompts, kept so that a new prompt that
starts with the same tokens (a system prompt, few-shot examples, the chat so far) copies them instead of
computing them again.

An entry is a prompt's token ids and its one-row KVCache, holding exactly those positions (the cache
the engine prefilled it into, kept as it is: no extra compute, no copy). Keys/values at position i
depend only on tokens 0..i and positions count from 0, so a shared prefix's keys/values are the same in
any prompt that starts with it (RoPE and learned positions alike; a sliding window only masks, the
cache holds every key). The cache is bounded by the tokens it holds, least recently used out first.
"""

from __future__ import annotations

from collections import OrderedDict

from lmforge.model import KVCache


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    """Prompts' keys/values, at most `max_tokens` positions in all (LRU eviction). Not thread-safe: the
    engine thread alone uses it.

    A match is reused when it covers at least `min_match` tokens, or the whole prompt but its last token
    (the last prompt token is always computed: its logits choose the first new token)."""

    def __init__(self, max_tokens: int, min_match: int = 16) -> None:
        self.max_tokens = max_tokens
        self.min_match = min_match
        self._entries: OrderedDict[tuple[int, ...], KVCache] = OrderedDict()  # oldest use first
        self.tokens = 0  # positions held, the sum of the entries' lengths

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[tuple[tuple[int, ...], KVCache]]:
        """(token ids, cache) of each entry, least recently used first (for tests and inspection)."""
        return list(self._entries.items())

    def fill(self, prompt: list[int], cache: KVCache) -> int:
        """Copy the longest cached prefix of `prompt` (never its last token) into the empty one-row
        `cache` and set its length; return the positions copied (0: no usable match)."""
        usable = len(prompt) - 1
        best, best_key = 0, None
        for key in self._entries:
            n = min(_common_prefix(key, prompt), usable)
            if n > best:
                best, best_key = n, key
        if best_key is None or best < min(self.min_match, usable):
            return 0
        source = self._entries[best_key]
        self._entries.move_to_end(best_key)
        cache.k[:, 0, :, :best] = source.k[:, 0, :, :best]
        cache.v[:, 0, :, :best] = source.v[:, 0, :, :best]
        cache.length = best
        return best

    def add(self, prompt: list[int], cache: KVCache) -> None:
        """Keep a fully prefilled prompt (cache row 0 holds its len(prompt) positions; the cache must not
        change afterwards). Entries it extends are dropped; if an entry already covers it, that one is
        marked as used instead."""
        key = tuple(prompt)
        if not key or len(key) > self.max_tokens or cache.length != len(key):
            return
        for other in list(self._entries):
            if len(other) >= len(key) and other[: len(key)] == key:
                self._entries.move_to_end(other)
                return
            if other == key[: len(other)]:
                self._remove(other)
        self._entries[key] = cache
        self.tokens += len(key)
        while self.tokens > self.max_tokens:
            self._remove(next(iter(self._entries)))

    def clear(self) -> None:
        self._entries.clear()
        self.tokens = 0

    def _remove(self, key: tuple[int, ...]) -> None:
        del self._entries[key]
        self.tokens -= len(key)
