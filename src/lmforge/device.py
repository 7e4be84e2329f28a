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
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from e
    check_available(chosen)
    return chosen


def check_available(device: torch.device) -> None:
    """ConfigError when `device` is not there (a CUDA device on a CPU-only torch or machine, a GPU index
    past the last), rather than torch's AssertionError or a CUDA error on first use."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES)")
            raise ConfigError(f"device {str(device)!r} is not available: {why} (torch {torch.__version__}); "
                              f"use 'cpu' or 'auto' (--device cpu)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device {str(device)!r} is not available: this machine has {count} CUDA device(s), "
                              f"cuda:0..cuda:{count - 1}")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"device 'mps' is not available on this machine (torch {torch.__version__}); "
                              f"use 'cpu' or 'auto' (--device cpu)")


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
