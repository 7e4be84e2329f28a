"""Device and dtype choice. Both are always arguments; nothing here is global state."""

from __future__ import annotations

import torch

from lmforge.errors import ConfigError

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """`"auto"` (or None) picks cuda, then mps, then cpu; anything else is passed to torch."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from e


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Accept a torch dtype or a name such as "bf16"; None means "keep what the checkpoint has"."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key == "auto":
        return None
    if key not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: use one of float32, bfloat16, float16 (or fp32, bf16, fp16)")
    return _DTYPES[key]
