"""TrainConfig: every knob of a training run, validated, with defaults in one place.

The CLI builds its flags from these fields, a YAML/TOML file may set any of them, and the run
directory stores the resolved values as JSON, so a run can always be read back and resumed.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.config import check_known_fields, checked, load_yaml
from lmforge.errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("fp32", "bf16", "fp16")

# Fields that may change when a run is resumed: they say how long / how observably to run, not
# what is being trained. Any other difference makes --resume refuse.
RESUMABLE_CHANGES = frozenset({
    "max_steps", "max_tokens", "max_time", "eval_interval", "eval_batches", "log_interval", "save_interval",
    "keep_last", "progress", "resume", "device", "compile", "out_dir",
})
# Where the data lay (a run directory or a dataset folder may move): not compared on --resume.
LOCATION_KEYS = frozenset({"data.directory"})
# What data.fingerprint already covers (where the data is and how much of it there is): when both
# configs have a fingerprint, these are not compared. Other data.* keys (which fields, how batched)
# are settings and still must match.
FINGERPRINTED_KEYS = frozenset({"data.directory", "data.train", "data.val", "data.train_tokens", "data.vocab_size",
                                "data.train_examples", "data.truncated"})
# How the run was asked for (e.g. the --data paths), kept so --resume can reuse it: not compared.
INFORMATIONAL_PREFIXES = ("recipe.",)


@checked
@dataclass
class TrainConfig:
    """One training run. Batch sizes are per process: the global batch of one optimizer step is
    batch_size x grad_accum x world_size rows."""

    out_dir: str = "runs/default"
    # when to stop (the first reached)
    max_steps: int = 2000
    max_tokens: int | None = None
    max_time: float | None = None  # seconds
    # batch
    batch_size: int = 12
    grad_accum: int = 1
    block_size: int | None = None  # tokens per row for pretraining; None: the model's context
    # optimizer and schedule: AdamW, linear warmup then decay to min_lr
    lr: float = 6e-4
    min_lr: float | None = None  # None: lr / 10
    warmup_steps: int = 100
    lr_decay_steps: int | None = None  # None: max_steps
    schedule: str = "cosine"
    weight_decay: float = 0.1
    decay_embeddings: bool = True  # nanoGPT decays the token/position embeddings; biases and LayerNorm never
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 turns clipping off
    # observability and checkpoints
    eval_interval: int = 250
    eval_batches: int = 20
    log_interval: int = 10
    save_interval: int | None = None  # None: every eval_interval
    keep_last: int = 2
    best_metric: str | None = None  # e.g. "val_loss" or a key returned by eval_fn
    best_mode: str = "min"
    progress: bool = True
    # numerics and speed
    dtype: str = "fp32"  # autocast: bf16 (CPU/GPU) or fp16 (CUDA, with a gradient scaler); weights stay fp32
    compile: bool = False
    grad_checkpointing: bool = False
    fsdp: bool = False
    seed: int = 1337
    device: str = "auto"
    resume: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(self.max_steps >= 0, f"max_steps={self.max_steps} must be >= 0")
        need(self.max_tokens is None or self.max_tokens > 0, f"max_tokens={self.max_tokens} must be positive")
        need(self.max_time is None or self.max_time > 0, f"max_time={self.max_time} must be positive (seconds)")
        need(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        need(self.grad_accum >= 1, f"grad_accum={self.grad_accum} must be >= 1")
        need(self.block_size is None or self.block_size >= 1, f"block_size={self.block_size} must be >= 1")
        need(self.lr > 0, f"lr={self.lr} must be positive")
        need(self.min_lr is None or 0 <= self.min_lr <= self.lr, f"min_lr={self.min_lr} must be in [0, lr={self.lr}]")
        need(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0")
        need(self.lr_decay_steps is None or self.lr_decay_steps >= 1, f"lr_decay_steps={self.lr_decay_steps} must be >= 1")
        need(self.schedule in SCHEDULES, f"schedule={self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        need(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"beta1={self.beta1}, beta2={self.beta2} must be in [0, 1)")
        need(self.grad_clip >= 0, f"grad_clip={self.grad_clip} must be >= 0 (0 turns clipping off)")
        need(self.eval_interval >= 1, f"eval_interval={self.eval_interval} must be >= 1")
        need(self.eval_batches >= 0, f"eval_batches={self.eval_batches} must be >= 0 (0 skips evaluation)")
        need(self.log_interval >= 1, f"log_interval={self.log_interval} must be >= 1")
        need(self.save_interval is None or self.save_interval >= 1, f"save_interval={self.save_interval} must be >= 1")
        need(self.keep_last >= 1, f"keep_last={self.keep_last} must be >= 1")
        need(self.best_mode in ("min", "max"), f"best_mode={self.best_mode!r}: use 'min' or 'max'")
        need(self.dtype in DTYPES, f"dtype={self.dtype!r}: use one of {', '.join(DTYPES)}")

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    @property
    def checkpoint_every(self) -> int:
        return self.save_interval or self.eval_interval

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "training config") -> "TrainConfig":
        check_known_fields(cls, d, f"{where}: unknown key")
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A flat mapping of option names from a .yaml/.yml, .toml or .json file (dashes or underscores)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            data = load_yaml(text) or {}  # YAML 1.2 numbers: `lr: 1e-3` is a number
        elif path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file {path}: unknown format {path.suffix!r}; use .yaml, .toml or .json")
    except ConfigError:
        raise
    except Exception as e:  # each parser has its own error type; all mean "not valid in this format"
        raise ConfigError(f"config file {path} does not parse as {path.suffix[1:].upper()}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value, not {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two resolved run configs (nested dicts are walked),
    ignoring the options in RESUMABLE_CHANGES and where things are (LOCATION_KEYS): a run directory
    or a dataset may move. Data is compared by what it is: when both configs give data.fingerprint,
    the data.* keys that describe the same data (FINGERPRINTED_KEYS) are not compared. A key the saved config
    does not have at all was added by a later lmforge (e.g. model.family): the saved run ran with
    that key's default, so a run made by an earlier version still resumes."""
    a, b = _flatten(saved), _flatten(current)
    by_fingerprint = "data.fingerprint" in a and "data.fingerprint" in b
    keys = {k for k in a if k.rsplit(".", 1)[-1] not in RESUMABLE_CHANGES and k not in LOCATION_KEYS
            and not k.startswith(INFORMATIONAL_PREFIXES)
            and not (by_fingerprint and k in FINGERPRINTED_KEYS)}
    return {k: (a.get(k), b.get(k)) for k in sorted(keys) if a.get(k) != b.get(k)}


def check_metric_name(name: str | None, available: list[str], where: str = "best_metric") -> None:
    """Refuse a metric name the run will never report (a typo such as val_los) before training
    starts, with a "did you mean"."""
    if name is None or name in available:
        return
    if not available:
        raise ConfigError(f"{where}={name!r}: this run reports no validation metrics; give it validation data "
                          f"(and eval_batches > 0), or drop {where}")
    hint = difflib.get_close_matches(name, available, n=1)
    did_you_mean = f"did you mean {hint[0]!r}? " if hint else ""
    raise ConfigError(f"{where}={name!r} is not a validation metric of this run; {did_you_mean}"
                      f"available: {', '.join(available)}")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out
