"""Weight-only int8 quantization for inference: every linear layer's weight as int8 plus one scale per row.

The scheme (as gpt-fast and torchao's int8 weight-only): for each output channel (row) i of a weight W
(out, in), s_i = max_j |W_ij| / 127 and q_ij = clamp(round(W_ij / s_i), -127, 127), so |W - q s| <= s / 2
element-wise; a zero row gets s_i = 1 (q = 0, no division by zero). The LM head alone has one scale per
group of HEAD_GROUP_SIZE (32) entries along each row instead (torchao's int8 group_size, llama.cpp's Q8_0
block), where its in_features is a multiple of 32: its error goes straight into the logits, with no norm
or residual to dilute it, and on a small trained model the per-row head alone flipped most of the greedy
choices that int8 changed (benchmarks/generate.py --phases quality; docs/benchmarks.md). llama.cpp's
quantization mixes likewise keep output.weight at a higher precision. Scales are fp32; the bias stays
in the model's float dtype; activations stay in the model's float dtype (fp32, bf16) and the product
y = (x @ q^T) * s + b runs through lmforge.kernels.int8_linear (its compiled CPU kernel rounds x to
int16 per block of 256 entries and multiplies in integers, within 1/65534 of each block's largest
entry; the torch path multiplies in float). quantize_model replaces every
nn.Linear, the LM head included; the token embedding stays float, so its lookup (one row per token) is
exact, and a tied LM head gets its own int8 copy of the embedding matrix (the tie is gone: the head is
int8, the embedding float).

Quantized weights are buffers without gradients: a quantized model is for inference. A forward pass
in training mode with gradients on, or LoRA on a quantized layer, raises TrainingError; train or fine-tune
the float model and quantize afterwards.

Checkpoints (written by lmforge.checkpoint.save_pretrained): each quantized weight is stored as int8
under its usual Hugging Face name and layout (the family's transposes and splits apply), its fp32 scale
beside it as `<name>_scale` (e.g. model.layers.0.self_attn.q_proj.weight_scale; (out,), or (out, in / 32)
for a grouped LM head), the LM head always stored (tied or not), and config.json carries
QUANTIZATION_CONFIG as "quantization_config" ("lm_head_group_size": 32, or null for a per-row head).
Format version 1 (every layer per row, no lm_head_group_size) still loads.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from lmforge.errors import CheckpointError, ConfigError, TrainingError
from lmforge.kernels import dequantize_int8, int8_linear

MODES = ("int8",)
QUANT_METHOD = "lmforge"
HEAD_GROUP_SIZE = 32  # the LM head's scales: one per group of 32 along each row (see above)
# config.json "quantization_config" of an lmforge int8 checkpoint (format_version: of this layout), as
# quantize_model writes it by default; "lm_head_group_size" is null where the head has one scale per row.
QUANTIZATION_CONFIG = {"quant_method": QUANT_METHOD, "weight_dtype": "int8", "granularity": "per_output_channel",
                       "lm_head_group_size": HEAD_GROUP_SIZE, "format_version": 2}
_FORMAT_1 = {"weight_dtype": "int8", "granularity": "per_output_channel", "format_version": 1}  # every layer per row
SCALE_SUFFIX = "weight_scale"  # a quantized layer's scale sits beside its weight: "<...>.weight" + "_scale"


class Int8Linear(nn.Module):
    """y = (x @ weight^T) * weight_scale + bias with an int8 weight (out, in) and fp32 scales (out,), or with
    `group_size` G (dividing in_features) scales (out, in / G), one per group of G entries along each row;
    all buffers; x and y in the model's float dtype. Made from an nn.Linear by from_linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group_size: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        if group_size is not None and (group_size <= 0 or in_features % group_size):
            raise ConfigError(f"int8 group_size {group_size} must be a positive divisor of in_features ({in_features})")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        scale_shape = (out_features,) if group_size is None else (out_features, in_features // group_size)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer(SCALE_SUFFIX, torch.ones(scale_shape, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | None = None) -> "Int8Linear":
        """Symmetric quantization of `linear` per output channel, or per group of `group_size` along each
        row where that divides in_features (else per row), on its device; the float weight is read in
        fp32, so a bf16 weight is quantized exactly as its fp32 value."""
        w = linear.weight.detach()
        group_size = group_size if group_size and linear.in_features % group_size == 0 else None
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size=group_size,
                    dtype=w.dtype, device="meta")
        if w.is_meta:  # a model built on the meta device (a loader about to fill it): shapes and dtypes only
            return layer
        layer.weight, layer.weight_scale = quantize_weight(w, group_size)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer

    def dequantized(self) -> torch.Tensor:
        """q * s as an fp32 (out, in) matrix: the weight this layer multiplies by."""
        return dequantize_int8(self.weight, self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            raise training_refused("a forward pass in training mode")
        return int8_linear(x, self.weight, self.weight_scale, self.bias)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "Int8Linear":
        # model.to(dtype) casts every floating-point buffer; the scales stay fp32 (moved, never rounded).
        scale = self.weight_scale
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = scale.to(self.weight_scale.device)
        return self

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # A checkpoint's weight may come transposed (GPT-2's Conv1D layout): the kernels read rows.
        key = prefix + "weight"
        weight = state_dict.get(key)
        if weight is not None:
            if weight.dtype != torch.int8:
                raise CheckpointError(f"tensor {key!r} is {weight.dtype}, but a quantized layer stores int8 weights "
                                      f"(with {prefix}{SCALE_SUFFIX}); the checkpoint's quantization_config does not "
                                      f"fit its weights")
            state_dict[key] = weight.contiguous()
        scale = state_dict.get(prefix + SCALE_SUFFIX)
        if scale is not None:
            state_dict[prefix + SCALE_SUFFIX] = scale.float()
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        groups = "" if self.group_size is None else f", group_size={self.group_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8{groups}"


def quantize_weight(weight: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s): int8 (out, in) row-major and fp32 scales, (out,) or with `group_size` G (dividing in)
    (out, in / G), with q * s within s / 2 of `weight` element-wise (s: the entry's row's or group's)."""
    out, n_in = weight.shape
    w = weight.float().view(out, 1 if group_size is None else n_in // group_size, -1)
    amax = w.abs().amax(dim=2)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.round(w / scale[..., None]).clamp_(-127, 127).to(torch.int8).view(out, n_in)
    return q.contiguous(), scale.view(out) if group_size is None else scale.contiguous()


def check_mode(mode: str) -> str:
    """`mode` when lmforge implements it; ConfigError naming the supported ones otherwise."""
    if mode not in MODES:
        raise ConfigError(f"quantization mode {mode!r} is not supported; lmforge supports "
                          f"{', '.join(repr(m) for m in MODES)} (weight-only, per-output-channel scales)")
    return mode


def quantize_model(model: nn.Module, mode: str = "int8", head_group_size: int | None = HEAD_GROUP_SIZE) -> nn.Module:
    """Replace every nn.Linear of `model` by an Int8Linear in place (a tied LM head gets its own int8
    copy; embeddings stay float), put it in eval mode (it is for inference) and return it. Scales are per
    output channel, the LM head's (the model's `lm_head`) per group of `head_group_size` along each row
    where that divides its in_features (None: per row too). Layers are replaced one at a time, so peak
    memory is the float model plus one layer. Already quantized layers are left as they are."""
    check_mode(mode)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                is_head = not name and child_name == "lm_head"
                setattr(module, child_name, Int8Linear.from_linear(child, head_group_size if is_head else None))
    return model.eval()


def quantization_config(model: nn.Module) -> dict:
    """config.json's "quantization_config" for a quantized `model`: its LM head's group size as it is."""
    head = getattr(model, "lm_head", None)
    return {**QUANTIZATION_CONFIG, "lm_head_group_size": head.group_size if isinstance(head, Int8Linear) else None}


def model_quantization(model: nn.Module) -> str | None:
    """The mode `model` is quantized in ("int8"), or None when all its linear layers are float."""
    return "int8" if any(isinstance(m, Int8Linear) for m in model.modules()) else None


def checkpoint_quantization(config: Any, source: str = "config.json") -> str | None:
    """The mode a checkpoint's config (its `extra`, where config.json's "quantization_config" lands) says
    its weights are stored in: None for float weights, "int8" for lmforge's format. CheckpointError for
    another scheme (gptq, awq, bitsandbytes, ...) or a later format version."""
    qc = getattr(config, "extra", {}).get("quantization_config")
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    supported = (f"lmforge reads float checkpoints and its own int8 format (quantization_config "
                 f"{QUANTIZATION_CONFIG}); load the original float weights, optionally with quantize=\"int8\"")
    if method != QUANT_METHOD:
        raise CheckpointError(f"{source}: quantization_config names quant_method {method!r}, which lmforge cannot "
                              f"load; {supported}")
    found = {k: qc.get(k) for k in ("weight_dtype", "granularity", "format_version")}
    head_group = qc.get("lm_head_group_size")
    current = found == {k: QUANTIZATION_CONFIG[k] for k in found} and (
        head_group is None or (isinstance(head_group, int) and not isinstance(head_group, bool) and head_group > 0))
    if not current and not (found == _FORMAT_1 and "lm_head_group_size" not in qc):
        raise CheckpointError(f"{source}: quantization_config {qc} is not a layout this lmforge version reads; "
                              f"{supported}")
    return found["weight_dtype"]


def checkpoint_head_group_size(config: Any) -> int | None:
    """The LM head's group size a quantized checkpoint's config records (None: one scale per row, as in
    format version 1); call after checkpoint_quantization has accepted the config."""
    return getattr(config, "extra", {}).get("quantization_config", {}).get("lm_head_group_size")


def omits_tied_head(config: Any) -> bool:
    """Whether a checkpoint of `config` leaves the LM head out as the embedding's tied copy: a tied float
    model does; a quantized one stores its int8 head (families use this for "lm_head.weight")."""
    return bool(config.tie_word_embeddings) and "quantization_config" not in getattr(config, "extra", {})


def is_scale(name: str) -> bool:
    """Whether a state-dict name (lmforge's or Hugging Face's) is a quantization scale: those stay fp32
    whatever dtype the model is loaded in."""
    return name.endswith("." + SCALE_SUFFIX)


def training_refused(what: str) -> TrainingError:
    """The error for training (or adapting) a quantized model."""
    return TrainingError(f"{what}: this model is quantized (int8 weight-only) and quantized models are for inference "
                         f"(their weights are int8 buffers without gradients); train or fine-tune the float model "
                         f"(load it without quantize=) and quantize it afterwards")
