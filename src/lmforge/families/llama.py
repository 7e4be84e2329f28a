"""The Llama family in Hugging Face's names: model_types "llama", "mistral", "qwen2" and "qwen3".

The four share one tensor layout (model.embed_tokens, model.layers.{i}.self_attn.{q,k,v,o}_proj,
mlp.{gate,up,down}_proj, input/post_attention_layernorm, model.norm, lm_head) and most config.json
keys; what differs between them is data, one MODEL_TYPES row each: the class names, the keys and
transformers' defaults for them, the projection biases a type fixes, Qwen3's q/k norm, and how
sliding-window attention is switched on. lmforge fuses q/k/v into attn.c_attn and gate/up into
mlp.c_fc (rows concatenated), so reading concatenates and writing splits (exact, views only).
Every Llama-family projection is an nn.Linear, as in lmforge: no transposes. An int8 model's
weights are split and joined the same way, and their per-output-channel scales (`<name>_scale`, 1-D)
by the same rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from lmforge.errors import CheckpointError, ConfigError
from lmforge.quantize import omits_tied_head

# GPTConfig fields every Llama-family config has: RMSNorm, rotary positions, a gated MLP, no
# biases unless a type or config.json adds them (qkv_bias, ...), no embedding or residual dropout.
LLAMA_BLOCK = dict(norm="rmsnorm", positions="rope", mlp="gated", bias=False, embd_pdrop=0.0, resid_pdrop=0.0)

# config.json keys every type reads, with transformers' defaults where the types agree.
COMMON_KEYS = dict(
    hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None, hidden_act="silu",
    initializer_range=0.02, rms_norm_eps=1e-6, tie_word_embeddings=False, pad_token_id=None, attention_dropout=0.0,
)
# Rotary settings: the transformers v5 dict, and the legacy keys it replaced (read, never written).
ROPE_KEYS = ("rope_parameters", "rope_theta", "rope_scaling")
QWEN_WINDOW_KEYS = dict(use_sliding_window=False, sliding_window=4096, max_window_layers=28, layer_types=None)


def lora_part(fused: str, index: int) -> tuple[str, Callable[[Any], tuple[int, int]]]:
    """A LoRA target that is one Hugging Face projection inside lmforge's fused `fused` module: the
    module-name suffix, and a function config -> (start, stop), the output rows that part owns."""
    def rows(config: Any) -> tuple[int, int]:
        sizes = [shape[0] for shape in fused_part_shapes(config, fused + ".weight")]
        return sum(sizes[:index]), sum(sizes[:index + 1])

    return fused, rows


# LoRA targets: peft's names for the Llama family -> lmforge module-name suffixes, or (suffix, rows)
# for a projection lmforge fuses with others: q/k/v_proj are row blocks [q; k; v] of attn.c_attn and
# gate/up_proj the halves [gate; up] of mlp.c_fc, and an adapter on a part changes only its rows.
LORA_TARGETS = {"q_proj": lora_part("attn.c_attn", 0), "k_proj": lora_part("attn.c_attn", 1),
                "v_proj": lora_part("attn.c_attn", 2), "o_proj": "attn.c_proj",
                "gate_proj": lora_part("mlp.c_fc", 0), "up_proj": lora_part("mlp.c_fc", 1), "down_proj": "mlp.c_proj",
                "c_attn": "attn.c_attn", "attn.c_proj": "attn.c_proj", "c_fc": "mlp.c_fc", "mlp.c_proj": "mlp.c_proj"}
LORA_DEFAULT_TARGETS = ("q_proj", "v_proj")  # peft's default for Llama


@dataclass(frozen=True, eq=False)
class ModelType:
    """One model_type of the family, as data: the class-name prefix, the config.json keys it reads
    with transformers' defaults (absent keys take these), its q/k/v bias when it has no
    attention_bias key, its q/k norm, and its sliding-window scheme ("none"; "mistral": sliding_window
    alone; "qwen": use_sliding_window + sliding_window + max_window_layers / layer_types). It is also
    what lmforge.families.FAMILIES holds for the type: the interface below, over the module's functions."""

    name: str
    prefix: str
    keys: dict[str, Any]
    qkv_bias: bool = False
    qk_norm: bool = False
    window: str = "none"

    LORA_TARGETS = LORA_TARGETS
    LORA_DEFAULT_TARGETS = LORA_DEFAULT_TARGETS

    @property
    def ARCHITECTURES(self) -> dict[str, str]:
        return {"causal_lm": f"{self.prefix}ForCausalLM", "sequence_classification": f"{self.prefix}ForSequenceClassification"}

    def config_from_hf(self, d: dict[str, Any], source: str) -> dict[str, Any]:
        return config_from_hf(d, source, self)

    def config_to_hf(self, config: Any) -> dict[str, Any]:
        return config_to_hf(config)

    def name_from_hf(self, key: str, config: Any) -> str | None:
        return name_from_hf(key, config)

    def state_from_hf(self, state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
        return state_from_hf(state, config)

    def state_to_hf(self, state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
        return state_to_hf(state, config)


MODEL_TYPES: dict[str, ModelType] = {t.name: t for t in (
    ModelType("llama", "Llama", dict(COMMON_KEYS, vocab_size=32000, intermediate_size=11008, head_dim=None,
                                     max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                                     attention_bias=False, mlp_bias=False)),
    ModelType("mistral", "Mistral", dict(COMMON_KEYS, vocab_size=32000, intermediate_size=14336, num_key_value_heads=8,
                                         head_dim=None, max_position_embeddings=131072, bos_token_id=1, eos_token_id=2,
                                         sliding_window=4096), window="mistral"),
    # Qwen2 has no head_dim field (modeling reads one if config.json has it): see config_to_hf.
    ModelType("qwen2", "Qwen2", dict(COMMON_KEYS, **QWEN_WINDOW_KEYS, vocab_size=151936, intermediate_size=22016,
                                     num_key_value_heads=32, max_position_embeddings=32768, bos_token_id=None,
                                     eos_token_id=None), qkv_bias=True, window="qwen"),
    ModelType("qwen3", "Qwen3", dict(COMMON_KEYS, **QWEN_WINDOW_KEYS, vocab_size=151936, intermediate_size=22016,
                                     num_key_value_heads=32, head_dim=128, max_position_embeddings=32768,
                                     bos_token_id=None, eos_token_id=None, attention_bias=False),
              qk_norm=True, window="qwen"),
)}

# config.json key -> GPTConfig field, for the keys that map one to one.
CONFIG_KEYS = {
    "vocab_size": "vocab_size", "max_position_embeddings": "n_positions", "hidden_size": "n_embd",
    "num_hidden_layers": "n_layer", "num_attention_heads": "n_head", "intermediate_size": "n_inner",
    "hidden_act": "activation", "rms_norm_eps": "layer_norm_epsilon", "attention_dropout": "attn_pdrop",
    "initializer_range": "initializer_range", "tie_word_embeddings": "tie_word_embeddings",
    "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id",
}
FLOAT_FIELDS = ("layer_norm_epsilon", "attn_pdrop", "initializer_range")

# ---- tensor names ----------------------------------------------------------------------------------

# Per layer: Hugging Face name (after "model.layers.{i}.") -> lmforge's (after "transformer.h.{i}.").
LAYER_NAMES = {
    "input_layernorm.weight": "ln_1.weight",
    "self_attn.o_proj.weight": "attn.c_proj.weight", "self_attn.o_proj.bias": "attn.c_proj.bias",
    "self_attn.q_norm.weight": "attn.q_norm.weight", "self_attn.k_norm.weight": "attn.k_norm.weight",
    "post_attention_layernorm.weight": "ln_2.weight",
    "mlp.down_proj.weight": "mlp.c_proj.weight", "mlp.down_proj.bias": "mlp.c_proj.bias",
    # An int8 model's per-output-channel scales (lmforge.quantize), beside their weights.
    "self_attn.o_proj.weight_scale": "attn.c_proj.weight_scale", "mlp.down_proj.weight_scale": "mlp.c_proj.weight_scale",
}
# Per layer: lmforge's fused tensor -> the Hugging Face tensors whose rows it concatenates, in order.
FUSED = {
    "attn.c_attn.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.c_attn.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "mlp.c_fc.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.c_fc.bias": ("mlp.gate_proj.bias", "mlp.up_proj.bias"),
    "attn.c_attn.weight_scale": ("self_attn.q_proj.weight_scale", "self_attn.k_proj.weight_scale",
                                 "self_attn.v_proj.weight_scale"),
    "mlp.c_fc.weight_scale": ("mlp.gate_proj.weight_scale", "mlp.up_proj.weight_scale"),
}
PART_OF = {part: (fused, i) for fused, parts in FUSED.items() for i, part in enumerate(parts)}
OUTSIDE_LAYERS = {"model.embed_tokens.weight": "transformer.wte.weight", "model.norm.weight": "transformer.ln_f.weight"}
LAYER_NAMES_TO_HF = {ours: hf for hf, ours in LAYER_NAMES.items()}
OUTSIDE_LAYERS_TO_HF = {ours: hf for hf, ours in OUTSIDE_LAYERS.items()}
HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
OURS_LAYER = re.compile(r"transformer\.h\.(\d+)\.(.+)")
# Task heads sit beside the body ("model."); a bare LlamaModel checkpoint has the body only, unprefixed.
HEADS = ("lm_head.", "score.")
# Rotary frequencies that older checkpoints store (model.layers.{i}.self_attn.rotary_emb.inv_freq,
# model.rotary_emb.inv_freq); lmforge computes them from the config.
ROTARY_BUFFER = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


# ---- config.json ---------------------------------------------------------------------------------


def config_from_hf(d: dict[str, Any], source: str, kind: ModelType) -> dict[str, Any]:
    """GPTConfig keyword arguments from a config.json of model_type `kind` (without the model_type
    key). Absent keys take transformers' defaults for the type; keys lmforge does not use go to `extra`."""
    known = {**kind.keys, **{k: v for k, v in d.items() if k in kind.keys}}
    kwargs: dict[str, Any] = dict(LLAMA_BLOCK, **{name: known[key] for key, name in CONFIG_KEYS.items()})
    for name in FLOAT_FIELDS:
        if isinstance(kwargs[name], int) and not isinstance(kwargs[name], bool):
            kwargs[name] = float(kwargs[name])  # anything else is left to GPTConfig's type check
    n_embd, n_head = known["hidden_size"], known["num_attention_heads"]
    n_kv_head = known["num_key_value_heads"] or n_head
    head_dim = known.get("head_dim", d.get("head_dim")) or n_embd // n_head
    # Values equal to what GPTConfig derives are left unset, so presets and loaded configs compare equal.
    kwargs["n_kv_head"] = None if n_kv_head == n_head else n_kv_head
    kwargs["head_size"] = None if head_dim * n_head == n_embd else head_dim
    qkv_bias, proj_bias = (known["attention_bias"],) * 2 if "attention_bias" in kind.keys else (kind.qkv_bias, False)
    mlp_bias = known.get("mlp_bias", False)
    kwargs.update(qkv_bias=qkv_bias or None, proj_bias=proj_bias or None, mlp_bias=mlp_bias or None)
    if kind.qk_norm:
        kwargs["qk_norm"] = True
    kwargs["rope_theta"], kwargs["rope_scaling"] = rope_from_hf(d, known["max_position_embeddings"], source)
    kwargs["sliding_window"] = window_from_hf(known, kind, source)
    used = {*kind.keys, *ROPE_KEYS, "head_dim"}
    if kind.window == "qwen":
        used.discard("max_window_layers")  # kept as is: it only matters once use_sliding_window is true
    return {**kwargs, "extra": {k: v for k, v in d.items() if k not in used}}


def rope_from_hf(d: dict[str, Any], max_positions: int, source: str) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and lmforge's rope_scaling ({"rope_type": ..., the type's keys}, None for plain
    RoPE) from either transformers v5's rope_parameters or the legacy rope_theta + rope_scaling, read
    as transformers reads them (rope_scaling wins; rope_theta inside the dict wins)."""
    params = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"{source}: rope_parameters {params!r} is not one dict of RoPE settings (per-layer-type "
                          f"RoPE is not supported)")
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    theta = float(theta) if isinstance(theta, int) and not isinstance(theta, bool) else theta  # else: the type check
    kind = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ConfigError(f"{source}: partial_rotary_factor={partial} (RoPE on part of each head) is not supported")
    if kind == "default":
        return theta, None
    scaling = {"rope_type": kind, **{k: v for k, v in params.items()
                                     if k not in ("type", "rope_type", "rope_theta", "partial_rotary_factor")}}
    if kind == "llama3":
        scaling.setdefault("original_max_position_embeddings", max_positions)
    return theta, scaling  # GPTConfig refuses a type or keys lmforge cannot run


def window_from_hf(known: dict[str, Any], kind: ModelType, source: str) -> int | None:
    """The attention window of every layer (None: full attention), as transformers decides it."""
    if kind.window == "mistral":
        return known["sliding_window"]
    if kind.window == "none":
        return None
    window = known["sliding_window"] if known["use_sliding_window"] else None
    n_layer, first = known["num_hidden_layers"], known["max_window_layers"]
    types = known["layer_types"] or ["sliding_attention" if window is not None and i >= first else "full_attention"
                                     for i in range(n_layer)]
    if window is None or "sliding_attention" not in types:
        return None
    if set(types) != {"sliding_attention"}:
        raise ConfigError(
            f"{source}: sliding-window attention on some layers only (layer_types {types}; use_sliding_window=true with "
            f"max_window_layers={first} of num_hidden_layers={n_layer}) is not supported yet; lmforge applies one "
            f"window to every layer (max_window_layers=0) or none (use_sliding_window=false)"
        )
    return window


def config_to_hf(config: Any) -> dict[str, Any]:
    """The config.json keys transformers' {Llama,Mistral,Qwen2,Qwen3}ForCausalLM reads, in the form
    the installed transformers (v5) writes them (rope_parameters); extra keys are kept."""
    kind = MODEL_TYPES[config.family]
    check_representable(config, kind)
    d = dict(config.extra)
    d["architectures"] = d.get("architectures") or [f"{kind.prefix}ForCausalLM"]
    d.update({key: getattr(config, name) for key, name in CONFIG_KEYS.items()})
    d.update(intermediate_size=config.inner_dim, num_key_value_heads=config.n_kv_heads)
    if "head_dim" in kind.keys or config.head_dim * config.n_head != config.n_embd:
        d["head_dim"] = config.head_dim
    if "attention_bias" in kind.keys:
        d["attention_bias"] = config.has_bias("qkv")
    if "mlp_bias" in kind.keys:
        d["mlp_bias"] = config.has_bias("mlp")
    rope = {"rope_theta": float(config.rope_theta), "rope_type": "default"}
    d["rope_parameters"] = {**config.rope_scaling, "rope_theta": float(config.rope_theta)} if config.rope_scaling else rope
    window = config.sliding_window
    if kind.window == "mistral":
        d["sliding_window"] = window
    elif kind.window == "qwen":
        d.update(use_sliding_window=window is not None, sliding_window=window,
                 layer_types=["sliding_attention" if window is not None else "full_attention"] * config.n_layer)
        d["max_window_layers"] = 0 if window is not None else d.get("max_window_layers", kind.keys["max_window_layers"])
    return d


def check_representable(config: Any, kind: ModelType) -> None:
    """ConfigError when transformers' class for `kind` cannot hold the model `config` describes."""
    qkv, proj, mlp = (config.has_bias(p) for p in ("qkv", "proj", "mlp"))
    problems = [f"{name}={getattr(config, name)!r} (needs {want!r})" for name, want in
                (("norm", "rmsnorm"), ("positions", "rope"), ("mlp", "gated"), ("scale_attn_weights", True),
                 ("scale_attn_by_inverse_layer_idx", False), ("qk_norm", kind.qk_norm)) if getattr(config, name) != want]
    if "attention_bias" in kind.keys:
        if qkv != proj:
            problems.append(f"q/k/v bias {qkv} but output projection bias {proj} (one attention_bias covers both)")
    elif (qkv, proj) != (kind.qkv_bias, False):
        problems.append(f"q/k/v bias {qkv} and output projection bias {proj} (needs {kind.qkv_bias} and False)")
    if mlp and "mlp_bias" not in kind.keys:
        problems.append("MLP biases (it has none)")
    if config.sliding_window is not None and kind.window == "none":
        problems.append(f"sliding_window={config.sliding_window} (it attends to every position)")
    if problems:
        raise ConfigError(f"cannot write a {config.family!r} config.json: transformers' {kind.prefix}ForCausalLM has no "
                          f"{'; no '.join(problems)}; choose the family whose architecture this is")


# ---- tensors ---------------------------------------------------------------------------------------


def name_from_hf(key: str, config: Any) -> str | None:
    """lmforge's name for a tensor of a Llama-family checkpoint (wrapper prefixes already removed):
    q/k/v_proj all name their fused attn.c_attn, gate/up_proj their mlp.c_fc; None for a rotary
    buffer or a tied LM head. Names lmforge does not know come back as they are."""
    return locate(key, config)[0]


def locate(key: str, config: Any) -> tuple[str | None, int | None]:
    """name_from_hf(key), and for a part of a fused tensor (q_proj, ...) its place among the parts."""
    if ROTARY_BUFFER.search(key) or (key == "lm_head.weight" and omits_tied_head(config)):
        return None, None
    key = key if key.startswith(("model.", *HEADS)) else "model." + key
    if key in OUTSIDE_LAYERS:
        return OUTSIDE_LAYERS[key], None
    m = HF_LAYER.fullmatch(key)
    if m is None:
        return key, None
    layer, rest = m.groups()
    if rest in PART_OF:
        fused, index = PART_OF[rest]
        return f"transformer.h.{layer}.{fused}", index
    return (f"transformer.h.{layer}.{LAYER_NAMES[rest]}" if rest in LAYER_NAMES else key), None


def state_from_hf(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """A Llama-family state dict in lmforge's names: q/k/v and gate/up rows concatenated (each part
    checked against the config's shapes first), rotary buffers and a tied head dropped."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for key, tensor in state.items():
        name, index = locate(key, config)
        if name is None:
            continue
        if index is None:
            out[name] = tensor
            continue
        expected = fused_part_shapes(config, OURS_LAYER.fullmatch(name).group(2))[index]
        if tuple(tensor.shape) != expected:
            raise CheckpointError(f"tensor {key!r} has shape {tuple(tensor.shape)}, but the config implies {expected} "
                                  f"({_shape_summary(config)})")
        parts.setdefault(name, {})[index] = tensor
    for name, found in parts.items():
        layer, fused = OURS_LAYER.fullmatch(name).groups()
        missing = [f"model.layers.{layer}.{p}" for i, p in enumerate(FUSED[fused]) if i not in found]
        if missing:
            raise CheckpointError(f"missing tensors {missing}, needed with the others of {name!r}")
        out[name] = torch.cat([found[i] for i in range(len(FUSED[fused]))])
    return out


def state_to_hf(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """lmforge's state dict in the family's names: fused tensors split back into q/k/v and gate/up
    (views, so bit-exact), no tied duplicate of the embedding."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and omits_tied_head(config):
            continue
        m = OURS_LAYER.fullmatch(name)
        if m is None:
            out[OUTSIDE_LAYERS_TO_HF.get(name, name)] = tensor
            continue
        layer, rest = m.groups()
        prefix = f"model.layers.{layer}."
        if rest in FUSED:
            sizes = [shape[0] for shape in fused_part_shapes(config, rest)]
            out.update({prefix + part: t for part, t in zip(FUSED[rest], tensor.split(sizes))})
        else:
            hf = LAYER_NAMES_TO_HF.get(rest)
            out[prefix + hf if hf else name] = tensor
    return out


def fused_part_shapes(config: Any, fused: str) -> list[tuple[int, ...]]:
    """The shapes of the Hugging Face tensors that make lmforge's fused tensor (one layer)."""
    q, kv, inner, c = config.n_head * config.head_dim, config.n_kv_heads * config.head_dim, config.inner_dim, config.n_embd
    rows = [q, kv, kv] if fused.startswith("attn.") else [inner, inner]
    return [(r, c) if fused.endswith(".weight") else (r,) for r in rows]


def _shape_summary(config: Any) -> str:
    return (f"n_embd={config.n_embd}, n_head={config.n_head}, n_kv_head={config.n_kv_heads}, "
            f"head_dim={config.head_dim}, n_inner={config.inner_dim}")
