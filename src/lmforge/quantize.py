"""Weight-only int8 quantization for inference: every linear layer's weight as int8 plus one scale per row.

The scheme (as gpt-fast and torchao's int8 weight-only): for each output channel (row) i of a weight W
(out, in), s_i = max_j |W_ij| / 127 and q_ij = clamp(round(W_ij / s_i), -127, 127), so |W - q s| <= s / 2
element-wise; a zero row gets s_i = 1 (q = 0, no division by zero). Scales are fp32; the bias stays
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
beside it as `<name>_scale` (e.g. model.layers.0.self_attn.q_proj.weight_scale), the LM head always
stored (tied or not), and config.json carries QUANTIZATION_CONFIG as "quantization_config".
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from lmforge.errors import CheckpointError, ConfigError, TrainingError
from lmforge.kernels import int8_linear

MODES = ("int8",)
QUANT_METHOD = "lmforge"
# config.json "quantization_config" of an lmforge int8 checkpoint (format_version: of this layout).
QUANTIZATION_CONFIG = {"quant_method": QUANT_METHOD, "weight_dtype": "int8", "granularity": "per_output_channel",
                       "format_version": 1}
SCALE_SUFFIX = "weight_scale"  # a quantized layer's scale sits beside its weight: "<...>.weight" + "_scale"


class Int8Linear(nn.Module):
    """y = (x @ weight^T) * weight_scale + bias with an int8 weight (out, in) and fp32 scales (out,),
    all buffers; x and y in the model's float dtype. Made from an nn.Linear by from_linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer(SCALE_SUFFIX, torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        """Symmetric per-output-channel quantization of `linear` (on its device; the float weight is read
        in fp32, so a bf16 weight is quantized exactly as its fp32 value)."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype=w.dtype, device="meta")
        if w.is_meta:  # a model built on the meta device (a loader about to fill it): shapes and dtypes only
            return layer
        layer.weight, layer.weight_scale = quantize_weight(w)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer

    def dequantized(self) -> torch.Tensor:
        """q * s as an fp32 (out, in) matrix: the weight this layer multiplies by."""
        return self.weight.float() * self.weight_scale[:, None]

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
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s): int8 (out, in) row-major and fp32 (out,) with q * s within s / 2 of `weight` element-wise."""
    w = weight.float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale


def check_mode(mode: str) -> str:
    """`mode` when lmforge implements it; ConfigError naming the supported ones otherwise."""
    if mode not in MODES:
        raise ConfigError(f"quantization mode {mode!r} is not supported; lmforge supports "
                          f"{', '.join(repr(m) for m in MODES)} (weight-only, per-output-channel scales)")
    return mode


def quantize_model(model: nn.Module, mode: str = "int8") -> nn.Module:
    """Replace every nn.Linear of `model` by an Int8Linear in place (a tied LM head gets its own int8
    copy; embeddings stay float), put it in eval mode (it is for inference) and return it. Layers are
    replaced one at a time, so peak memory is the float model plus one layer. Already quantized layers
    are left as they are."""
    check_mode(mode)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear.from_linear(child))
    return model.eval()


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
    if found != {k: QUANTIZATION_CONFIG[k] for k in found}:
        raise CheckpointError(f"{source}: quantization_config {qc} is not a layout this lmforge version reads; "
                              f"{supported}")
    return found["weight_dtype"]


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
