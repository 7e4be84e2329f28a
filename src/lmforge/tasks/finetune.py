"""Fine-tuning recipes: labeled rows (JSONL, CSV or TSV) + a base model -> the shared Trainer -> a
normal model directory.

    finetune_classifier(config, model="gpt2", train="train.jsonl", val="val.jsonl")   # accuracy / macro F1
    finetune_sft(config, model="gpt2", train=..., val=..., task="translation")       # loss on responses only

Both start from a checkpoint, `model=`: an existing directory, else a Hugging Face Hub name (the
rule of every lmforge command: "gpt2" is OpenAI's GPT-2). Random weights only when asked for by
name, `preset=` (offline smoke runs), and then a note says so. Optionally train LoRA adapters
only; the result is saved through the model's save_pretrained, so `lmforge generate`, `evaluate`
and the server load it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence

import torch

from lmforge.config import PRESETS, checked, preset as preset_config
from lmforge.errors import ConfigError, DataError
from lmforge.model import GPT, load_model
from lmforge.tasks.classification import (
    GPTForSequenceClassification, balanced_class_weights, classification_loss, collate_classification,
    encode_texts,
)
from lmforge.tasks.data import Record, ShuffledSource, int_like, read_records, val_batches
from lmforge.tasks.lora import apply_lora, describe_trainable
from lmforge.tasks.sft import CONFIG_KEY, SFTStats, build_sft_examples, collate_sft, make_template, pack_examples
from lmforge.training import distributed as D
from lmforge.training.config import TrainConfig, check_metric_name
from lmforge.training.trainer import Trainer, TrainResult, causal_lm_loss


@checked
@dataclass
class LoRASettings:
    rank: int = 8
    alpha: float = 16.0
    targets: Sequence[str] | None = None  # None: the model family's usual choice (GPT-2: c_attn)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        # Checked here, before any data is read; the width check needs the model (apply_lora).
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"--lora-rank must be an integer >= 1, got {self.rank!r} (try 4, 8 or 16)")
        if not self.alpha > 0:
            raise ConfigError(f"--lora-alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.dropout}")


@dataclass
class FinetuneOutcome:
    result: TrainResult
    notes: list[str] = field(default_factory=list)  # what a user should see: truncation, labels, trainable count
    stats: dict[str, Any] = field(default_factory=dict)
    is_main: bool = True  # False on the other ranks under torchrun: rank 0 alone reports


class Notes(list):
    """Messages for the user, printed to stderr as they come (before training starts) when verbose."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def append(self, text: str) -> None:
        super().append(text)
        if self.verbose:
            print(text, file=sys.stderr, flush=True)


# ---- shared pieces -----------------------------------------------------------------------------


def load_tokenizer(spec: str | None, model_spec: str | None) -> Any:
    """--tokenizer: "byte", a directory / Hub name, or (default) the model's own; a preset (model_spec
    None) has none of its own and takes the byte-level one."""
    from lmforge.tokenizer import Tokenizer

    if spec == "byte" or (spec is None and model_spec is None):
        return Tokenizer.byte_level()
    return Tokenizer.from_pretrained(spec or model_spec)


def base_name(model: str | None, preset: str | None) -> str:
    """The one base of a fine-tuning run: model= (a directory or Hub name) or preset= (random weights)."""
    if (model is None) == (preset is None):
        raise ConfigError("give the base model as model= (a checkpoint directory or Hub name, e.g. 'gpt2') or, "
                          "for random weights, preset= (e.g. 'tiny'); exactly one of them")
    if preset is not None and preset not in PRESETS:
        preset_config(preset)  # fails naming the presets, before any data is read
    return model if model is not None else f"preset:{preset}"


def random_config(preset: str, tok: Any, notes: list[str]) -> Any:
    """The GPTConfig of `preset` sized for the tokenizer, its special ids the tokenizer's; the note
    says that training starts from random weights."""
    config = preset_config(preset, vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    notes.append(f"starting from random weights: preset {preset!r} ({config.n_layer} layers, n_embd {config.n_embd}); "
                 f"to fine-tune a pretrained model pass --model DIR_OR_HUB_NAME")
    return config


def check_vocab(tok: Any, vocab_size: int, model: str, tokenizer: str | None) -> None:
    """The tokenizer must fit the model's embedding: no id past it, and not a much smaller vocabulary
    (a different tokenizer's ids would index the wrong embeddings; padding the embedding up to a
    multiple of 64 or 128, as GPT-2's 50304, is fine)."""
    which = f"--tokenizer {tokenizer}" if tokenizer else f"the tokenizer of --model {model}"
    if tok.vocab_size > vocab_size:
        raise ConfigError(f"{which} has {tok.vocab_size} tokens but --model {model} has an embedding for "
                          f"{vocab_size}; ids past {vocab_size - 1} would not exist. Use the model's own tokenizer "
                          f"(omit --tokenizer) or a base model trained with this tokenizer")
    if vocab_size > -(-tok.vocab_size // 128) * 128:
        raise ConfigError(f"{which} has {tok.vocab_size} tokens but --model {model} was trained with a vocabulary of "
                          f"{vocab_size}: they are not the same tokenizer. Use the model's own tokenizer (omit --tokenizer)")


def check_token_ids(rows: Sequence[Sequence[int]], vocab_size: int, what: str) -> None:
    """Every encoded id must index the model's embedding (a tokenizer can add tokens past its base size)."""
    top = max((max(r) for r in rows if len(r)), default=-1)
    if top >= vocab_size:
        raise DataError(f"{what}: the data encodes to token id {top}, beyond the model's vocabulary of {vocab_size}; "
                        f"the tokenizer does not match the model (use the model's own tokenizer)")


def data_fingerprint(train: str | os.PathLike, val: str | os.PathLike | None) -> str:
    """What the training and validation files hold, not where they lie: a resumed run compares it
    (the files may move, or the run directory; other data under the same name is refused)."""
    from lmforge.data import file_sha256

    ident = {"train": file_sha256(train), "val": file_sha256(val) if val else None}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def check_best_metric(config: TrainConfig, val: str | None, metrics: Sequence[str] = ()) -> None:
    """A best_metric the run will never report (`val_los`) fails before any data or model is read."""
    validated = val is not None and config.eval_batches > 0
    check_metric_name(config.best_metric, ["val_loss", "val_ppl", *metrics] if validated else [])


def table_labels(records: Sequence[Record], field_name: str) -> None:
    """A CSV/TSV label column of whole numbers ("0", "1") holds class ids, as the integers of a JSONL
    file do: convert them, so the same data in either format trains the same classifier."""
    if records and records[0].table and all(int_like(r.row[field_name]) for r in records):
        for r in records:
            r.row[field_name] = int(r.row[field_name])


def _label_key(label: Any, where: str) -> Hashable:
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise DataError(f"{where}: label {label!r} must be a string or an integer (class name or id)")
    return label


def _label_set(records: Sequence[Record], field_name: str) -> list[Hashable]:
    labels = {}
    for r in records:
        labels.setdefault(_label_key(r.row[field_name], r.where), r.where)
    kinds = {type(x) for x in labels}
    if len(kinds) > 1:
        raise DataError(f"labels mix strings and integers ({sorted(map(repr, labels))[:6]}); use one kind, "
                        f"e.g. {records[0].path}:{records[0].line}")
    return sorted(labels)


def _check_val_labels(train_labels: list[Hashable], val: Sequence[Record], field_name: str, train_path: str) -> None:
    known = set(train_labels)
    seen = set()
    for r in val:
        label = _label_key(r.row[field_name], r.where)
        if label not in known:
            raise DataError(f"{r.where}: label {label!r} does not occur in the training data {train_path} "
                            f"(train labels: {train_labels}); the label sets of --train and --val must be the same")
        seen.add(label)
    if seen != known:
        missing = sorted(known - seen, key=str)
        raise DataError(f"--val {val[0].path}: has no example of label(s) {missing} that --train {train_path} has; "
                        f"the label sets of --train and --val must be the same")


def _maybe_lora(model: torch.nn.Module, lora: LoRASettings | None, base: str, notes: list[str]) -> torch.nn.Module:
    if lora is not None:
        model = apply_lora(model, lora.rank, lora.alpha, lora.targets, lora.dropout, base_model=base)
        notes.append(f"LoRA rank {lora.rank}, alpha {lora.alpha} on {len(model.lora_settings['modules'])} modules "
                     f"({', '.join(model.lora_settings['targets'])})")
    notes.append(describe_trainable(model))
    return model


def _finish(config: TrainConfig, dist: D.DistInfo, plot: bool, notes: list[str]) -> None:
    if plot and dist.is_main:
        from lmforge.training.plot import plot_run

        notes.append(f"loss plot: {plot_run(config.out_dir)}")
    D.shutdown(dist)


def recipe_of(**options: Any) -> dict[str, Any]:
    """How the run was asked for (paths, fields, templates, LoRA), saved in RUN/config.json so that
    `--resume` can take them from there; informational (what the run is, is compared elsewhere)."""
    lora = options.pop("lora", None)
    out = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in options.items()}
    if not isinstance(out.get("class_weights"), (str, type(None))):
        out["class_weights"] = [float(x) for x in out["class_weights"]]
    out["lora"] = None if lora is None else {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout,
                                             "targets": list(lora.targets) if lora.targets else None}
    return out


# ---- classification ----------------------------------------------------------------------------

# The validation metrics a classifier reports besides val_loss / val_ppl (best_metric may name one).
CLASSIFIER_METRICS = ("accuracy", "macro_f1")


def finetune_classifier(
    config: TrainConfig, model: str | None, train: str, val: str | None = None, *, text_field: str = "text",
    label_field: str = "label", tokenizer: str | None = None, class_weights: str | Sequence[float] | None = None,
    lora: LoRASettings | None = None, max_length: int | None = None, eval_limit: int | None = None,
    group_by_length: bool = False, verbose: bool = True, plot: bool = True, preset: str | None = None,
) -> FinetuneOutcome:
    """Train a sequence classifier on `model` (a checkpoint directory or Hub name), or on random
    weights of `preset`: labels from the data, accuracy and macro F1 on val after every evaluation,
    the best (by accuracy unless config.best_metric says otherwise) kept in RUN/best."""
    from lmforge import metrics

    base = base_name(model, preset)
    check_best_metric(config, val, CLASSIFIER_METRICS)
    dist = D.init_distributed(config.device)
    torch.manual_seed(config.seed)  # a new head and LoRA's A are random: the same run twice starts the same
    notes = Notes(verbose and dist.is_main)
    records = read_records(train, [text_field, label_field], "--train")
    table_labels(records, label_field)
    labels = _label_set(records, label_field)
    if len(labels) < 2:
        raise DataError(f"--train {train}: every example has label {labels[0]!r}; a classifier needs two labels or more")
    val_records = read_records(val, [text_field, label_field], "--val") if val else []
    table_labels(val_records, label_field)
    if val_records:
        _check_val_labels(labels, val_records, label_field, train)
    tok = load_tokenizer(tokenizer, model)
    if preset is not None:
        clf = GPTForSequenceClassification(random_config(preset, tok, notes), labels)
    else:
        clf = GPTForSequenceClassification.from_pretrained(model, labels=labels, device="cpu", dtype="fp32")
    check_vocab(tok, clf.config.vocab_size, base, tokenizer)
    pad = next(i for i in (tok.pad_token_id, clf.config.pad_token_id, tok.eos_token_id, 0) if i is not None)
    clf.config.pad_token_id = pad  # transformers finds the last real token through it
    limit = min(max_length or clf.config.n_positions, clf.config.n_positions)
    label_id = {label: i for i, label in enumerate(labels)}

    def encode(recs: Sequence[Record]) -> list[tuple[list[int], int]]:
        texts = [str(r.row[text_field]) for r in recs]
        ids = encode_texts(tok, texts, limit)
        return [(row or [pad], label_id[r.row[label_field]]) for row, r in zip(ids, recs)]

    train_examples = encode(records)
    check_token_ids([ids for ids, _ in train_examples], clf.config.vocab_size, f"--train {train}")
    cut = sum(len(tok.encode(str(r.row[text_field]))) > limit for r in records[:2000])
    if cut:
        notes.append(f"{cut} of the first {min(len(records), 2000)} training texts were cut to {limit} tokens")
    counts = torch.bincount(torch.tensor([y for _, y in train_examples]), minlength=len(labels)).tolist()
    notes.append("labels: " + ", ".join(f"{label!r} ({n})" for label, n in zip(labels, counts)))
    weights = _class_weights(class_weights, [y for _, y in train_examples], len(labels))
    net = _maybe_lora(clf, lora, base, notes)
    collate = functools.partial(collate_classification, pad_id=pad)
    source = ShuffledSource(train_examples, config.batch_size, collate, seed=config.seed, rank=dist.rank,
                            world_size=dist.world_size,
                            lengths=[len(ids) for ids, _ in train_examples] if group_by_length else None)
    val_examples = encode(val_records) if val_records else []
    eval_fn = None
    if val_examples:
        shown = val_examples[:eval_limit] if eval_limit else val_examples

        @torch.no_grad()
        def eval_fn(m: torch.nn.Module) -> dict[str, float]:
            device = next(m.parameters()).device
            predictions = []
            for i in range(0, len(shown), config.batch_size * 2):
                batch = collate(shown[i: i + config.batch_size * 2])
                logits = m(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
                predictions.extend(logits.argmax(-1).tolist())
            report = metrics.classification_metrics(predictions, [y for _, y in shown], labels=list(range(len(labels))))
            return {"accuracy": report["accuracy"], "macro_f1": report["macro"]["f1"]}

    if config.best_metric is None:
        config = config.replace(best_metric="accuracy" if eval_fn else None, best_mode="max")
    extra = {"task": "classify", "base_model": base, "labels": [str(x) for x in labels],
             "data": {"train": str(train), "val": str(val) if val else None,
                      "fingerprint": data_fingerprint(train, val), "text_field": text_field,
                      "label_field": label_field, "train_examples": len(train_examples),
                      "group_by_length": group_by_length},
             "class_weights": weights.tolist() if weights is not None else None,
             "lora": dict(vars(lora), targets=net.lora_settings["targets"]) if lora else None}
    loss_fn = functools.partial(classification_loss, class_weights=weights)
    val_source = val_batches(val_examples, config.batch_size, collate, rank=dist.rank,
                             world_size=dist.world_size) if val_examples else None
    extra["recipe"] = recipe_of(model=model, preset=preset, train=train, val=val, tokenizer=tokenizer,
                                text_field=text_field, label_field=label_field, class_weights=class_weights,
                                max_length=max_length, eval_limit=eval_limit, group_by_length=group_by_length,
                                lora=lora)
    trainer = Trainer(net, config, source, val_source, loss_fn=loss_fn, eval_fn=eval_fn, tokenizer=tok,
                      extra_config=extra, dist=dist, eval_metrics=CLASSIFIER_METRICS if eval_fn else None)
    result = trainer.train()
    _finish(config, dist, plot, notes)
    return FinetuneOutcome(result, list(notes), {"labels": labels, "label_counts": counts}, dist.is_main)


def _class_weights(spec: str | Sequence[float] | None, label_ids: list[int], k: int) -> torch.Tensor | None:
    if spec is None or spec == "none":
        return None
    if spec == "balanced":
        return balanced_class_weights(label_ids, k)
    values = [float(x) for x in (spec.split(",") if isinstance(spec, str) else spec)]
    if len(values) != k or any(v <= 0 for v in values):
        raise ConfigError(f"--class-weights needs 'balanced' or {k} positive numbers (one per label, in label order), "
                          f"got {spec!r}")
    return torch.tensor(values)


# ---- supervised fine-tuning (conditional generation) -------------------------------------------


def finetune_sft(
    config: TrainConfig, model: str | None, train: str, val: str | None = None, *, task: str = "custom",
    prompt_template: str | None = None, response_template: str | None = None, document_field: str | None = None,
    tokenizer: str | None = None, pack: bool = False, lora: LoRASettings | None = None,
    max_length: int | None = None, group_by_length: bool = False, verbose: bool = True, plot: bool = True,
    preset: str | None = None,
) -> FinetuneOutcome:
    """Train a language model, `model` (a checkpoint directory or Hub name) or random weights of
    `preset`, on prompt -> response pairs (loss on response tokens only); the template is stored in
    the saved config.json so pipelines and evaluation reuse it."""
    base = base_name(model, preset)
    check_best_metric(config, val)
    dist = D.init_distributed(config.device)
    torch.manual_seed(config.seed)  # a new head and LoRA's A are random: the same run twice starts the same
    template = make_template(task, prompt_template, response_template, document_field)
    notes = Notes(verbose and dist.is_main)
    structured = template.structured_fields
    records = read_records(train, template.fields, "--train", json_fields=structured)
    val_records = read_records(val, template.fields, "--val", json_fields=structured) if val else []
    tok = load_tokenizer(tokenizer, model)
    if tok.eos_token_id is None:
        raise ConfigError("the tokenizer has no eos token; SFT ends every response with eos")
    if preset is not None:
        gpt = GPT(random_config(preset, tok, notes))
    else:
        gpt = load_model(model, dtype="fp32", device="cpu")
    check_vocab(tok, gpt.config.vocab_size, base, tokenizer)
    gpt.config.extra[CONFIG_KEY] = template.to_dict()
    limit = min(max_length or gpt.config.n_positions, gpt.config.n_positions)
    examples, stats = build_sft_examples(records, tok, template, limit)
    check_token_ids([ex.ids for ex in examples], gpt.config.vocab_size, f"--train {train}")
    notes.append(f"train: {stats.summary()}")
    val_examples: list = []
    val_stats = SFTStats()
    if val_records:
        val_examples, val_stats = build_sft_examples(val_records, tok, template, limit)
        notes.append(f"val: {val_stats.summary()}")
    if pack:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(config.seed)).tolist()
        before = len(examples)
        examples = pack_examples([examples[i] for i in order], limit)
        notes.append(f"packing: {before} examples in {len(examples)} rows of up to {limit + 1} tokens")
    net = _maybe_lora(gpt, lora, base, notes)
    collate = functools.partial(collate_sft, pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    source = ShuffledSource(examples, config.batch_size, collate, seed=config.seed, rank=dist.rank,
                            world_size=dist.world_size, lengths=[len(ex) for ex in examples] if group_by_length else None)
    val_source = val_batches(val_examples, config.batch_size, collate, rank=dist.rank,
                             world_size=dist.world_size) if val_examples else None
    if config.best_metric is None and val_source is not None:
        config = config.replace(best_metric="val_loss", best_mode="min")
    extra = {"task": f"sft:{task}", "base_model": base, "template": template.to_dict(), "pack": pack,
             "data": {"train": str(train), "val": str(val) if val else None,
                      "fingerprint": data_fingerprint(train, val), "train_examples": stats.examples,
                      "truncated": stats.truncated, "max_length": limit,
                      "group_by_length": group_by_length},
             "lora": dict(vars(lora), targets=net.lora_settings["targets"]) if lora else None,
             "recipe": recipe_of(model=model, preset=preset, train=train, val=val, tokenizer=tokenizer, task=task,
                                 prompt_template=prompt_template, response_template=response_template,
                                 document_field=document_field, pack=pack, max_length=max_length,
                                 group_by_length=group_by_length, lora=lora)}
    trainer = Trainer(net, config, source, val_source, loss_fn=causal_lm_loss, tokenizer=tok, extra_config=extra,
                      dist=dist)
    result = trainer.train()
    _finish(config, dist, plot, notes)
    return FinetuneOutcome(result, list(notes), {"train": vars(stats), "val": vars(val_stats)}, dist.is_main)
