"""Batch sources for the trainer: objects with next_batch(), state_dict() and load_state_dict().

A source yields one micro-batch per call as a dict of CPU tensors in the trainer's convention:
`input_ids` (B, T) and `labels` (B, T), where labels[t] is the target of position t (the next token,
as nanoGPT's y) and -100 marks positions without a target. Its state_dict is its position, so a
resumed run continues with exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from lmforge.data import TokenDataset
from lmforge.errors import DataError


class RandomBlocks:
    """Random contiguous blocks of a token split, as nanoGPT's get_batch, with the same global
    batch whatever the number of processes.

    Every rank draws the start positions of the whole global micro-batch (batch_size x world_size
    rows) from one shared seeded generator and keeps its own rows, so 2 processes x 8 rows see the
    same data as 1 process x 16 rows.
    """

    def __init__(self, dataset: TokenDataset, batch_size: int, block_size: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if dataset.world_size != 1:
            raise ValueError("RandomBlocks shares the global batch across ranks itself; pass an unsharded TokenDataset")
        if len(dataset) < block_size + 1:
            raise DataError(f"{dataset.directory}: split {dataset.split!r} has {len(dataset)} tokens, fewer than "
                            f"block_size + 1 = {block_size + 1}; use a smaller --block-size or more data")
        self.dataset, self.batch_size, self.block_size = dataset, batch_size, block_size
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> dict[str, torch.Tensor]:
        n = len(self.dataset.tokens)
        starts = torch.randint(0, n - self.block_size, (self.batch_size * self.world_size,), generator=self.generator)
        mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].numpy()
        rows = np.asarray(self.dataset.tokens[mine[:, None] + np.arange(self.block_size + 1)], dtype=np.int64)
        rows_t = torch.from_numpy(rows)
        return {"input_ids": rows_t[:, :-1].contiguous(), "labels": rows_t[:, 1:].contiguous()}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def fixed_blocks(dataset: TokenDataset, batch_size: int, block_size: int, num_batches: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
    """A zero-argument callable giving the same `num_batches` random blocks at every evaluation,
    so successive validation losses are measured on identical data."""
    def batches() -> Iterator[dict[str, torch.Tensor]]:
        source = RandomBlocks(dataset, batch_size, block_size, seed=seed, rank=rank, world_size=world_size)
        for _ in range(num_batches):
            yield source.next_batch()
    return batches
