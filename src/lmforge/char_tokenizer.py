"""A character-level tokenizer, as nanoGPT's shakespeare_char: one id per character of the corpus.

Same interface as lmforge.Tokenizer (encode, decode, batch calls, save/from_pretrained); saved as
lmforge_tokenizer.json, which Tokenizer.from_pretrained also recognises.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from lmforge._io import write_json_atomic
from lmforge.corpus import Errors, TextSource, iter_source
from lmforge.errors import ConfigError, DataError
from lmforge.tokenizer_base import CHAR_FILE, EOS, ROLES, TokenizerBase, resolve_tokenizer_path


class CharTokenizer(TokenizerBase):
    """One id per character, the vocabulary being the sorted characters of a training corpus (as
    nanoGPT's shakespeare_char), followed by the special tokens (<|endoftext|> by default)."""

    def __init__(
        self,
        chars: Iterable[str],
        special_tokens: Sequence[str] = (EOS,),
        *,
        eos_token: str | None = EOS,
        bos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
    ) -> None:
        chars = sorted(set(chars))
        if any(len(c) != 1 for c in chars):
            raise ConfigError("a character tokenizer's vocabulary must be single characters")
        self.special_tokens_list = list(dict.fromkeys(special_tokens))
        self._itos = chars + self.special_tokens_list
        self._stoi = {s: i for i, s in enumerate(self._itos)}
        self._codepoints = np.array([ord(c) for c in chars], dtype=np.uint32)
        self._special_re = (re.compile("|".join(re.escape(t) for t in sorted(self.special_tokens_list, key=len, reverse=True)))
                            if self.special_tokens_list else None)
        self.eos_token = eos_token if eos_token in self.special_tokens_list else None
        self.bos_token = bos_token if bos_token is not None else self.eos_token
        self.pad_token, self.unk_token = pad_token, unk_token
        for role in ROLES:
            token = getattr(self, role)
            if token is not None and token not in self.special_tokens_list:
                raise ConfigError(f"{role} {token!r} is not one of the special tokens {self.special_tokens_list}")

    @classmethod
    def train(
        cls,
        source: TextSource,
        *,
        special_tokens: Sequence[str] = (EOS,),
        eos_token: str | None = EOS,
        pad_token: str | None = None,
        field: str = "text",
        errors: Errors = "strict",
        show_progress: bool = False,
    ) -> CharTokenizer:
        """Vocabulary = the characters of `source` (a str is the text itself; Paths are files)."""
        chars: set[str] = set()
        for piece, _ in iter_source(source, field=field, errors=errors, show_progress=show_progress):
            chars.update(piece)
        if not chars:
            raise DataError("no characters to build a vocabulary from: the training text is empty")
        specials = list(dict.fromkeys([*special_tokens, *(t for t in (eos_token, pad_token) if t)]))
        return cls(chars, specials, eos_token=eos_token, pad_token=pad_token)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, revision: str | None = None) -> CharTokenizer:
        """Load lmforge_tokenizer.json from a directory (or the file itself)."""
        path = resolve_tokenizer_path(path, revision)
        file = path if path.is_file() else path / CHAR_FILE
        if not file.is_file():
            raise DataError(f"{path}: no {CHAR_FILE}; save a character tokenizer there with save_pretrained")
        try:
            spec = json.loads(file.read_text(encoding="utf-8"))
            if spec.get("type") != "char":
                raise ValueError(f"type is {spec.get('type')!r}, not 'char'")
            return cls(spec["chars"], spec["special_tokens"], **{r: spec.get(r) for r in ROLES})
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{file}: not a valid character tokenizer file ({e}); save it again") from None

    def encode_batch(self, texts: Sequence[str], split_special_tokens: bool = False,
                     add_special_tokens: bool = True) -> list[list[int]]:
        """Ids of each text (a character tokenizer adds no special tokens around a text)."""
        if isinstance(texts, str):
            raise ConfigError("encode_batch takes a list of strings; use encode for one string")
        return [self.encode_array(t, split_special_tokens).tolist() for t in texts]

    def encode_array(self, text: str, split_special_tokens: bool = False) -> np.ndarray:
        """Ids as an int64 array (vectorised: the fast path for large texts)."""
        if self._special_re is None or split_special_tokens or not self._special_re.search(text):
            return self._encode_chars(text)
        parts, start = [], 0
        for m in self._special_re.finditer(text):
            parts += [self._encode_chars(text[start:m.start()]), np.array([self._stoi[m.group()]], dtype=np.int64)]
            start = m.end()
        parts.append(self._encode_chars(text[start:]))
        return np.concatenate(parts)

    def _encode_chars(self, text: str) -> np.ndarray:
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        idx = np.searchsorted(self._codepoints, cps)
        ok = idx < len(self._codepoints)
        ok[ok] = self._codepoints[idx[ok]] == cps[ok]
        if not ok.all():
            unknown = sorted({chr(c) for c in cps[~ok][:1000]})
            raise DataError(f"characters not in the vocabulary: {unknown[:10]!r} (first at position {int(np.argmin(ok))}); "
                            f"a character tokenizer only encodes the characters it was trained on; retrain it on this text")
        return idx.astype(np.int64)

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        ids = self._check_ids(ids)
        n_chars = len(self._codepoints)
        if skip_special_tokens:
            ids = [i for i in ids if i < n_chars]
        return "".join([self._itos[i] for i in ids])

    def token_to_id(self, token: str) -> int | None:
        return self._stoi.get(token)

    def id_to_token(self, id: int) -> str | None:
        return self._itos[id] if 0 <= id < len(self._itos) else None

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    @property
    def chars(self) -> list[str]:
        return self._itos[:len(self._codepoints)]

    @property
    def special_tokens(self) -> list[str]:
        return list(self.special_tokens_list)

    @property
    def fingerprint(self) -> str:
        blob = json.dumps({"chars": self.chars, "specials": self.special_tokens_list}, ensure_ascii=False).encode("utf-8", "surrogatepass")
        return "char-" + hashlib.sha256(blob).hexdigest()[:32]

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        spec = {"type": "char", "version": 1, "chars": self.chars, "special_tokens": self.special_tokens_list,
                **self._special_config()}
        write_json_atomic(directory / CHAR_FILE, spec)
        return directory
