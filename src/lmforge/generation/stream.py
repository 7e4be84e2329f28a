"""Streaming: tokens as they are produced, and text pieces that never split a UTF-8 character.

Byte-level BPE can spread one character over several tokens (each holding part of its UTF-8 bytes);
decoding such a token alone gives U+FFFD. IncrementalDecoder holds text back until the bytes
complete a character, so the pieces concatenate to exactly decode(all ids). TextStream adds stop
strings on top, as a server streams them: cut out, and never half shown.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch

from lmforge.generation.config import GenerationConfig
from lmforge.generation.decode import DecodeStep, Decoder
from lmforge.generation.request import resolve_config
from lmforge.generation.stops import find_stop, held_back

_REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Turn a growing token sequence into new text pieces, with any object that has `decode(ids)`.

    Decodes a short window (from the start of the previous piece) rather than everything so far,
    so each push costs O(piece), and tokenizers whose decode depends on the left context (leading
    spaces) still give the right text.
    """

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = False) -> None:
        if not hasattr(tokenizer, "decode"):
            raise TypeError(f"IncrementalDecoder needs an object with decode(ids), got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window: the beginning of the last emitted piece
        self.read_offset = 0  # tokens before this are already emitted

    def _decode(self, ids: list[int]) -> str | None:
        try:
            if self.skip_special_tokens:
                return self.tokenizer.decode(ids, skip_special_tokens=True)
            return self.tokenizer.decode(ids)
        except UnicodeDecodeError:  # a strict decoder on incomplete bytes: not ready yet
            return None

    def push(self, ids: int | Sequence[int] | torch.Tensor) -> str:
        """Add token id(s); return the text they complete ("" while a character is still incomplete)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        self.ids.extend([ids] if isinstance(ids, int) else list(ids))
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if before is None or text is None or len(text) <= len(before) or text.endswith(_REPLACEMENT):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(before):]

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end comes out as U+FFFD)."""
        before = self._decode(self.ids[self.prefix_offset:self.read_offset]) or ""
        text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        if text is None:  # a strict decoder refuses the incomplete character
            return _REPLACEMENT
        return text[len(before):]


class TextStream:
    """The text of one sequence for a client, piece by piece: pieces never split a character, a stop
    string ends the text and is left out (OpenAI's semantics), and an end of the text that could
    begin a stop string is held back until it is known not to."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), *, skip_special_tokens: bool = True) -> None:
        self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
        self.stop = list(stop)
        self.text = ""
        self.sent = 0  # characters of text already handed out

    def push(self, token: int) -> tuple[str, bool]:
        """Add a generated token; return (the text now safe to show, whether a stop string ended it)."""
        new_from = len(self.text)
        self.text += self.decoder.push(token)
        return self._release(new_from, final=False)

    def finish(self) -> tuple[str, bool]:
        """Generation ended (eos, length): the rest of the text, up to a stop string its tail completes."""
        new_from = len(self.text)
        self.text += self.decoder.flush()
        return self._release(new_from, final=True)

    def _release(self, new_from: int, final: bool) -> tuple[str, bool]:
        hit = find_stop(self.text, self.stop, new_from) if self.stop else -1
        if hit != -1:
            end = hit
        else:
            end = len(self.text) - (0 if final else held_back(self.text, self.stop))
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        return piece, hit != -1


def stream(
    model: torch.nn.Module, input_ids: Any, attention_mask: Any = None, generation_config: GenerationConfig | None = None,
    *, tokenizer: Any = None, **options: Any,
) -> Iterator[DecodeStep]:
    """Greedy or sampling decoding, one DecodeStep (tokens (B,), finished (B,)) per new token.
    The steps are the tokens `generate` would return with the same options and seed."""
    config = resolve_config(model, generation_config, **options)
    if config.is_beam_search:
        raise ValueError("streaming supports greedy and sampling decoding, not num_beams > 1: "
                         "beam search only knows its best sequence at the end")
    return iter(Decoder(model, input_ids, attention_mask, config, tokenizer=tokenizer))


def stream_text(
    model: torch.nn.Module, tokenizer: Any, prompt: str | Sequence[int], generation_config: GenerationConfig | None = None,
    *, skip_special_tokens: bool = False, **options: Any,
) -> Iterator[str]:
    """Text pieces of one continuation of `prompt` (a string, encoded with `tokenizer`, or ids), as
    they are generated. The token that ends generation (eos) is not part of the text."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    config = resolve_config(model, generation_config, **options)
    if config.num_return_sequences != 1:
        raise ValueError("stream_text streams one sequence: num_return_sequences must be 1; "
                         "use stream() with an IncrementalDecoder per row for several")
    eos = set(config.eos_token_id or ())
    text = IncrementalDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
    for step in stream(model, [ids], None, config, tokenizer=tokenizer):
        token = int(step.tokens[0])
        if token in eos and bool(step.finished[0]):
            break
        piece = text.push(token)
        if piece:
            yield piece
        if bool(step.finished[0]):
            break
    rest = text.flush()
    if rest:
        yield rest
