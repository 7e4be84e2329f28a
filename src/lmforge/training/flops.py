"""Model FLOP utilisation: the model's training FLOPs per token and the device's measured matmul peak."""

from __future__ import annotations

import time

import torch
from torch import nn


def flops_per_token(model: nn.Module, block_size: int | None) -> float | None:
    """Training FLOPs per token, 6N + 12 L H Q T (PaLM appendix B, as nanoGPT): None if not a GPT."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "n_layer"):
        return None
    n = sum(p.numel() for p in model.parameters())
    t = block_size or cfg.n_positions
    return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * t


_PEAKS: dict[tuple[str, torch.dtype], float] = {}


def matmul_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Measured dense matmul throughput (FLOP/s) of this device and dtype: the denominator of MFU."""
    key = (str(device), dtype)
    if key not in _PEAKS:
        n = 4096 if device.type == "cuda" else 1024
        g = torch.Generator(device).manual_seed(0)  # never touch the global RNG: resumed runs must match
        a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
        for _ in range(2):
            a @ b
        best = float("inf")
        for _ in range(5):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(4):
                a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - t0) / 4)
        _PEAKS[key] = 2 * n**3 / best
    return _PEAKS[key]
