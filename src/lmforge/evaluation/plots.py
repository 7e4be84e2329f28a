"""The plots of an evaluation: a confusion matrix, perplexity by context length. (A training run's
loss curves are lmforge.training.plot.plot_run.)"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from lmforge.evaluation.run import perplexity_by_context
from lmforge.training.plot import pyplot, save_figure


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], labels: Sequence[Any], path: str | os.PathLike) -> None:
    """A heat map of counts, rows = reference label, columns = predicted label."""
    plt = pyplot()
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * n, 1.0 + 0.8 * n))
    im = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), [str(x) for x in labels], rotation=45, ha="right")
    ax.set_yticks(range(n), [str(x) for x in labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    peak = max((v for r in matrix for v in r), default=0)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(matrix[i][j]), ha="center", va="center",
                    color="white" if matrix[i][j] > peak / 2 else "black")
    fig.colorbar(im, ax=ax)
    ax.set_title("confusion matrix")
    save_figure(fig, path)


def plot_perplexity_by_context(context_length: torch.Tensor, token_nll: torch.Tensor, path: str | os.PathLike) -> None:
    """Perplexity against the number of context tokens: how much the model uses its context."""
    plt = pyplot()
    bins = perplexity_by_context(context_length, token_nll)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([b["context_from"] for b in bins], [b["perplexity"] for b in bins], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xticks([b["context_from"] for b in bins], [str(b["context_from"]) for b in bins])
    ax.minorticks_off()
    ax.set_xlabel("tokens of context (bin start)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"perplexity by context length ({int(token_nll.numel())} tokens)")
    ax.grid(True, alpha=0.3)
    save_figure(fig, path)
