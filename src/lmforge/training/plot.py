"""The loss / learning-rate picture of a run directory, from its metrics.jsonl."""

from __future__ import annotations

import os
from pathlib import Path

from lmforge.errors import DataError
from lmforge.training.checkpointing import RunDir


def plot_run(run_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Path:
    """Write a PNG of train/val loss against steps and against tokens, and the learning rate
    against steps. Default path: RUN_DIR/loss.png. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise DataError(f"{run.path} is not a directory; give the --out directory of a training run")
    rows = [r for r in run.read_metrics() if "event" not in r]
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    if not train and not val:
        raise DataError(f"{run.metrics_file}: no loss values logged yet; nothing to plot")
    path = Path(path) if path is not None else run.path / "loss.png"

    fig, (by_step, by_tokens, lr) = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, x in ((by_step, "step"), (by_tokens, "tokens")):
        if train:
            ax.plot([r[x] for r in train], [r["loss"] for r in train], label="train loss", lw=1.2)
        if val:
            ax.plot([r[x] for r in val], [r["val_loss"] for r in val], "o-", label="val loss", ms=3)
        ax.set_xlabel(x)
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    by_step.set_title("loss by optimizer step")
    by_tokens.set_title("loss by tokens seen")
    if train and "lr" in train[0]:
        lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:green")
    lr.set_xlabel("step")
    lr.set_ylabel("learning rate")
    lr.set_title("learning-rate schedule")
    lr.grid(alpha=0.3)
    fig.suptitle(f"run: {run.path.resolve().name}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
