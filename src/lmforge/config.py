"""GPTConfig: the shape of a GPT-2 family model, its presets, and the Hugging Face config mapping."""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError

# Activations the MLP supports, by their Hugging Face names. GPT-2 uses the tanh GELU ("gelu_new");
# the erf GELU ("gelu") is close to it but not equal.
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu", "silu", "swish")
SUPPORTED_MODEL_TYPES = ("gpt2",)


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
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    pad_token_id: int | None = None
    # Extra keys from a Hugging Face config.json that lmforge does not use but keeps, so a
    # load -> save round trip does not lose them (task heads, id2label, ...).
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner <= 0):
            raise ConfigError(f"GPTConfig.n_inner must be a positive integer or None, got {self.n_inner!r}")
        if self.n_embd % self.n_head != 0:
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

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

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
        """The config.json that `transformers.GPT2LMHeadModel.from_pretrained` reads."""
        d = dict(self.extra)
        d.update(
            model_type="gpt2",
            architectures=d.get("architectures") or ["GPT2LMHeadModel"],
            vocab_size=self.vocab_size,
            n_positions=self.n_positions,
            n_ctx=self.n_positions,
            n_embd=self.n_embd,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_inner=self.n_inner,
            activation_function=self.activation,
            layer_norm_epsilon=self.layer_norm_epsilon,
            embd_pdrop=self.embd_pdrop,
            attn_pdrop=self.attn_pdrop,
            resid_pdrop=self.resid_pdrop,
            initializer_range=self.initializer_range,
            tie_word_embeddings=self.tie_word_embeddings,
            scale_attn_weights=self.scale_attn_weights,
            scale_attn_by_inverse_layer_idx=self.scale_attn_by_inverse_layer_idx,
            reorder_and_upcast_attn=False,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        # A bias-free model (nanoGPT's choice) is saved with zero biases, which transformers loads to the
        # same logits; the extra "bias" key (transformers keeps unknown keys) lets lmforge drop them again.
        if not self.bias:
            d["bias"] = False
        else:
            d.pop("bias", None)
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "GPTConfig":
        """Read a Hugging Face GPT-2 config dict. `source` names the file in error messages."""
        model_type = d.get("model_type")
        if model_type is None:
            raise ConfigError(f"{source}: no 'model_type' key; lmforge reads Hugging Face configs of model_type 'gpt2'")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported yet; lmforge supports "
                f"{', '.join(repr(t) for t in SUPPORTED_MODEL_TYPES)}"
            )
        if d.get("add_cross_attention"):
            raise ConfigError(f"{source}: add_cross_attention=true (encoder-decoder GPT-2) is not supported")
        hf_to_ours = {
            "vocab_size": "vocab_size", "n_positions": "n_positions", "n_embd": "n_embd",
            "n_layer": "n_layer", "n_head": "n_head", "n_inner": "n_inner",
            "activation_function": "activation", "layer_norm_epsilon": "layer_norm_epsilon",
            "embd_pdrop": "embd_pdrop", "attn_pdrop": "attn_pdrop", "resid_pdrop": "resid_pdrop",
            "initializer_range": "initializer_range", "tie_word_embeddings": "tie_word_embeddings",
            "scale_attn_weights": "scale_attn_weights",
            "scale_attn_by_inverse_layer_idx": "scale_attn_by_inverse_layer_idx",
            "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id",
            "bias": "bias",
        }
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in d.items():
            if key in hf_to_ours:
                kwargs[hf_to_ours[key]] = value
            elif key not in ("model_type", "n_ctx", "reorder_and_upcast_attn", "transformers_version", "dtype", "torch_dtype", "use_cache"):
                extra[key] = value
        if "n_positions" not in kwargs and "n_ctx" in d:
            kwargs["n_positions"] = d["n_ctx"]
        # An eos list (several stop ids) keeps its first id here; generation reads the full list.
        if isinstance(kwargs.get("eos_token_id"), list):
            extra["eos_token_id_list"] = kwargs["eos_token_id"]
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0] if kwargs["eos_token_id"] else None
        for key in ("embd_pdrop", "attn_pdrop", "resid_pdrop", "layer_norm_epsilon", "initializer_range"):
            if key in kwargs and kwargs[key] is not None:
                kwargs[key] = float(kwargs[key])
        try:
            return cls(**kwargs, extra=extra)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
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


def check_known_fields(datacls: type, d: dict[str, Any], unknown: str, known_label: str = "known keys") -> None:
    """Fail on a name that is not a field of `datacls`, with a "did you mean" (typo in a config or option)."""
    known = [f.name for f in dataclasses.fields(datacls)]
    for key in d:
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            did_you_mean = f"; did you mean {hint[0]!r}?" if hint else f"; {known_label}: {', '.join(known)}"
            raise ConfigError(f"{unknown} {key!r}{did_you_mean}")


def _check_known_keys(d: dict[str, Any], where: str) -> None:
    check_known_fields(GPTConfig, d, f"{where}: unknown key")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, min(n, 64) + 1) if n % d == 0]


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
}


def preset(name: str, **overrides: Any) -> GPTConfig:
    """The GPTConfig of a named preset, with optional field overrides (e.g. vocab_size=65)."""
    if name not in PRESETS:
        hint = difflib.get_close_matches(name, PRESETS, n=1)
        did_you_mean = f"did you mean {hint[0]!r}? " if hint else ""
        raise ConfigError(f"unknown preset {name!r}: {did_you_mean}available presets: {', '.join(PRESETS)}")
    _check_known_keys(overrides, f"preset {name!r}")
    return GPTConfig(**{**PRESETS[name], **overrides})
