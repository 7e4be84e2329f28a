"""Hugging Face naming schemes, one small module per family of checkpoints.

lmforge's config fields and parameter names are its own; a family module translates them to and
from one Hugging Face scheme, as data and small functions:

    ARCHITECTURES                          task -> transformers class name written to config.json
    config_from_hf(d, source) -> dict      config.json keys -> GPTConfig keyword arguments (+ extra)
    config_to_hf(config) -> dict           GPTConfig -> config.json keys (model_type is added by GPTConfig)
    name_from_hf(key, config) -> str|None  one tensor name -> lmforge's (None: not a parameter of ours)
    state_from_hf(state, config) -> dict   a whole state dict -> lmforge's names and layouts
    state_to_hf(state, config) -> dict     lmforge's state dict -> the family's names and layouts
    LORA_TARGETS, LORA_DEFAULT_TARGETS     LoRA target names users know -> lmforge module names (or, for
                                           a part of a fused module, (name, config -> its output rows))

FAMILIES maps each model_type to an object with that interface: the module itself (gpt2), or, where
one module serves several model_types (llama: llama, mistral, qwen2, qwen3), its object for the type.
Adding a family is adding a module here and a line in FAMILIES per model_type (and its parity tests).
"""

from __future__ import annotations

from typing import Any

from lmforge.errors import ConfigError
from lmforge.families import gpt2, llama

# config.json's model_type -> what maps it: a module, or a module's object for one of its model_types.
FAMILIES: dict[str, Any] = {
    "gpt2": gpt2,
    "llama": llama.MODEL_TYPES["llama"],
    "mistral": llama.MODEL_TYPES["mistral"],
    "qwen2": llama.MODEL_TYPES["qwen2"],
    "qwen3": llama.MODEL_TYPES["qwen3"],
}


def family_for(model_type: str | None, source: str = "config.json") -> Any:
    """The family module of `model_type`; ConfigError naming `source` when it is missing or unsupported."""
    supported = ", ".join(repr(t) for t in FAMILIES)
    if model_type is None:
        raise ConfigError(f"{source}: no 'model_type' key; lmforge reads Hugging Face configs of model_type {supported}")
    if model_type not in FAMILIES:
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported yet; lmforge supports {supported}")
    return FAMILIES[model_type]
