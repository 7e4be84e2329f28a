"""`lmforge pretrain` and `lmforge plot`: causal-LM pretraining, and the loss picture of a run.

    lmforge pretrain --out runs/demo --max-time 120                # embedded corpus, char-level, baby GPT
    lmforge pretrain --data input.txt --model baby --block-size 64 --out runs/shakespeare
    torchrun --nproc_per_node 2 -m lmforge pretrain --data DATASET_DIR --model gpt2 --out runs/gpt2
    lmforge plot runs/demo

Every TrainConfig field is a flag (defaults live only in TrainConfig); --config FILE (.yaml, .toml,
.json) sets any of them, and flags given on the command line win over the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

from lmforge.config import checked

_HELP = {
    "out_dir": "run directory: config, metrics.jsonl, checkpoints, final model/, loss.png",
    "max_steps": "optimizer steps to run", "max_tokens": "stop after this many training tokens",
    "max_time": "stop after this many seconds", "batch_size": "rows per micro-batch per process",
    "grad_accum": "micro-batches per optimizer step (global batch = batch x accum x processes)",
    "block_size": "tokens per row (default: the model's context)", "lr": "peak learning rate",
    "min_lr": "final learning rate (default: lr/10)", "warmup_steps": "linear warmup steps",
    "lr_decay_steps": "steps until min_lr (default: max_steps)", "schedule": "cosine | linear | constant",
    "weight_decay": "AdamW weight decay of matrices", "decay_embeddings": "decay the embedding matrices too",
    "beta1": "AdamW beta1", "beta2": "AdamW beta2", "grad_clip": "clip the gradient norm (0: off)",
    "eval_interval": "evaluate every N steps", "eval_batches": "validation batches per evaluation (0: none)",
    "log_interval": "log train loss every N steps", "save_interval": "checkpoint every N steps (default: eval_interval)",
    "keep_last": "checkpoints to keep", "best_metric": "save RUN/best when this validation metric improves",
    "best_mode": "min | max for --best-metric", "progress": "show a progress bar",
    "dtype": "fp32 | bf16 (autocast, CPU and GPU) | fp16 (CUDA, gradient scaler)", "compile": "torch.compile the model",
    "grad_checkpointing": "recompute activations in backward to save memory", "fsdp": "shard with FSDP2 under torchrun",
    "seed": "random seed", "device": "auto | cpu | cuda | cuda:N | mps", "resume": "continue the run in --out",
}


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, all defaulting to None (= TrainConfig's default or the file's)."""
    from lmforge.training import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--out" if f.name == "out_dir" else "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        text = f"{_HELP.get(f.name, f.name)} (default: {f.default})"
        if kind is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
            p.add_argument(flag, dest=f.name, type=base, default=None, help=text)
    p.add_argument("--config", metavar="FILE", help="YAML / TOML / JSON file of the same options (flags win)")


def train_config_from_args(args: argparse.Namespace):
    """TrainConfig from flags over --config FILE over TrainConfig's defaults. With --resume, the run's
    own RUN/config.json takes the place of the defaults, so a run resumes without retyping its
    options; an option given that differs from it is refused when training starts, unless it only
    says how long or how observably to run (--max-steps, --eval-interval, --device, ...)."""
    from lmforge.training import TrainConfig, read_config_file

    values = read_config_file(args.config) if getattr(args, "config", None) else {}
    if "out" in values:
        values["out_dir"] = values.pop("out")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    recipe = {k: values.pop(k) for k in list(values) if k not in fields and k in RECIPE_KEYS}
    recipe = _typed_recipe(recipe, args)
    for name in fields:
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    saved = _saved_run(values) if values.get("resume") else None
    if saved is not None:
        run_train = {k: v for k, v in saved.get("train", {}).items() if k in fields and k not in ("out_dir", "resume")}
        values = {**run_train, **values}
        saved_recipe = {**saved.get("recipe", {}), "model": saved.get("model_spec")}
        recipe = {**{k: v for k, v in saved_recipe.items() if k in RECIPE_KEYS and k != "data" and v is not None}, **recipe}
    for key, value in recipe.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return TrainConfig.from_dict(values, where=f"config file {args.config}" if getattr(args, "config", None) else "options")


def _saved_run(values: dict) -> dict | None:
    from lmforge.training.checkpointing import RunDir

    return RunDir(values.get("out_dir") or _default_out()).read_config()


def _default_out() -> str:
    from lmforge.training import TrainConfig

    return TrainConfig.out_dir


@checked
@dataclasses.dataclass
class RecipeOptions:
    """The options beside TrainConfig's that a --config file may set, with their types (checked as
    TrainConfig's are: `samples: "2"` is refused, not passed on)."""

    data: str | list[str] | None = None
    model: str | None = None
    tokenizer: str | None = None
    val_fraction: float | None = None
    field: str | None = None
    dropout: float | None = None
    samples: int | None = None
    sample_length: int | None = None


RECIPE_KEYS = tuple(f.name for f in dataclasses.fields(RecipeOptions))


def _typed_recipe(recipe: dict, args: argparse.Namespace) -> dict:
    from lmforge.errors import ConfigError

    try:
        typed = RecipeOptions(**recipe)
    except ConfigError as e:
        raise ConfigError(f"config file {args.config}: {e}") from None
    return {k: getattr(typed, k) for k in recipe}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pretrain", help="pretrain a GPT with the causal-LM loss (single process or torchrun)",
        description="Pretrain on text files, a prepared dataset directory, or (no --data) the Python help "
                    "topics every Python ships with. Then plots the run and prints samples.",
    )
    p.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="prepared dataset directory, or text/JSONL files and globs (default: the embedded corpus)")
    p.add_argument("--model", default=None, metavar="SPEC",
                   help="what to pretrain: a preset name is a new model with random weights (baby, mini, tiny, "
                        "gpt2, ...: here gpt2 is GPT-2's shape, not OpenAI's weights), as is a config .json; any "
                        "other name is a checkpoint directory or Hub name whose weights training continues "
                        "(default: baby)")
    p.add_argument("--tokenizer", default=None,
                   help="for raw text: char (default), byte, or a tokenizer directory / Hub name")
    p.add_argument("--val-fraction", type=float, default=None, help="for raw text: validation share (default: 0.1)")
    p.add_argument("--field", default=None, help="JSONL text field (default: text)")
    p.add_argument("--dropout", type=float, default=None, help="dropout of every layer (default: the model's)")
    p.add_argument("--samples", type=int, default=None, help="samples printed at the end (default: 2)")
    p.add_argument("--sample-length", type=int, default=None, help="tokens per sample (default: 300)")
    add_train_flags(p)
    p.set_defaults(func=run_pretrain)

    q = subparsers.add_parser("plot", help="plot train/val loss and learning rate of a run directory")
    q.add_argument("run_dir", help="the --out directory of a training run")
    q.add_argument("--output", default=None, help="PNG path (default: RUN_DIR/loss.png)")
    q.set_defaults(func=run_plot)


def run_pretrain(args: argparse.Namespace) -> int:
    from lmforge.training.pretrain import pretrain

    config = train_config_from_args(args)
    outcome = pretrain(
        config, data=args.data, model=args.model or "baby", tokenizer=args.tokenizer,
        val_fraction=0.1 if args.val_fraction is None else args.val_fraction, field=args.field or "text",
        dropout=args.dropout, num_samples=2 if args.samples is None else args.samples,
        sample_length=args.sample_length or 300,
    )
    r = outcome.result
    if r.nothing_to_do:
        return 0  # the trainer said "already at max_steps N; nothing to do"
    if outcome.plot is None and not outcome.samples:
        return 0  # not rank 0 under torchrun: rank 0 reports
    shown = ", ".join(f"{k} {v:.4f}" for k, v in r.metrics.items() if k in ("val_loss", "val_ppl"))
    print(f"trained {r.step} steps, {r.tokens:,} tokens in {r.elapsed:.1f} s (stopped by {r.stopped_by}); {shown}")
    for i, text in enumerate(outcome.samples):
        print(f"---------- sample {i + 1} ----------")
        print(text)
    print("-------------------------------")
    print(f"model: {r.model_dir}")
    if outcome.plot:
        print(f"loss plot: {outcome.plot}")
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from lmforge.training.plot import plot_run

    print(plot_run(Path(args.run_dir), args.output))
    return 0
