"""Tokenizers: any Hugging Face `tokenizers` tokenizer.json (GPT-2's byte-level BPE, Llama 3's and
Qwen's byte-level BPE with their split regexes, SentencePiece-converted Llama 2 BPE with byte fallback),
and a character-level tokenizer.

Both (the character tokenizer lives in char_tokenizer.py) share TokenizerBase's interface
(tokenizer_base.py: encode, decode, batch calls with padding and attention masks, special token ids,
chat templates, save_pretrained / from_pretrained), so a model directory holds its tokenizer and
everything downstream works with either. Byte-level BPE round-trips any string exactly; the
character tokenizer round-trips any string made of the characters it was trained on.

Files in a directory: tokenizer.json (+ vocab.json, merges.txt, tokenizer_config.json,
special_tokens_map.json, chat_template.jinja, which transformers also reads) for BPE;
lmforge_tokenizer.json for the character tokenizer. tokenizer_config.json is applied as
transformers 5 applies it, so the ids equal AutoTokenizer's.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from lmforge._io import read_json_object, write_json_atomic, write_text_atomic
from lmforge.char_tokenizer import CharTokenizer
from lmforge.chat_template import CHAT_TEMPLATE_FILE, read_chat_template
from lmforge.corpus import Errors, TextSource, iter_source
from lmforge.errors import ConfigError, DataError
from lmforge.tokenizer_base import (  # noqa: F401 (EOS, BatchEncoding: re-exported, users look here)
    CHAR_FILE, CONFIG_FILE, EOS, MERGES_FILE, ROLES, SPECIAL_TOKENS_FILE, TOKENIZER_FILE, VOCAB_FILE,
    BatchEncoding, TokenizerBase, resolve_tokenizer_path,
)

_BOS_IS_EOS: Any = object()  # Tokenizer's default bos: GPT-2's convention, the eos token
# Model types whose tokenizer.json transformers 5 loads as written even when tokenizer_config.json
# names LlamaTokenizer (Mistral's tokenizers go through its TokenizersBackend).
_AS_WRITTEN_MODEL_TYPES = ("mistral", "mixtral")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from the 256 byte values to printable characters (the byte-level alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _gpt2_pipeline(model: Any) -> Any:
    """A tokenizers.Tokenizer with GPT-2's pipeline around `model`: no normalizer (lossless),
    byte-level pre-tokenizer without prefix space, byte-level decoder."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, pre_tokenizers, processors

    backend = HFTokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


class Tokenizer(TokenizerBase):
    """A Hugging Face `tokenizers.Tokenizer` (GPT-2's byte-level BPE when lmforge builds one).

    Make one with from_pretrained (a directory or Hub name: any tokenizer.json), train (on text or
    files), or byte_level (256 byte tokens + <|endoftext|>, no merges: the offline default).
    bos_token defaults to the eos token, as in GPT-2.
    """

    def __init__(
        self,
        backend: Any,
        *,
        eos_token: str | None = EOS,
        bos_token: str | None = _BOS_IS_EOS,
        pad_token: str | None = None,
        unk_token: str | None = None,
        model_max_length: int | None = None,
        chat_template: str | dict[str, str] | None = None,
    ) -> None:
        self._backend = backend
        self._ordinary: Any = None  # a copy that encodes special-token strings as plain text
        self._fingerprint: str | None = None
        vocab = backend.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1 if vocab else 0
        self.eos_token = None if eos_token == EOS and EOS not in vocab else eos_token  # the default, when absent
        self.bos_token = self.eos_token if bos_token is _BOS_IS_EOS else bos_token
        self.pad_token, self.unk_token = pad_token, unk_token
        for role in ROLES:
            token = getattr(self, role)
            if token is not None and token not in vocab:
                raise DataError(f"{role} {token!r} is not in the vocabulary; add it as a special token when training")
        self.model_max_length = model_max_length
        self.chat_template = chat_template

    @property
    def backend(self) -> Any:
        """The underlying tokenizers.Tokenizer."""
        return self._backend

    # ---- constructors
    @classmethod
    def byte_level(cls) -> Tokenizer:
        """256 byte tokens (id = byte value, spelled in GPT-2's byte alphabet) + <|endoftext|> = 256.

        No merges, so every byte is one token: a tokenizer for randomly initialised models that
        needs no files and round-trips any string.
        """
        from tokenizers import AddedToken
        from tokenizers.models import BPE

        byte_chars = _bytes_to_unicode()
        vocab = {byte_chars[b]: b for b in range(256)}
        vocab[EOS] = 256
        backend = _gpt2_pipeline(BPE(vocab=vocab, merges=[], continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
        backend.add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
        return cls(backend, eos_token=EOS)

    @staticmethod
    def from_pretrained(path_or_name: str | os.PathLike, revision: str | None = None) -> TokenizerBase:
        """Load the tokenizer of a directory (a model directory, or one written by save_pretrained)
        or Hugging Face Hub name: tokenizer.json, else vocab.json + merges.txt, else a character
        tokenizer's lmforge_tokenizer.json. A path to one of those files works too.

        tokenizer_config.json counts as in transformers 5: the special tokens (bos, eos, pad, unk),
        a LlamaTokenizer's SentencePiece settings (legacy, add_prefix_space), padding_side,
        model_max_length, and add_bos_token / add_eos_token for vocab.json + merges.txt (with a
        tokenizer.json, its post-processor alone puts tokens around a text, e.g. Llama's bos); the
        chat template comes from chat_template.jinja or the config's "chat_template"."""
        directory = resolve_tokenizer_path(path_or_name, revision)
        if isinstance(directory, Path) and directory.is_file():
            return _load_file(directory)
        if (directory / CHAR_FILE).is_file():
            return CharTokenizer.from_pretrained(directory)
        if (directory / TOKENIZER_FILE).is_file():
            return _load_bpe(directory, directory / TOKENIZER_FILE)
        if (directory / VOCAB_FILE).is_file() or (directory / MERGES_FILE).is_file():
            return _load_bpe(directory, None)
        raise DataError(
            f"{directory}: no tokenizer found (expected {TOKENIZER_FILE}, {VOCAB_FILE} + {MERGES_FILE}, or {CHAR_FILE}); "
            f"save one with tokenizer.save_pretrained(dir), or use lmforge.Tokenizer.byte_level() for a new model"
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike, **special: Any) -> Tokenizer:
        """Load a tokenizers `tokenizer.json`. Special-token roles default to GPT-2's (<|endoftext|>)."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise DataError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                            f"save the tokenizer again") from None
        return cls(backend, **_default_roles(special, backend.get_vocab(with_added_tokens=True)))

    @classmethod
    def from_vocab_merges(cls, vocab_file: str | os.PathLike, merges_file: str | os.PathLike, **special: Any) -> Tokenizer:
        """Load GPT-2-format vocab.json + merges.txt, checking that the two belong together."""
        from tokenizers import AddedToken
        from tokenizers.models import BPE

        vocab_file, merges_file = Path(vocab_file), Path(merges_file)
        for f in (vocab_file, merges_file):
            if not f.is_file():
                raise DataError(f"{f}: missing; a GPT-2 tokenizer needs both {VOCAB_FILE} and {MERGES_FILE}")
        vocab = _read_vocab(vocab_file)
        merges = _read_merges(merges_file, vocab, vocab_file)
        backend = _gpt2_pipeline(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
        roles = _default_roles(special, vocab, add_eos=True)
        specials = list(dict.fromkeys(t for t in (roles.get(r) for r in ROLES) if t is not None))
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        return cls(backend, **roles)

    @classmethod
    def train(
        cls,
        source: TextSource,
        vocab_size: int,
        *,
        special_tokens: Sequence[str] = (EOS,),
        eos_token: str | None = EOS,
        pad_token: str | None = None,
        min_frequency: int = 2,
        field: str = "text",
        errors: Errors = "strict",
        show_progress: bool = True,
    ) -> Tokenizer:
        """Train a GPT-2-style byte-level BPE with `vocab_size` ids (specials and the 256 bytes included).

        source: a str is the training text itself; Path objects (or a list of them / of globs
        given as Paths) are text or JSONL files, JSONL read from `field`.
        """
        from tokenizers import trainers
        from tokenizers.models import BPE
        from tokenizers.pre_tokenizers import ByteLevel

        special_tokens = list(dict.fromkeys([*special_tokens, *(t for t in (eos_token, pad_token) if t)]))
        if vocab_size < 256 + len(special_tokens):
            raise ConfigError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least "
                              f"{256 + len(special_tokens)} (256 bytes + {len(special_tokens)} special tokens)")
        backend = _gpt2_pipeline(BPE(continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
            initial_alphabet=ByteLevel.alphabet(), show_progress=show_progress,
        )
        pieces = (piece for piece, _ in iter_source(source, field=field, errors=errors))
        backend.train_from_iterator(pieces, trainer=trainer)
        return cls(backend, eos_token=eos_token, pad_token=pad_token)

    # ---- the interface
    def encode_batch(self, texts: Sequence[str], split_special_tokens: bool = False,
                     add_special_tokens: bool = True) -> list[list[int]]:
        """Ids of each text; the tokenizers library encodes the batch on all cores."""
        if isinstance(texts, str):
            raise ConfigError("encode_batch takes a list of strings; use encode for one string")
        backend = self._ordinary_backend() if split_special_tokens else self._backend
        # encode_batch_fast (tokenizers >= 0.21) skips character offsets, which ids do not need.
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        try:
            return [e.ids for e in encode(list(texts), add_special_tokens=add_special_tokens)]
        except TypeError:  # the tokenizers library's only word for a lone surrogate
            self._check_text(texts)
            raise

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        return self._backend.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self._backend.id_to_token(id)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def special_tokens(self) -> list[str]:
        return [t.content for t in self._backend.get_added_tokens_decoder().values() if t.special]

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            spec = json.loads(self._backend.to_str())
            model = spec.get("model", {})
            merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
            content = {
                "model": model.get("type"), "vocab": sorted(self._backend.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1]),
                "merges": merges, "normalizer": spec.get("normalizer"), "pre_tokenizer": spec.get("pre_tokenizer"),
                "specials": sorted(self.special_tokens),
            }
            if self._backend.num_special_tokens_to_add(False):  # ids put around every text (Llama's bos)
                content["post_processor"] = spec.get("post_processor")
            blob = json.dumps(content, sort_keys=True, ensure_ascii=False).encode("utf-8")
            self._fingerprint = "bpe-" + hashlib.sha256(blob).hexdigest()[:32]
        return self._fingerprint

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json, vocab.json, merges.txt, tokenizer_config.json (with the chat template)
        and special_tokens_map.json (each atomically): lmforge and transformers' AutoTokenizer load them
        to the same ids (GPT2TokenizerFast too, for GPT-2's byte-level BPE)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        spec = json.loads(self._backend.to_str())
        write_text_atomic(directory / TOKENIZER_FILE, self._backend.to_str(pretty=True))
        model = spec.get("model", {})
        if model.get("type") == "BPE" and not any(" " in t for t in model.get("vocab", {})):
            vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
            write_text_atomic(directory / VOCAB_FILE, json.dumps(vocab, ensure_ascii=False) + "\n")
            merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
            write_text_atomic(directory / MERGES_FILE, "\n".join(["#version: 0.2", *merges]) + "\n")
        roles = self._special_config()
        if self._is_gpt2_format():
            config = {"tokenizer_class": "GPT2Tokenizer", **roles, "add_prefix_space": False, "add_bos_token": False}
        else:  # transformers then takes tokenizer.json as written, as lmforge does
            config = {"tokenizer_class": "PreTrainedTokenizerFast", **roles, "padding_side": self.padding_side}
        config.update({
            "clean_up_tokenization_spaces": False, "errors": "replace",
            "model_max_length": self.model_max_length if self.model_max_length is not None else int(1e30),
        })
        if isinstance(self.chat_template, dict):
            config["chat_template"] = [{"name": k, "template": v} for k, v in self.chat_template.items()]
        elif self.chat_template is not None:
            config["chat_template"] = self.chat_template
        write_json_atomic(directory / CONFIG_FILE, config)
        write_json_atomic(directory / SPECIAL_TOKENS_FILE, {k: v for k, v in roles.items() if v is not None})
        for name in (CHAR_FILE, CHAT_TEMPLATE_FILE):  # would shadow these files on load
            stale = directory / name
            if stale.is_file():
                stale.unlink()
        return directory

    def _is_gpt2_format(self) -> bool:
        """Whether the pipeline is the one transformers' GPT2Tokenizer builds from vocab.json + merges.txt."""
        spec = json.loads(self._backend.to_str())
        pre, decoder = spec.get("pre_tokenizer") or {}, spec.get("decoder") or {}
        return (spec.get("normalizer") is None and spec.get("model", {}).get("type") == "BPE"
                and (pre.get("type"), pre.get("add_prefix_space"), pre.get("use_regex")) == ("ByteLevel", False, True)
                and decoder.get("type") == "ByteLevel" and not self._backend.num_special_tokens_to_add(False))

    def _follow_config(self, config: dict[str, Any], model_type: str | None, from_json: bool) -> Tokenizer:
        """Apply tokenizer_config.json as transformers 5 does: a LlamaTokenizer's SentencePiece
        pipeline is rebuilt from its settings (not taken from tokenizer.json) and pads on the left
        unless padding_side says otherwise; add_bos_token / add_eos_token count only without a
        tokenizer.json (whose post-processor decides)."""
        tokenizer_class = str(config.get("tokenizer_class") or "").removesuffix("Fast")
        padding_side = "right"
        if (tokenizer_class == "LlamaTokenizer" and '"ByteLevel"' not in self._backend.to_str()
                and model_type not in _AS_WRITTEN_MODEL_TYPES):
            _llama_sentencepiece_pipeline(self._backend, config)
            padding_side = "left"
        self.padding_side = config.get("padding_side") or padding_side
        if not from_json and ("add_bos_token" in config or "add_eos_token" in config):
            add_bos = bool(config.get("add_bos_token")) and self.bos_token is not None
            add_eos = bool(config.get("add_eos_token")) and self.eos_token is not None
            if add_bos or add_eos or self._backend.num_special_tokens_to_add(False):
                self._backend.post_processor = _bos_eos_processor(self, add_bos, add_eos)
        self._ordinary = self._fingerprint = None
        return self

    def _ordinary_backend(self) -> Any:
        if self._ordinary is None:
            from tokenizers import Tokenizer as HFTokenizer

            ordinary = HFTokenizer.from_str(self._backend.to_str())
            ordinary.encode_special_tokens = True
            self._ordinary = ordinary
        return self._ordinary

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_backend"] = self._backend.to_str()
        state["_ordinary"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        state["_backend"] = HFTokenizer.from_str(state["_backend"])
        self.__dict__.update(state)


# ---- helpers for loading ---------------------------------------------------------------------


def _load_file(path: Path) -> TokenizerBase:
    if path.name == CHAR_FILE:
        return CharTokenizer.from_pretrained(path)
    if path.name in (VOCAB_FILE, MERGES_FILE):
        return _load_bpe(path.parent, None)
    if path.suffix == ".json":
        return _load_bpe(path.parent, path)
    raise DataError(f"{path}: not a tokenizer file; pass a directory, {TOKENIZER_FILE}, {VOCAB_FILE} or {CHAR_FILE}")


def _load_bpe(directory: Path, file: Path | None) -> Tokenizer:
    """tokenizer.json `file` (None: vocab.json + merges.txt) with the directory's tokenizer_config.json,
    special_tokens_map.json and chat template applied."""
    config = _read_config(directory)
    special = {role: config[role] for role in ROLES if role in config}
    if isinstance(config.get("model_max_length"), int) and config["model_max_length"] < 1e12:
        special["model_max_length"] = config["model_max_length"]
    if file is None:
        tok = Tokenizer.from_vocab_merges(directory / VOCAB_FILE, directory / MERGES_FILE, **special)
    else:
        tok = Tokenizer.from_file(file, **special)
    tok.chat_template = read_chat_template(directory)
    model_type = read_json_object(directory / "config.json", DataError).get("model_type")
    return tok._follow_config(config, model_type, from_json=file is not None)


def _read_config(directory: Path) -> dict[str, Any]:
    """special_tokens_map.json and tokenizer_config.json merged (the config file wins); special
    tokens given as AddedToken objects become their text."""
    out: dict[str, Any] = {}
    for name in (SPECIAL_TOKENS_FILE, CONFIG_FILE):
        out.update(read_json_object(directory / name, DataError))
    for role in ROLES:
        if isinstance(out.get(role), dict):
            out[role] = out[role].get("content")
    return out


def _llama_sentencepiece_pipeline(backend: Any, config: dict[str, Any]) -> None:
    """What transformers 5's LlamaTokenizer builds around a SentencePiece BPE: no normalizer, a
    Metaspace pre-tokenizer that prefixes "▁" to the text's start ("first"; to every piece between
    special tokens when legacy; never without add_prefix_space), and the matching decoder."""
    from tokenizers import decoders, pre_tokenizers

    prefix = config.get("add_prefix_space")
    prefix = True if prefix is None else bool(prefix)
    scheme = ("always" if config.get("legacy", False) else "first") if prefix else "never"
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))


def _bos_eos_processor(tok: Tokenizer, add_bos: bool, add_eos: bool) -> Any:
    """transformers' update_post_processor: bos before and/or eos after every text."""
    from tokenizers import processors

    bos, eos = tok.bos_token, tok.eos_token
    single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
    pair = " ".join([single] + [f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos)
    specials = [(t, tok.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(dict.fromkeys(specials)))


def _default_roles(special: dict[str, Any], vocab: dict[str, int], add_eos: bool = False) -> dict[str, Any]:
    """GPT-2's convention when a role is not configured: <|endoftext|> is eos (and bos)."""
    roles = dict(special)
    if "eos_token" not in roles and (add_eos or EOS in vocab):
        roles["eos_token"] = EOS
    if "bos_token" not in roles:
        roles["bos_token"] = roles.get("eos_token")
    return roles


def _read_vocab(path: Path) -> dict[str, int]:
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); the vocab file is corrupt") from None
    if not isinstance(vocab, dict) or not all(isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in vocab.items()):
        raise DataError(f"{path}: expected a JSON object mapping tokens to non-negative integer ids")
    if len(set(vocab.values())) != len(vocab):
        raise DataError(f"{path}: several tokens share one id; the vocab file is corrupt")
    return vocab


def _read_merges(path: Path, vocab: dict[str, int], vocab_file: Path) -> list[tuple[str, str]]:
    """Merges as pairs; every merge's two parts and its result must be in the vocab (else the two
    files come from different tokenizers, which the tokenizers library would not catch cleanly)."""
    merges: list[tuple[str, str]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if (lineno == 1 and line.startswith("#version")) or not line:
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise DataError(f"{path}:{lineno}: expected two tokens separated by one space, got {line!r}")
            a, b = parts
            for token in (a, b, a + b):
                if token not in vocab:
                    raise DataError(f"{path}:{lineno}: merge {line!r} needs token {token!r}, which is not in {vocab_file}; "
                                    f"{MERGES_FILE} and {VOCAB_FILE} come from different tokenizers")
            merges.append((a, b))
    return merges
