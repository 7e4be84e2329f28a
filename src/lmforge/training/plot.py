"""The loss / learning-rate picture of a run directory, from its metrics.jsonl: the one loss plot
(`lmforge plot`, the end of pretraining and fine-tuning, `lmforge evaluate perplexity --run-dir`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lmforge._io import atomic_path
from lmforge.errors import DataError
from lmforge.training.checkpointing import METRICS_FILE, RunDir


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: plots go to files and never need a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike) -> None:
    """Write `fig` as a PNG atomically and free it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    pyplot().close(fig)


def read_run_log(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The logged steps of a training run (its metrics.jsonl without the event rows)."""
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise DataError(f"{run.path} is not a directory; give the --out directory of a training run")
    if not run.metrics_file.is_file():
        if (run.path / "config.json").is_file() and (run.path.parent / METRICS_FILE).is_file():
            raise DataError(f"{run.path} is a model saved by a training run; plot the run itself: "
                            f"lmforge plot {run.path.parent}")
        if (run.path / "config.json").is_file():
            raise DataError(f"{run.path} is a model directory, not a training run (it has no {METRICS_FILE}); "
                            "give the --out directory of a training run")
        raise DataError(f"{run.path}: no training log found (no {METRICS_FILE}); "
                        "give the --out directory of a training run")
    return [r for r in run.read_metrics() if isinstance(r, dict) and "event" not in r]


def plot_run(run_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Path:
    """Write a PNG of train/val loss against steps and against tokens, and the learning rate
    against steps (the panels whose values the log has). Default path: RUN_DIR/loss.png. Returns the path."""
    run = RunDir(run_dir)
    rows = read_run_log(run.path)
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    if not train and not val:
        raise DataError(f"{run.metrics_file}: no loss values logged yet; nothing to plot")
    xs = ["step"] + (["tokens"] if all("tokens" in r for r in train + val) else [])
    lr = [r for r in train if "lr" in r]
    n = len(xs) + bool(lr)
    plt = pyplot()
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4.2), squeeze=False)
    for ax, x in zip(axes[0], xs):
        if train:
            ax.plot([r[x] for r in train], [r["loss"] for r in train], label="train loss", lw=1.2)
        if val:
            ax.plot([r[x] for r in val], [r["val_loss"] for r in val], "o-", label="val loss", ms=3)
        ax.set_xlabel(x)
        ax.set_ylabel("loss (nats/token)")
        ax.set_title("loss by optimizer step" if x == "step" else "loss by tokens seen")
        ax.grid(alpha=0.3)
        ax.legend()
    if lr:
        ax = axes[0][-1]
        ax.plot([r["step"] for r in lr], [r["lr"] for r in lr], color="tab:green")
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate")
        ax.set_title("learning-rate schedule")
        ax.grid(alpha=0.3)
    fig.suptitle(f"run: {run.path.resolve().name}")
    fig.tight_layout()
    path = Path(path) if path is not None else run.path / "loss.png"
    save_figure(fig, path)
    return path
