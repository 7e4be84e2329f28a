"""GPT-2 in Hugging Face's names (model_type "gpt2": transformers' GPT2LMHeadModel and friends).

lmforge's GPT uses GPT-2's parameter names, so the mapping is small: Hugging Face stores the four
attention/MLP projections as Conv1D (weight transposed relative to nn.Linear), older checkpoints
carry causal-mask buffers, a bare GPT2Model has no "transformer." prefix, and transformers' GPT-2
always has biases (a bias-free model is written with zero biases and a "bias": false key). An int8
model's weights take the same names and layouts; their scales (`<name>_scale`, one per output channel)
are 1-D and pass through as they are.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from lmforge.errors import CheckpointError, ConfigError
from lmforge.quantize import omits_tied_head

ARCHITECTURES = {"causal_lm": "GPT2LMHeadModel", "sequence_classification": "GPT2ForSequenceClassification"}

# config.json key -> GPTConfig field.
CONFIG_KEYS = {
    "vocab_size": "vocab_size", "n_positions": "n_positions", "n_embd": "n_embd", "n_layer": "n_layer",
    "n_head": "n_head", "n_inner": "n_inner", "activation_function": "activation",
    "layer_norm_epsilon": "layer_norm_epsilon", "embd_pdrop": "embd_pdrop", "attn_pdrop": "attn_pdrop",
    "resid_pdrop": "resid_pdrop", "initializer_range": "initializer_range",
    "tie_word_embeddings": "tie_word_embeddings", "scale_attn_weights": "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx": "scale_attn_by_inverse_layer_idx",
    "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id",
}
# Written for transformers, implied on read: n_ctx is n_positions; lmforge always attends as reorder_and_upcast_attn=false.
DERIVED_KEYS = ("n_ctx", "reorder_and_upcast_attn")
FLOAT_FIELDS = ("embd_pdrop", "attn_pdrop", "resid_pdrop", "layer_norm_epsilon", "initializer_range")

# nn.Linear in lmforge, Conv1D (weight transposed) in Hugging Face GPT-2.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Causal-mask buffers that older GPT-2 checkpoints carry; lmforge builds the mask on the fly.
LEGACY_BUFFER = re.compile(r"\.attn\.(bias|masked_bias)$")
# Task heads sit beside the body ("transformer."); a bare GPT2Model checkpoint has the body only, unprefixed.
HEADS = ("lm_head.", "score.")

# LoRA targets: the projection names users give (peft's for GPT-2) -> lmforge module-name suffixes.
LORA_TARGETS = {"c_attn": "attn.c_attn", "attn.c_proj": "attn.c_proj", "c_fc": "mlp.c_fc",
                "mlp.c_proj": "mlp.c_proj", "c_proj": "c_proj"}
LORA_DEFAULT_TARGETS = ("c_attn",)


# ---- config.json ---------------------------------------------------------------------------------


def config_from_hf(d: dict[str, Any], source: str) -> dict[str, Any]:
    """GPTConfig keyword arguments from a GPT-2 config.json (without model_type); keys lmforge does
    not use go to `extra`, so a load -> save round trip keeps them."""
    if d.get("add_cross_attention"):
        raise ConfigError(f"{source}: add_cross_attention=true (encoder-decoder GPT-2) is not supported")
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in d.items():
        if key in CONFIG_KEYS:
            kwargs[CONFIG_KEYS[key]] = value
        elif key == "bias":  # lmforge's own key for a bias-free model (transformers keeps unknown keys)
            kwargs["bias"] = value
        elif key not in DERIVED_KEYS:
            extra[key] = value
    if "n_positions" not in kwargs and "n_ctx" in d:
        kwargs["n_positions"] = d["n_ctx"]
    for name in FLOAT_FIELDS:
        if isinstance(kwargs.get(name), int) and not isinstance(kwargs[name], bool):
            kwargs[name] = float(kwargs[name])  # anything else is left to GPTConfig's type check
    return {**kwargs, "extra": extra}


def config_to_hf(config: Any) -> dict[str, Any]:
    """The config.json keys `transformers.GPT2LMHeadModel.from_pretrained` reads (extra keys first);
    ConfigError for a model GPT-2 cannot describe (a Llama-family block under family "gpt2")."""
    check_representable(config)
    d = dict(config.extra)
    d["architectures"] = d.get("architectures") or [ARCHITECTURES["causal_lm"]]
    for key, name in CONFIG_KEYS.items():
        d[key] = getattr(config, name)
    d.update(n_ctx=config.n_positions, reorder_and_upcast_attn=False)
    # A bias-free model (nanoGPT's choice) is saved with zero biases, which transformers loads to the
    # same logits; the "bias" key lets lmforge drop them again.
    if not config.bias:
        d["bias"] = False
    else:
        d.pop("bias", None)
    return d


def check_representable(config: Any) -> None:
    """ConfigError naming each choice transformers' GPT-2 does not have (RMSNorm, RoPE, a gated MLP,
    grouped-query attention, a head size other than n_embd / n_head, q/k norm, a sliding window,
    per-projection biases unlike the others), instead of writing a config.json of another model."""
    gpt2 = {"norm": "layernorm", "positions": "learned", "mlp": "standard", "n_kv_heads": config.n_head,
            "head_dim": config.n_embd // config.n_head, "qk_norm": False, "sliding_window": None}
    found = {name: getattr(config, name) for name in gpt2}
    for part in ("qkv", "proj", "mlp"):
        gpt2[f"{part}_bias"], found[f"{part}_bias"] = config.bias, config.has_bias(part)
    problems = [f"{name}={value!r} (GPT-2: {gpt2[name]!r})" for name, value in found.items() if value != gpt2[name]]
    if problems:
        raise ConfigError(f"cannot write a 'gpt2' config.json for this model: {', '.join(problems)}; set "
                          f"GPTConfig.family to the Llama-family model_type it is (llama, mistral, qwen2, qwen3)")


# ---- tensors ---------------------------------------------------------------------------------------


def name_from_hf(key: str, config: Any) -> str | None:
    """lmforge's name for a tensor of a GPT-2 checkpoint (wrapper prefixes already removed); None for
    a legacy mask buffer or a tied LM head (the same tensor as wte)."""
    if LEGACY_BUFFER.search(key) or (key == "lm_head.weight" and omits_tied_head(config)):
        return None
    return key if key.startswith(("transformer.", *HEADS)) else "transformer." + key


def state_from_hf(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """A GPT-2 state dict in lmforge's names and layout (Conv1D transposed, zero biases of a
    bias-free model dropped)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = name_from_hf(key, config)
        if name is not None:
            out[name] = tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor
    if not config.bias:
        for key in bias_shapes(config):
            tensor = out.pop(key, None)
            if tensor is not None and bool(tensor.count_nonzero()):
                raise CheckpointError(
                    f"tensor {key!r} is not zero, but config.json says bias=false (a bias-free model); the weights "
                    f"were changed by a tool that kept the biases: remove \"bias\": false from config.json to load them"
                )
    return out


def state_to_hf(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """The state dict transformers' GPT-2 expects: Conv1D layout, no tied duplicate of wte, and zero
    biases for a bias-free model (transformers' GPT-2 always has them)."""
    out = {key: tensor.t() if key.endswith(CONV1D_WEIGHTS) else tensor for key, tensor in state.items()
           if not (key == "lm_head.weight" and omits_tied_head(config))}
    if not config.bias:
        dtype = out["transformer.wte.weight"].dtype
        out.update({key: torch.zeros(shape, dtype=dtype) for key, shape in bias_shapes(config).items()})
    return out


def bias_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """The bias tensors a Hugging Face GPT-2 of this shape has (all of them; a bias-free model has none)."""
    e, shapes = config.n_embd, {"transformer.ln_f.bias": (config.n_embd,)}
    for i in range(config.n_layer):
        h = f"transformer.h.{i}."
        shapes.update({h + "ln_1.bias": (e,), h + "attn.c_attn.bias": (3 * e,), h + "attn.c_proj.bias": (e,),
                       h + "ln_2.bias": (e,), h + "mlp.c_fc.bias": (config.inner_dim,), h + "mlp.c_proj.bias": (e,)})
    return shapes
