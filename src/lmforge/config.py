"""GPTConfig: the shape of a model, its presets, and the way in from / out to Hugging Face config.json
(the key mapping itself lives in the model's family module, lmforge.families)."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import re
import types
import typing
import warnings
from collections import abc as collections_abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

from lmforge.errors import ConfigError
from lmforge.families import FAMILIES, family_for

# Activations the MLP supports, by their Hugging Face names. GPT-2 uses the tanh GELU ("gelu_new");
# the erf GELU ("gelu") is close to it but not equal.
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu", "silu", "swish")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
MLPS = ("standard", "gated")
ROPE_SCALINGS = ("default", "linear", "llama3")
# config.json keys about how transformers ran or saved the model, not about the model.
HF_RUNTIME_KEYS = ("transformers_version", "dtype", "torch_dtype", "use_cache")
SPECIAL_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Seeds go to torch.Generator.manual_seed, which takes 64-bit values.
SEED_RANGE = range(0, 2**64)

C = TypeVar("C")


# ---- typed config dataclasses ------------------------------------------------------------------


def checked(cls: type[C]) -> type[C]:
    """Class decorator for a config dataclass (GPTConfig, TrainConfig, GenerationConfig, ...): an
    unknown keyword fails with a "did you mean", and every field is checked against its annotated
    type before the class's own __post_init__ checks run, whatever the source (keyword arguments,
    config.json, a YAML/TOML/JSON file): "false" is not a bool, True is not an int, "1e-3" is not a
    number. A whole float (1000.0) is taken for an int."""
    init, post_init = cls.__init__, getattr(cls, "__post_init__", None)

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if kwargs:
            check_known_fields(cls, kwargs, f"{cls.__name__}: unknown key")
        init(self, *args, **kwargs)
        if post_init is None:  # the dataclass's __init__ calls a __post_init__ only if it had one
            check_field_types(self)

    def __post_init__(self: Any) -> None:
        check_field_types(self)
        post_init(self)

    cls.__init__ = __init__  # type: ignore[method-assign]
    if post_init is not None:
        cls.__post_init__ = __post_init__  # type: ignore[attr-defined]
    return cls


@functools.cache
def _field_checks(cls: type) -> list[tuple[str, Any, Callable[[Any], Any]]]:
    """(name, annotated type, checker) of each init field of a config dataclass, made once per class."""
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name], _checker(hints[f.name])) for f in dataclasses.fields(cls)
            if f.init and f.name in hints]


def check_field_types(obj: Any) -> None:
    """ConfigError naming the field, the expected type and the value when a field of the dataclass
    instance `obj` does not have its annotated type (whole floats for int fields are converted)."""
    cls = type(obj)
    for name, tp, check in _field_checks(cls):
        value = getattr(obj, name)
        conformed = check(value)
        if conformed is _WRONG:
            expected = _describe(tp)
            if name.endswith("token_id"):
                expected = expected.replace("a list of integers", "a list of token ids").replace("an integer", "a token id")
            raise ConfigError(f"{cls.__name__}.{name} must be {expected}, got {_show(value)}")
        seeds = getattr(cls, "SEED_RANGE", SEED_RANGE)  # a class may take another 64-bit range (OpenAI's int64)
        if name == "seed" and conformed is not None and conformed not in seeds:
            raise ConfigError(f"{cls.__name__}.seed must be in {seeds.start}..{seeds.stop - 1} (64 bits), got {conformed}")
        if conformed is not value:
            object.__setattr__(obj, name, conformed)


_WRONG = object()  # a checker's answer for a value of the wrong type


def _checker(tp: Any) -> Callable[[Any], Any]:
    """A function value -> the value to keep (the same object, or an int for a whole float), or
    _WRONG when `value` does not have type `tp`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return lambda value: value
    if origin is typing.Union or origin is types.UnionType:
        options = [_checker(a) for a in args]

        def union(value: Any) -> Any:
            for check in options:
                conformed = check(value)
                if conformed is not _WRONG:
                    return conformed
            return _WRONG
        return union
    if tp is type(None):
        return lambda value: value if value is None else _WRONG
    if tp is bool:
        return lambda value: value if isinstance(value, bool) else _WRONG
    if tp is int:
        def integer(value: Any) -> Any:
            if isinstance(value, int):
                return _WRONG if isinstance(value, bool) else value
            if isinstance(value, float) and math.isfinite(value) and value.is_integer():
                return int(value)
            return _WRONG
        return integer
    if tp is float:
        return lambda value: value if isinstance(value, (int, float)) and not isinstance(value, bool) else _WRONG
    if tp is str:
        return lambda value: value if isinstance(value, str) else _WRONG
    if origin is Literal:
        return lambda value: value if any(value == a and type(value) is type(a) for a in args) else _WRONG
    if origin in (list, tuple, typing.Sequence, collections_abc.Sequence):
        item = _checker(args[0]) if args else (lambda value: value)
        return lambda value: (value if isinstance(value, (list, tuple)) and all(item(v) is not _WRONG for v in value)
                              else _WRONG)
    if origin is dict or tp is dict:
        return lambda value: value if isinstance(value, dict) else _WRONG
    if isinstance(tp, type):
        return lambda value: value if isinstance(value, tp) else _WRONG
    return lambda value: value


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (list, tuple, typing.Sequence, collections_abc.Sequence):
        return f"a list of {_plural(args[0]) if args else 'values'}"
    names = {type(None): "None", bool: "true or false", int: "an integer", float: "a number", str: "a string",
             dict: "a mapping"}
    if origin is dict:
        return "a mapping"
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _plural(tp: Any) -> str:
    return {int: "integers", str: "strings", float: "numbers"}.get(tp, _describe(tp))


def _show(value: Any) -> str:
    kind = {bool: "a boolean", str: "a string", int: "an integer", float: "a number", list: "a list",
            dict: "a mapping", type(None): "None"}.get(type(value), type(value).__name__)
    text = repr(value)
    shown = f"{text[:60]}..." if len(text) > 60 else text
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "null", "none"):
        return f"{shown} ({kind}; write it without quotes)"
    if isinstance(value, str) and _looks_like_number(value):
        return f"{shown} ({kind}; write the number without quotes)"
    return f"{shown} ({kind})"


def _looks_like_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class _GPT2EndOfText(int):
    """GPT-2's <|endoftext|> id (50256) as the default bos/eos. It means "GPT-2's id, when the
    vocabulary has it": a config with a smaller vocabulary (a preset with vocab_size=65) has no
    bos/eos rather than an id past its embedding. Copies and pickles are plain ints."""

    def __reduce__(self) -> tuple[Any, ...]:
        return int, (int(self),)

    def __repr__(self) -> str:
        return str(int(self))


GPT2_END_OF_TEXT = _GPT2EndOfText(50256)


# ---- the model config --------------------------------------------------------------------------


@checked
@dataclass
class GPTConfig:
    """Hyper-parameters of a decoder-only GPT-2 style Transformer.

    Defaults are GPT-2 small (124M). `n_inner=None` means 4 * n_embd, as in GPT-2.
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    bias: bool = True
    # GPT-2's <|endoftext|> when the vocabulary has it (see _GPT2EndOfText), else None.
    bos_token_id: int | None = GPT2_END_OF_TEXT
    # One id or several (as in Hugging Face configs): generation stops at any of them.
    eos_token_id: int | list[int] | None = GPT2_END_OF_TEXT
    pad_token_id: int | None = None
    # The Hugging Face model_type of the checkpoint: which lmforge.families module maps names.
    family: str = "gpt2"
    # The Llama family's choices (defaults are GPT-2's). norm: "layernorm" or "rmsnorm";
    # positions: "learned" (wpe) or "rope"; mlp: "standard" (c_proj(act(c_fc x))) or "gated"
    # (down(act(gate x) * up x), SwiGLU with silu); n_kv_head < n_head: grouped-query attention;
    # head_size: when it is not n_embd // n_head (Qwen3); qkv/proj/mlp_bias: None follows `bias`;
    # qk_norm: RMSNorm of each q and k head before RoPE (Qwen3); rope_scaling: HF's dict
    # ({"rope_type": "linear" | "llama3", ...}); sliding_window: attend to the last N positions only.
    norm: str = "layernorm"
    positions: str = "learned"
    mlp: str = "standard"
    n_kv_head: int | None = None
    head_size: int | None = None
    qkv_bias: bool | None = None
    proj_bias: bool | None = None
    mlp_bias: bool | None = None
    qk_norm: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = None
    # Keys of a Hugging Face config.json that lmforge does not use but keeps, so a load -> save round
    # trip does not lose them (a task head's id2label, ...), and tools' own keys ("lmforge_sft").
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner <= 0):
            raise ConfigError(f"GPTConfig.n_inner must be a positive integer or None, got {self.n_inner!r}")
        for name in ("n_kv_head", "head_size", "sliding_window"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"GPTConfig.{name} must be a positive integer or None, got {value!r}")
        for name, choices in (("norm", NORMS), ("positions", POSITIONS), ("mlp", MLPS)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"GPTConfig.{name} {getattr(self, name)!r} is not supported; use one of {', '.join(choices)}")
        if self.n_head % self.n_kv_heads != 0:
            raise ConfigError(
                f"GPTConfig.n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head}): each key/value "
                f"head serves n_head / n_kv_head query heads; choose n_kv_head from {_divisors(self.n_head)}"
            )
        if self.positions == "rope":
            if self.head_dim % 2:
                raise ConfigError(f"GPTConfig: rotary positions need an even head_dim, got {self.head_dim}")
            if not self.rope_theta > 0:
                raise ConfigError(f"GPTConfig.rope_theta must be > 0, got {self.rope_theta!r}")
            check_rope_scaling(self.rope_scaling)
        if self.head_size is None and self.n_embd % self.n_head != 0:
            raise ConfigError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"choose n_head from {_divisors(self.n_embd)}"
            )
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"GPTConfig.activation {self.activation!r} is not supported; use one of {', '.join(ACTIVATIONS)}"
            )
        if not self.layer_norm_epsilon > 0:
            raise ConfigError(f"GPTConfig.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}")
        for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ConfigError(f"GPTConfig.{name} must be in [0, 1), got {p!r}")
        for name in ("bos_token_id", "eos_token_id"):
            if isinstance(getattr(self, name), _GPT2EndOfText) and self.vocab_size <= GPT2_END_OF_TEXT:
                setattr(self, name, None)
        bad = out_of_vocabulary(self, self.vocab_size)
        if bad:
            name, token = bad
            raise ConfigError(f"GPTConfig.{name} {token} is outside the vocabulary (vocab_size {self.vocab_size}: ids "
                              f"0..{self.vocab_size - 1}); take the special ids from the tokenizer the model is used with "
                              f"(tokenizer.{name}) or set None")
        if self.family not in FAMILIES:
            raise ConfigError(f"GPTConfig.family {self.family!r} is not supported; use one of {', '.join(FAMILIES)}")

    @property
    def head_dim(self) -> int:
        return self.head_size if self.head_size is not None else self.n_embd // self.n_head

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads: n_kv_head, or n_head (multi-head attention) when unset."""
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    def has_bias(self, part: str) -> bool:
        """Whether the projections of `part` ("qkv", "proj", "mlp") have biases."""
        own = {"qkv": self.qkv_bias, "proj": self.proj_bias, "mlp": self.mlp_bias}[part]
        return self.bias if own is None else own

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def eos_token_ids(self) -> list[int]:
        """eos_token_id as a list (empty when there is none)."""
        eos = self.eos_token_id
        return [] if eos is None else list(eos) if isinstance(eos, list) else [eos]

    def replace(self, **changes: Any) -> "GPTConfig":
        """A copy with some fields changed (validated again); unknown names fail with a hint."""
        _check_known_keys(changes, "GPTConfig")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        """Build from lmforge's own field names; unknown keys fail with a "did you mean"."""
        _check_known_keys(d, "GPTConfig")
        return cls(**d)

    # ---- Hugging Face config.json ------------------------------------------------------------

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json that transformers reads (e.g. GPT2LMHeadModel.from_pretrained for "gpt2")."""
        d = {"model_type": self.family, **family_for(self.family).config_to_hf(self)}
        d["model_type"] = self.family  # whatever extra says
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "GPTConfig":
        """Read a Hugging Face config dict of a supported model_type. `source` names the file in errors."""
        model_type = d.get("model_type")
        family = family_for(model_type, source)
        kwargs = family.config_from_hf({k: v for k, v in d.items() if k != "model_type" and k not in HF_RUNTIME_KEYS},
                                       source)
        try:
            _drop_foreign_special_ids(kwargs, source)
            return cls(**kwargs, family=model_type)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> "GPTConfig":
        """A Hugging Face config.json (has model_type) or an lmforge config (GPTConfig field names)."""
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e}); fix or regenerate the file") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
        if "model_type" in d:
            return cls.from_hf_dict(d, source=str(path))
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


def out_of_vocabulary(ids: Any, vocab_size: int) -> tuple[str, Any] | None:
    """The first (field, id) among `ids`' bos/eos/pad_token_id (a config object, one id or a list
    each) that is not a token of a vocabulary of `vocab_size` ids; None when every one is."""
    for name in SPECIAL_ID_FIELDS:
        value = getattr(ids, name, None)
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and not (isinstance(token, int) and not isinstance(token, bool)
                                          and 0 <= token < vocab_size):
                return name, token
    return None


def _drop_foreign_special_ids(kwargs: dict[str, Any], source: str) -> None:
    """A config.json written elsewhere may name special ids its vocabulary does not have (pad -1, an
    eos added to the tokenizer only, GPT-2's 50256 under a small vocabulary): the model is still
    usable, so such an id is dropped with a warning rather than refused."""
    vocab = kwargs.get("vocab_size")
    if not isinstance(vocab, int) or isinstance(vocab, bool):
        return  # the type check names it
    for name in SPECIAL_ID_FIELDS:
        value = kwargs.get(name)
        ids = value if isinstance(value, list) else [value]
        if value is None or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            continue
        kept = [i for i in ids if 0 <= i < vocab]
        if len(kept) < len(ids):
            warnings.warn(f"{source}: {name} {value} is outside the vocabulary (vocab_size {vocab}); ignoring "
                          f"{'it' if not kept else [i for i in ids if i not in kept]}. Save the model again with its "
                          f"tokenizer (save_pretrained(dir, tokenizer=...)) to record the right ids", stacklevel=3)
            kwargs[name] = (kept if isinstance(value, list) else kept[0]) if kept else None


def check_known_fields(datacls: type, d: dict[str, Any], unknown: str, known_label: str = "known keys") -> None:
    """Fail on a name that is not a field of `datacls`, with a "did you mean" (typo in a config or option)."""
    known = _init_fields(datacls)
    for key in d:
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            did_you_mean = f"; did you mean {hint[0]!r}?" if hint else f"; {known_label}: {', '.join(known)}"
            raise ConfigError(f"{unknown} {key!r}{did_you_mean}")


@functools.cache
def _init_fields(datacls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(datacls) if f.init]


def load_yaml(text: str) -> Any:
    """YAML with YAML 1.2's numbers: PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string, so
    a config file's `lr: 1e-3` would not be a number."""
    import yaml

    return yaml.load(text, Loader=_yaml_loader())


@functools.cache
def _yaml_loader() -> type:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"))
    return Loader


def _check_known_keys(d: dict[str, Any], where: str) -> None:
    check_known_fields(GPTConfig, d, f"{where}: unknown key")


def check_rope_scaling(scaling: dict[str, Any] | None) -> None:
    """Refuse a rope_scaling lmforge does not implement (naming it and the supported ones) or one
    missing a key its type needs."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ConfigError(f"GPTConfig.rope_scaling must be a dict like Hugging Face's, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_SCALINGS:
        raise ConfigError(f"rope scaling type {kind!r} is not supported; lmforge supports "
                          f"{', '.join(repr(t) for t in ROPE_SCALINGS)}")
    needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                 "original_max_position_embeddings")}.get(kind, ())
    missing = [k for k in needed if k not in scaling]
    if missing:
        raise ConfigError(f"rope scaling type {kind!r} needs {', '.join(needed)}; missing {', '.join(missing)}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, min(n, 64) + 1) if n % d == 0]


# The Llama block: RMSNorm, rotary positions, SwiGLU, no biases, no dropout.
_LLAMA: dict[str, Any] = dict(norm="rmsnorm", positions="rope", mlp="gated", activation="silu", bias=False,
                              layer_norm_epsilon=1e-5, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)

# Presets are data: name -> GPTConfig keyword arguments. The first four are OpenAI's GPT-2 sizes;
# the rest are small shapes for CPU work and tests.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    # nanoGPT's "baby GPT" for character-level Shakespeare on a CPU (vocab set by the tokenizer).
    "baby": dict(n_layer=4, n_head=4, n_embd=128, n_positions=256, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0),
    # A few-million-parameter BPE model that trains for minutes on a laptop CPU.
    "mini": dict(n_layer=4, n_head=4, n_embd=256, n_positions=256),
    # The smallest useful shape: unit tests and smoke runs.
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, n_positions=128),
    # Llama-family models people run today: the published shapes (parameter counts as transformers
    # counts them), random weights; lmforge.load_model reads the real checkpoints.
    "smollm2-135m": dict(_LLAMA, family="llama", vocab_size=49152, n_positions=8192, n_embd=576, n_layer=30,
                         n_head=9, n_kv_head=3, n_inner=1536, rope_theta=100000.0, initializer_range=0.041666666666666664,
                         bos_token_id=0, eos_token_id=0),
    "smollm2-360m": dict(_LLAMA, family="llama", vocab_size=49152, n_positions=8192, n_embd=960, n_layer=32,
                         n_head=15, n_kv_head=5, n_inner=2560, rope_theta=100000.0, initializer_range=0.02,
                         bos_token_id=0, eos_token_id=0),
    "qwen2.5-0.5b": dict(_LLAMA, family="qwen2", vocab_size=151936, n_positions=32768, n_embd=896, n_layer=24,
                         n_head=14, n_kv_head=2, n_inner=4864, rope_theta=1000000.0, layer_norm_epsilon=1e-6,
                         qkv_bias=True, bos_token_id=151643, eos_token_id=151643),
    "qwen3-0.6b": dict(_LLAMA, family="qwen3", vocab_size=151936, n_positions=40960, n_embd=1024, n_layer=28,
                       n_head=16, n_kv_head=8, head_size=128, n_inner=3072, rope_theta=1000000.0,
                       layer_norm_epsilon=1e-6, qk_norm=True, bos_token_id=151643, eos_token_id=151645),
    "llama-3.2-1b": dict(_LLAMA, family="llama", vocab_size=128256, n_positions=131072, n_embd=2048, n_layer=16,
                         n_head=32, n_kv_head=8, n_inner=8192, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                         bos_token_id=128000, eos_token_id=128001),
    "tinyllama-1.1b": dict(_LLAMA, family="llama", vocab_size=32000, n_positions=2048, n_embd=2048, n_layer=22,
                           n_head=32, n_kv_head=4, n_inner=5632, tie_word_embeddings=False, bos_token_id=1,
                           eos_token_id=2),
    # nanoGPT's baby GPT size with the Llama block, for pretraining from scratch on a CPU.
    "llama-baby": dict(_LLAMA, family="llama", n_layer=4, n_head=4, n_embd=128, n_inner=352, n_positions=256),
}


def preset(name: str, **overrides: Any) -> GPTConfig:
    """The GPTConfig of a named preset, with optional field overrides (e.g. vocab_size=65)."""
    if name not in PRESETS:
        hint = difflib.get_close_matches(name, PRESETS, n=1)
        did_you_mean = f"did you mean {hint[0]!r}? " if hint else ""
        raise ConfigError(f"unknown preset {name!r}: {did_you_mean}available presets: {', '.join(PRESETS)}")
    _check_known_keys(overrides, f"preset {name!r}")
    return GPTConfig(**{**PRESETS[name], **overrides})
