"""The pretraining recipe: text or a prepared dataset + a model spec -> Trainer -> samples and a plot.

With no data it pretrains on an embedded corpus that every CPython installation carries: the
interactive help topics of the Python documentation (`pydoc_data.topics`, about 0.5 MB of English
prose and code), so the README's first command works offline on a fresh machine.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from lmforge.char_tokenizer import CharTokenizer
from lmforge.model import load_model
from lmforge.config import PRESETS, GPTConfig, preset
from lmforge.data import HEADER_FILE, TokenDataset, dataset_fingerprint, file_sha256, prepare, read_header
from lmforge.errors import ConfigError, DataError
from lmforge.model import GPT
from lmforge.tokenizer import Tokenizer, TokenizerBase
from lmforge.training import distributed as D
from lmforge.training.checkpointing import RunDir
from lmforge.training.config import TrainConfig, check_metric_name
from lmforge.training.plot import plot_run
from lmforge.training.sources import RandomBlocks, fixed_blocks
from lmforge.training.trainer import RunSession, Trainer, TrainResult

EMBEDDED_CORPUS = "python-help"
DATA_DIR = "data"  # prepared data of a run made from raw text lives in RUN_DIR/data


@dataclass
class PretrainOutcome:
    result: TrainResult
    plot: Path | None
    samples: list[str]


def embedded_corpus(directory: str | os.PathLike) -> Path:
    """Write the Python help topics as JSONL documents (one topic each) and return the file."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        raise DataError("this Python installation has no pydoc_data module (the embedded corpus); pass --data "
                        "FILES with text to train on") from None
    path = Path(directory) / f"{EMBEDDED_CORPUS}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for name in sorted(topics):
            f.write(json.dumps({"text": topics[name].strip() + "\n"}) + "\n")
    return path


def make_tokenizer(spec: str | None, files: Sequence[Path], field: str = "text") -> TokenizerBase:
    """"char" (default): a character vocabulary built from the files; "byte": 256 byte tokens + eos;
    anything else: a tokenizer directory or Hub name (e.g. gpt2)."""
    if spec in (None, "char"):
        return CharTokenizer.train([Path(f) for f in files], field=field)
    if spec == "byte":
        return Tokenizer.byte_level()
    return Tokenizer.from_pretrained(spec)


def resolve_dataset(data: str | Sequence[str] | None, out_dir: Path, tokenizer: str | None, *, val_fraction: float,
                    field: str, dist: D.DistInfo, resume: bool, saved: dict[str, Any] | None = None) -> Path:
    """A prepared dataset directory: `data` itself when it is one, else raw text prepared into
    RUN_DIR/data (by rank 0; the others wait).

    Resuming (`saved` is the run's config): no `data` means the run's own data (RUN_DIR/data, or
    the prepared directory it was trained on); raw text is checked against what RUN_DIR/data was
    prepared from, by content, and refused when it differs; a prepared directory is compared by
    fingerprint when the trainer starts.
    """
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data or [])
    if len(items) == 1 and (Path(items[0]) / HEADER_FILE).is_file():
        if tokenizer is not None:
            raise ConfigError(f"--tokenizer applies to raw text; {items[0]} is already prepared with its own tokenizer")
        return Path(items[0])
    target = out_dir / DATA_DIR
    if resume and saved is not None:
        if (target / HEADER_FILE).is_file():
            if items:
                _check_same_sources(items, target, out_dir)
            return target
        if not items:
            was = Path(str(saved.get("data", {}).get("directory", "")))
            if was.parts and (was / HEADER_FILE).is_file():
                return was
            raise DataError(f"--resume: {out_dir} was trained on {was}, which no longer holds a prepared dataset; "
                            f"pass that data with --data")
    if dist.is_main:
        files = items or [embedded_corpus(target / "source")]
        from lmforge.corpus import expand_files

        expanded = expand_files(files)
        tok = make_tokenizer(tokenizer, expanded, field)
        prepare(expanded, tok, target, val_fraction=val_fraction, field=field, show_progress=True)
    D.barrier(dist)
    return target


def _check_same_sources(items: list, prepared: Path, out_dir: Path) -> None:
    """Refuse resuming on text other than what RUN_DIR/data was prepared from (same bytes in the same
    order; the files may have moved)."""
    from lmforge.corpus import expand_files

    files = expand_files(items)
    inputs = read_header(prepared).get("inputs", [])
    same = len(files) == len(inputs) and all(
        f.stat().st_size == i.get("bytes") and ("sha256" not in i or file_sha256(f) == i["sha256"])
        for f, i in zip(files, inputs))
    if not same:
        was = ", ".join(str(i.get("path")) for i in inputs[:3]) + (", ..." if len(inputs) > 3 else "")
        now = ", ".join(map(str, files[:3])) + (", ..." if len(files) > 3 else "")
        raise DataError(f"--resume: {out_dir} was trained on data prepared from {was} ({prepared}), but --data now "
                        f"gives different text ({now}); resume with the same data (or leave out --data), or start "
                        f"a new --out directory")


def build_model(spec: str, vocab_size: int, block_size: int | None, dropout: float | None) -> GPT:
    """A preset name (random init), a config .json (random init), or a checkpoint directory / Hub
    name (its weights: continued pretraining). Presets and configs take the tokenizer's vocab size."""
    overrides: dict[str, Any] = {}
    if dropout is not None:
        overrides.update(embd_pdrop=dropout, attn_pdrop=dropout, resid_pdrop=dropout)
    if spec in PRESETS or spec.endswith(".json"):
        cfg = preset(spec, vocab_size=vocab_size) if spec in PRESETS else GPTConfig.from_json_file(spec)
        if spec.endswith(".json"):
            cfg.vocab_size = max(cfg.vocab_size, vocab_size)  # a config may pad the vocab (e.g. 50304)
        for k, v in overrides.items():
            setattr(cfg, k, v)
        if block_size is not None:
            cfg.n_positions = block_size  # as nanoGPT: a new model's context is the training block
        cfg.__post_init__()
        return GPT(cfg)
    model = load_model(spec, dtype="fp32", device="cpu").train()
    if model.config.vocab_size < vocab_size:
        raise ConfigError(f"--model {spec} has vocab_size {model.config.vocab_size}, smaller than the data's "
                          f"tokenizer ({vocab_size}); prepare the data with the model's tokenizer")
    for block in model.modules():
        if dropout is not None and isinstance(block, torch.nn.Dropout):
            block.p = dropout
    return model


def pretrain(
    config: TrainConfig,
    data: str | Sequence[str] | None = None,
    model: str = "baby",
    tokenizer: str | None = None,
    *,
    val_fraction: float = 0.1,
    field: str = "text",
    dropout: float | None = None,
    num_samples: int = 2,
    sample_length: int = 300,
    plot: bool = True,
) -> PretrainOutcome:
    """Pretrain `model` on `data` (text files / globs, a prepared dataset, or None for the embedded
    corpus) with the causal-LM loss, then plot the run and sample from the final model.

    With config.resume, data None means the run's own data. The run directory is locked for the
    whole call; a call that fails before training starts leaves no folders behind."""
    check_metric_name(config.best_metric, ["val_loss", "val_ppl"] if config.eval_batches > 0 else [])
    dist = D.init_distributed(config.device)
    out_dir = Path(config.out_dir)
    run = RunDir(out_dir)
    with RunSession(run, dist).hold() as session:
        saved = run.read_config() if config.resume else None
        if not (out_dir / DATA_DIR).exists():
            session.made.append(out_dir / DATA_DIR)
        data_dir = resolve_dataset(data, out_dir, tokenizer, val_fraction=val_fraction, field=field, dist=dist,
                                   resume=config.resume, saved=saved)
        recipe = {"data": [str(x) for x in ([data] if isinstance(data, (str, os.PathLike)) else data or [])] or None,
                  "tokenizer": tokenizer, "val_fraction": val_fraction, "field": field, "dropout": dropout}
        if saved is not None and data is None:  # resumed on the run's own data: keep how it was made
            recipe["data"] = saved.get("recipe", {}).get("data")
        return _pretrain(config, data_dir, model, recipe, dist, num_samples=num_samples, sample_length=sample_length,
                         plot=plot)


def _pretrain(config: TrainConfig, data_dir: Path, model: str, recipe: dict[str, Any], dist: D.DistInfo, *,
              num_samples: int, sample_length: int, plot: bool) -> PretrainOutcome:
    out_dir, dropout = Path(config.out_dir), recipe["dropout"]
    train_set = TokenDataset(data_dir, "train")
    tok = train_set.tokenizer
    torch.manual_seed(config.seed)  # the same initial weights for the same seed (DDP then broadcasts rank 0's)
    gpt = build_model(model, train_set.vocab_size, config.block_size, dropout)
    block = config.block_size or gpt.config.n_positions
    if block > gpt.config.n_positions:
        raise ConfigError(f"block_size={block} exceeds the model's context n_positions={gpt.config.n_positions}")
    config = config.replace(block_size=block)
    source = RandomBlocks(train_set, config.batch_size, block, seed=config.seed, rank=dist.rank, world_size=dist.world_size)
    val = _val_source(data_dir, config, block, dist)
    extra = {"model": gpt.config.to_dict(), "model_spec": model,
             "data": {"directory": str(data_dir), "fingerprint": dataset_fingerprint(train_set.header),
                      "train_tokens": len(train_set), "vocab_size": train_set.vocab_size},
             "recipe": recipe}
    trainer = Trainer(gpt, config, source, val, tokenizer=tok, extra_config=extra, dist=dist)
    result = trainer.train()
    plot_path = samples = None
    if dist.is_main:
        plot_path = plot_run(out_dir) if plot else None
        if num_samples and not result.nothing_to_do:
            # trainer.final_model: under FSDP the trained weights are shards; this is the gathered whole
            final = trainer.final_model.to(dist.device)
            samples = sample(final, tok, num_samples, sample_length, seed=config.seed)
    D.shutdown(dist)
    return PretrainOutcome(result, plot_path, samples or [])


def _val_source(data_dir: Path, config: TrainConfig, block: int, dist: D.DistInfo):
    if config.eval_batches == 0:
        return None
    val_set = TokenDataset(data_dir, "val")
    if len(val_set) == 0:
        raise DataError(f"{data_dir}: the validation split is empty; prepare with --val-fraction > 0 "
                        f"(or pass --eval-batches 0 to train without validation)")
    if len(val_set) < block + 1:
        raise DataError(f"{data_dir}: the validation split has {len(val_set)} tokens, fewer than block_size + 1 = "
                        f"{block + 1}; use a larger --val-fraction or a smaller --block-size")
    return fixed_blocks(val_set, config.batch_size, block, config.eval_batches, seed=config.seed + 1,
                        rank=dist.rank, world_size=dist.world_size)


@torch.no_grad()
def sample(model: GPT, tokenizer: TokenizerBase, n: int, length: int, *, seed: int = 0, prompt: str = "") -> list[str]:
    """n samples of `length` new tokens (temperature 0.8, top-k 200, as nanoGPT's sample.py).

    Longer than the context, the model continues from the last half-context of its own text
    (nanoGPT crops the context the same way), so samples may be longer than the training block.
    """
    model.eval()
    start = tokenizer.encode(prompt) if prompt else [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0]
    context = model.config.n_positions
    ids = torch.tensor([start[-(context // 2):]] * n, device=model.device)
    new: list[list[int]] = [[] for _ in range(n)]
    chunk_seed = seed
    while len(new[0]) < length:
        steps = min(length - len(new[0]), context - ids.size(1))
        out = model.generate(ids, max_new_tokens=steps, do_sample=True, temperature=0.8, top_k=200, seed=chunk_seed,
                             min_new_tokens=steps)
        out = out.sequences if hasattr(out, "sequences") else out
        for row, produced in zip(new, out[:, ids.size(1):].tolist()):
            row.extend(produced)
        ids = out[:, -(context // 2):]
        chunk_seed += 1
    return [tokenizer.decode(row, skip_special_tokens=True) for row in new]
