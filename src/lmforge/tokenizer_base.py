"""What every lmforge tokenizer shares: TokenizerBase's interface (encode, decode, batch calls with
padding and attention masks, special token ids, chat templates, save/from_pretrained), the file names,
and where a tokenizer path or Hub name resolves to. Tokenizer (tokenizer.py) and CharTokenizer
(char_tokenizer.py) build on it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from lmforge.chat_template import end_of_turn_tokens, render_chat_template, select_chat_template
from lmforge.errors import CheckpointError, ConfigError, DataError

EOS = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
CHAR_FILE = "lmforge_tokenizer.json"
ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")


class BatchEncoding(dict):
    """The result of `tokenizer(texts, ...)`: a dict ("input_ids", "attention_mask") with attribute access."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: Any) -> BatchEncoding:
        """Move tensor values to `device` (as transformers' BatchEncoding.to)."""
        return BatchEncoding({k: v.to(device) if hasattr(v, "to") else v for k, v in self.items()})


class TokenizerBase:
    """What every lmforge tokenizer offers; subclasses implement the vocabulary-specific parts."""

    bos_token: str | None = None
    eos_token: str | None = None
    unk_token: str | None = None
    pad_token: str | None = None
    model_max_length: int | None = None
    padding_side: Literal["left", "right"] = "right"
    chat_template: str | dict[str, str] | None = None  # Jinja source, or several by name ("default", "tool_use")

    # ---- implemented by subclasses
    def encode_batch(self, texts: Sequence[str], split_special_tokens: bool = False,
                     add_special_tokens: bool = True) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def id_to_token(self, id: int) -> str | None:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        """The number of ids, special tokens included (the model's embedding rows)."""
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        """A hash of everything that decides the ids; equal fingerprints encode text identically."""
        raise NotImplementedError

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        raise NotImplementedError

    # ---- shared
    def encode(self, text: str, split_special_tokens: bool = False, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special-token strings in the text (e.g. "<|endoftext|>") become their
        special ids, as in transformers; split_special_tokens=True encodes them as plain text.
        add_special_tokens: the ids the tokenizer puts around every text (Llama's bos), as transformers
        does; GPT-2's byte-level BPE adds none."""
        return self.encode_batch([text], split_special_tokens, add_special_tokens)[0]

    # The id of each special-token role (None when the role is unset).
    eos_token_id = property(lambda self: self._role_id(self.eos_token))
    bos_token_id = property(lambda self: self._role_id(self.bos_token))
    pad_token_id = property(lambda self: self._role_id(self.pad_token))
    unk_token_id = property(lambda self: self._role_id(self.unk_token))

    @property
    def special_tokens(self) -> list[str]:
        raise NotImplementedError

    @property
    def all_special_ids(self) -> list[int]:
        return [self.token_to_id(t) for t in self.special_tokens]

    def _role_id(self, token: str | None) -> int | None:
        return None if token is None else self.token_to_id(token)

    def __len__(self) -> int:
        return self.vocab_size

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        """Decode each row of a 2-D tensor / array or each list in a list of id lists."""
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(ids, skip_special_tokens) for ids in sequences]

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        padding: bool | Literal["longest", "max_length", "do_not_pad"] = False,
        padding_side: Literal["left", "right"] | None = None,
        truncation: bool = False,
        max_length: int | None = None,
        truncation_side: Literal["left", "right"] = "right",
        return_tensors: Literal["pt", "np"] | None = None,
        return_attention_mask: bool = True,
        split_special_tokens: bool = False,
        add_special_tokens: bool = True,
    ) -> BatchEncoding:
        """Encode one text or a batch, as transformers' tokenizer call: "input_ids" and "attention_mask".

        padding=True pads to the longest row, "max_length" to max_length; rows are padded with
        pad_token_id, or eos_token_id when no pad token is set (the mask marks them as padding).
        truncation=True cuts rows to max_length (or model_max_length) on truncation_side.
        return_tensors="pt" gives int64 torch tensors, "np" int64 arrays, None lists.
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise ConfigError("the tokenizer takes a string or a list of strings")
        side = padding_side or self.padding_side
        if side not in ("left", "right") or truncation_side not in ("left", "right"):
            raise ConfigError(f"padding_side and truncation_side must be 'left' or 'right', got {side!r}, {truncation_side!r}")
        rows = self.encode_batch(texts, split_special_tokens, add_special_tokens)
        if truncation:
            limit = max_length if max_length is not None else self.model_max_length
            if limit is None:
                raise ConfigError("truncation=True needs max_length (this tokenizer has no model_max_length)")
            rows = [r[:limit] if truncation_side == "right" else r[max(0, len(r) - limit):] for r in rows]
        if padding is True or padding == "longest":
            width = max((len(r) for r in rows), default=0)
        elif padding == "max_length":
            if max_length is None:
                raise ConfigError("padding='max_length' needs max_length")
            width = max_length
        elif padding in (False, None, "do_not_pad"):
            width = None
        else:
            raise ConfigError(f"unknown padding {padding!r}: use True, 'longest', 'max_length' or False")
        masks = [[1] * len(r) for r in rows]
        if width is not None:
            pad_id = self.pad_token_id if self.pad_token_id is not None else (self.eos_token_id or 0)
            for i, r in enumerate(rows):
                n = max(0, width - len(r))
                if side == "right":
                    rows[i], masks[i] = r + [pad_id] * n, masks[i] + [0] * n
                else:
                    rows[i], masks[i] = [pad_id] * n + r, [0] * n + masks[i]
        out: dict[str, Any] = {"input_ids": rows}
        if return_attention_mask:
            out["attention_mask"] = masks
        if return_tensors is not None:
            if len({len(r) for r in rows}) > 1:
                raise ConfigError("rows have different lengths; pass padding=True to return tensors")
            shape = (len(rows), len(rows[0]) if rows else 0)  # an empty batch is (0, 0)
            if return_tensors == "pt":
                import torch

                out = {k: torch.tensor(v, dtype=torch.long).reshape(shape) for k, v in out.items()}
            elif return_tensors == "np":
                out = {k: np.asarray(v, dtype=np.int64).reshape(shape) for k, v in out.items()}
            else:
                raise ConfigError(f"unknown return_tensors {return_tensors!r}: use 'pt', 'np' or None")
        elif single:
            out = {k: v[0] for k, v in out.items()}
        return BatchEncoding(out)

    # ---- chat templates
    def apply_chat_template(
        self,
        conversation: Sequence[Any],
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tokenize: bool = True,
        padding: bool | Literal["longest", "max_length", "do_not_pad"] = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: Literal["pt", "np"] | None = None,
        return_dict: bool = True,
        tokenizer_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Render messages ([{"role": ..., "content": ...}], or a list of such conversations) with the
        chat template, as transformers 5 does: the text (tokenize=False), else its encoding without
        added special tokens (the template writes them): a BatchEncoding, or the ids when
        return_dict=False. The template sees the special tokens (bos_token, eos_token, ...) and
        `kwargs`. ChatTemplateError when there is no template or it refuses the messages."""
        source = self.get_chat_template(chat_template, tools)
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        variables = {**self._template_tokens(), **kwargs}
        texts = [render_chat_template(source, chat, add_generation_prompt=add_generation_prompt,
                                      continue_final_message=continue_final_message, tools=tools,
                                      documents=documents, **variables)
                 for chat in (conversation if batched else [conversation])]
        if not tokenize:
            return texts if batched else texts[0]
        out = self(texts if batched else texts[0], padding=padding, truncation=truncation, max_length=max_length,
                   return_tensors=return_tensors, add_special_tokens=False, **(tokenizer_kwargs or {}))
        return out if return_dict else out["input_ids"]

    def get_chat_template(self, chat_template: str | None = None, tools: list[dict] | None = None) -> str:
        """The template source apply_chat_template uses: `chat_template` (its text, or a template's
        name), else this tokenizer's ("tool_use" with tools when it has one, else "default")."""
        return select_chat_template(self.chat_template, chat_template, tools)

    def end_of_turn_ids(self, chat_template: str | None = None) -> list[int]:
        """The ids that end an assistant turn in the chat template (Llama 3's <|eot_id|>, ChatML's
        <|im_end|>): a reply stops there. chat_template: another template's text or name. Empty
        when there is no template or its turns end in plain text."""
        if chat_template is None and self.chat_template is None:
            return []
        source = self.get_chat_template(chat_template)
        return [self.token_to_id(t) for t in end_of_turn_tokens(source, self.special_tokens, **self._template_tokens())]

    def _template_tokens(self) -> dict[str, str]:
        """The special tokens a chat template sees (the roles that are set), as transformers passes them."""
        return {role: getattr(self, role) for role in ROLES if getattr(self, role) is not None}

    @staticmethod
    def _check_text(texts: Sequence[str]) -> None:
        """DataError for text that is not valid Unicode: a lone surrogate such as the "\\udcff" that
        Python makes of a non-UTF-8 byte in a command-line argument or a file read with surrogateescape."""
        for i, text in enumerate(texts):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                where = f"text {i}" if len(texts) > 1 else "the text"
                raise DataError(f"{where} is not valid Unicode: {text[e.start]!r} at character {e.start} is a lone "
                                f"surrogate (often a non-UTF-8 byte); give UTF-8 text") from None

    def _check_ids(self, ids: Any) -> list[int]:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if i < 0 or i >= self.vocab_size)
            raise DataError(f"token id {bad} is out of range for this tokenizer (vocab_size {self.vocab_size}); "
                            f"the ids come from a different tokenizer or model")
        return ids

    def _special_config(self) -> dict[str, Any]:
        return {role: getattr(self, role) for role in ROLES}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_token={self.eos_token!r}, pad_token={self.pad_token!r})"


# ---- byte-level BPE --------------------------------------------------------------------------


def resolve_tokenizer_path(path_or_name: str | os.PathLike, revision: str | None) -> Path:
    p = Path(path_or_name).expanduser()
    if p.is_file() or p.is_dir():
        return p
    from lmforge.checkpoint import resolve_checkpoint_dir

    try:
        return resolve_checkpoint_dir(path_or_name, revision, require_weights=False)
    except CheckpointError as e:
        raise CheckpointError(f"tokenizer: {e}") from None


