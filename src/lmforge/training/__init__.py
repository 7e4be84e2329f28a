"""Training: one loop (Trainer) for pretraining and fine-tuning, its config, optimizer, schedule,
run directory and torchrun/DDP set-up. Recipes (pretraining here, fine-tuning in lmforge.tasks)
build a model, a batch source and a loss, then call Trainer.train()."""

from lmforge.training.config import TrainConfig, read_config_file
from lmforge.training.distributed import DistInfo, init_distributed
from lmforge.training.flops import flops_per_token, matmul_peak_flops
from lmforge.training.optim import learning_rate, make_optimizer, param_groups
from lmforge.training.sources import RandomBlocks, fixed_blocks
from lmforge.training.trainer import Trainer, TrainResult, causal_lm_loss, count_items

__all__ = [
    "TrainConfig", "Trainer", "TrainResult", "causal_lm_loss", "count_items", "read_config_file", "DistInfo",
    "init_distributed", "learning_rate", "make_optimizer", "param_groups", "RandomBlocks", "fixed_blocks",
    "flops_per_token", "matmul_peak_flops",
]
