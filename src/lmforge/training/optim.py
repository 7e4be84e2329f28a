"""AdamW with weight-decay groups, and the learning-rate schedule as a pure function of the step."""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.training.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = True) -> list[dict]:
    """Two AdamW groups: matrices decay; biases and LayerNorm weights (and, when asked, embeddings)
    do not. Frozen parameters (requires_grad=False, e.g. a LoRA base) are left out; a tied weight
    counts once."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = id(p) in embeddings
        if p.dim() >= 2 and (decay_embeddings or not is_embedding):
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, as PyTorch's fused kernel on CPU and CUDA: one kernel for
    every tensor. (On CPU, PyTorch's default is a Python loop over the tensors, a dozen operations per
    tensor per step: most of a small model's optimizer time. transformers' Trainer also defaults to
    the fused kernel.)"""
    groups = [g for g in param_groups(model, config.weight_decay, config.decay_embeddings) if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False)")
    extra = {"fused": True} if device.type in ("cpu", "cuda") else {}
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), **extra)


def learning_rate(step: int, config: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup from lr/warmup to lr,
    then cosine (or linear) decay to min_lr at lr_decay_steps, constant after."""
    lr, final = config.lr, config.final_lr
    if step < config.warmup_steps:
        return lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return lr
    decay_steps = config.lr_decay_steps or config.max_steps
    if step >= decay_steps or decay_steps <= config.warmup_steps:
        return final
    progress = (step - config.warmup_steps) / (decay_steps - config.warmup_steps)
    if config.schedule == "linear":
        return lr + progress * (final - lr)
    return final + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - final)
