"""Sequence classification: the Transformer plus a linear head on the last real token.

    logits = W_score h_last,   h_last = the final hidden state of the last non-padding token
    L = -sum_i w_{y_i} log softmax(logits_i)[y_i]     (w = 1 without class weights)

The model is GPT with its LM head swapped for `score` (num_labels x n_embd, no bias); the
parameter names and config.json fields (`architectures`, `num_labels`, `id2label`, `label2id`,
`pad_token_id`) are those of transformers' sequence classifiers (GPT2ForSequenceClassification),
so checkpoints load both ways. The labels are the model's own (`labels`); config.json gets them on
save. `load_classifier(path)` gives a ready `predict(texts) -> labels`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.checkpoint import (
    CONFIG_NAME, copy_state, load_config, read_state, resolve_checkpoint_dir, save_pretrained as save_checkpoint,
    stored_dtype,
)
from lmforge.config import GPTConfig
from lmforge.device import resolve_device, resolve_dtype
from lmforge.errors import ConfigError, DataError
from lmforge.families import family_for
from lmforge.model import GPT

# Written when every label is an int, so predictions come back as the ints the data used.
LABEL_TYPE_KEY = "lmforge_label_type"
# The config.json keys that describe a classifier's head: the model holds them as `labels`.
HEAD_KEYS = ("architectures", "num_labels", "id2label", "label2id", LABEL_TYPE_KEY)


@dataclass
class SequenceClassifierOutput:
    """logits: (B, num_labels) at the last real token; loss: mean cross-entropy when labels were given."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


def last_token_index(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_token_id: int | None,
) -> torch.Tensor:
    """Index of the rightmost real token of each row (works for left and right padding).

    The attention mask decides when given; otherwise tokens equal to pad_token_id are padding, as
    transformers does; with neither, the last position.
    """
    B, T = input_ids.shape
    positions = torch.arange(T, device=input_ids.device)
    if attention_mask is not None:
        real = attention_mask.to(input_ids.device).bool()
    elif pad_token_id is not None:
        real = input_ids != pad_token_id
    else:
        return torch.full((B,), T - 1, dtype=torch.long, device=input_ids.device)
    return (positions * real).argmax(-1)


class GPTForSequenceClassification(GPT):
    """GPT-2 body + `score` head over `labels` (id i <-> labels[i])."""

    def __init__(self, config: GPTConfig, labels: Sequence[Hashable] | None = None, attn_impl: str = "sdpa") -> None:
        labels = list(labels) if labels is not None else labels_from_config(config)
        # The head's keys become this model's `labels`; save_pretrained writes them back.
        config = dataclasses.replace(config, extra={k: v for k, v in config.extra.items() if k not in HEAD_KEYS})
        super().__init__(config, attn_impl)
        del self.lm_head  # the body is shared with GPT; the head is the classifier's own
        if len(labels) < 1:
            raise ConfigError("a classifier needs at least one label")
        if len(set(labels)) != len(labels):
            raise ConfigError(f"labels must be distinct, got {labels}")
        self.labels = labels
        self.score = nn.Linear(config.n_embd, len(labels), bias=False)
        nn.init.normal_(self.score.weight, mean=0.0, std=config.initializer_range)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def id2label(self) -> dict[int, Hashable]:
        return dict(enumerate(self.labels))

    @property
    def label2id(self) -> dict[Hashable, int]:
        return {label: i for i, label in enumerate(self.labels)}

    def head_config(self) -> dict[str, Any]:
        """The config.json keys of this head, in transformers' layout (what save_pretrained adds)."""
        d = {"architectures": [family_for(self.config.family).ARCHITECTURES["sequence_classification"]],
             "num_labels": self.num_labels,
             "id2label": {str(i): str(label) for i, label in enumerate(self.labels)},
             "label2id": {str(label): i for i, label in enumerate(self.labels)}}
        if all(isinstance(label, int) and not isinstance(label, bool) for label in self.labels):
            d[LABEL_TYPE_KEY] = "int"
        return d

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        class_weights: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        """Class logits (B, num_labels) from the hidden state of each row's last real token.

        With an attention mask and no position_ids, positions count real tokens only, so a
        left-padded row gets the same logits as the unpadded text.
        """
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.forward_hidden(input_ids, attention_mask, position_ids)  # (B, T, C)
        last = last_token_index(input_ids, attention_mask, self.config.pad_token_id)
        pooled = hidden[torch.arange(hidden.size(0), device=hidden.device), last]  # (B, C)
        logits = self.score(pooled)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels.to(logits.device), weight=class_weights)
        return SequenceClassifierOutput(logits=logits, loss=loss)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        raise ConfigError("a sequence-classification model has no LM head and cannot generate; "
                          "use lmforge.load_model on a language-model checkpoint")

    # ---- checkpoints ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, path_or_name: str | os.PathLike, labels: Sequence[Hashable] | None = None,
        device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = None,
        revision: str | None = None,
    ) -> "GPTForSequenceClassification":
        """Load a classifier directory (ours or transformers'), or start one from a language model.

        A checkpoint without `score.weight` (a plain GPT-2) gets a freshly initialised head over
        `labels`, as transformers does with num_labels. `labels`, when given for a checkpoint that
        has a head, must be the ones it was trained with.
        """
        directory = resolve_checkpoint_dir(path_or_name, revision)
        config = load_config(directory)
        state, source = read_state(directory, config)
        state.pop("lm_head.weight", None)  # an untied language model's head: the classifier has its own
        has_head = "score.weight" in state
        if has_head and labels is not None:
            saved = labels_from_config(config)
            if [str(x) for x in labels] != [str(x) for x in saved]:
                raise ConfigError(f"{directory / CONFIG_NAME}: the checkpoint's labels are {saved}, not {list(labels)}; "
                                  f"fine-tune a fresh head from the base model instead")
        if not has_head and labels is None:
            raise ConfigError(f"{directory}: has no classification head (score.weight), it is a language model; "
                              f"make a classifier from it by fine-tuning (`lmforge finetune classify --model "
                              f"{directory} ...`, or labels= in Python), or to score labels you already have run "
                              f"`lmforge evaluate score --metric classification`")
        model = cls(config, None if has_head else labels)  # with a head, the labels it was trained with
        copy_state(model, state, source, allow_missing=() if has_head else ("score.weight",))
        model.to(device=resolve_device(device), dtype=resolve_dtype(dtype) or stored_dtype(state))
        model.checkpoint_dir = directory
        return model.eval()

    def save_pretrained(self, directory, max_shard_size: int | str | None = None, tokenizer=None) -> None:
        """config.json + model.safetensors that transformers' sequence classifier loads."""
        save_checkpoint(self, directory, max_shard_size=max_shard_size, tokenizer=tokenizer,
                        config_updates=self.head_config())


def labels_from_config(config: GPTConfig) -> list[Hashable]:
    """Labels in id order from config.json's id2label (num_labels alone gives LABEL_0.., as transformers)."""
    extra = config.extra
    id2label = extra.get("id2label")
    if id2label:
        try:
            labels: list[Hashable] = [id2label[k] for k in sorted(id2label, key=int)]
        except ValueError:
            raise ConfigError(f"config.json id2label keys must be ids (0, 1, ...), got {sorted(id2label)}") from None
        if extra.get(LABEL_TYPE_KEY) == "int":
            labels = [int(x) for x in labels]
        return labels
    return [f"LABEL_{i}" for i in range(int(extra.get("num_labels", 2)))]


# ---- training pieces ---------------------------------------------------------------------------


def classification_loss(model: nn.Module, batch: dict[str, torch.Tensor], class_weights: torch.Tensor | None = None):
    """(sum_i w_{y_i} l_i, number of examples). The trainer divides by the examples of the whole
    step, so accumulation gives exactly the loss of the large batch; with 'balanced' weights the
    weights average 1 over the training set, so the loss keeps the scale of the unweighted one."""
    labels = batch["labels"]
    out = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
    w = None if class_weights is None else class_weights.to(out.logits.device)
    loss_sum = F.cross_entropy(out.logits.float(), labels, weight=w, reduction="sum")  # -100 labels count nothing
    return loss_sum, (labels != -100).sum()


def balanced_class_weights(label_ids: Sequence[int], num_labels: int) -> torch.Tensor:
    """n / (k * count_c) per class, scikit-learn's 'balanced' weighting."""
    counts = torch.bincount(torch.tensor(list(label_ids)), minlength=num_labels).float()
    if (counts == 0).any():
        missing = [i for i, c in enumerate(counts.tolist()) if c == 0]
        raise DataError(f"class ids {missing} have no training examples; 'balanced' class weights need every class")
    return counts.sum() / (num_labels * counts)


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text, cut to max_length (keeping the beginning, as transformers' truncation)."""
    return [ids[:max_length] for ids in tokenizer.encode_batch(list(texts))]


def collate_classification(examples: Sequence[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and label ids from (ids, label_id) pairs."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, _) in enumerate(examples):
        input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, :len(ids)] = 1
    labels = torch.tensor([label for _, label in examples], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


# ---- inference ---------------------------------------------------------------------------------


class Classifier:
    """A classifier and its tokenizer: `predict(texts)` gives labels, `predict_proba(texts)` (N, k)."""

    def __init__(self, model: GPTForSequenceClassification, tokenizer: Any, batch_size: int = 32) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @property
    def labels(self) -> list[Hashable]:
        return self.model.labels

    @torch.no_grad()
    def predict_proba(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise ConfigError("predict takes a list of texts; wrap a single text in a list")
        pad = _pad_id(self.tokenizer, self.model.config)
        rows = encode_texts(self.tokenizer, texts, self.model.config.n_positions)
        out = []
        for i in range(0, len(rows), self.batch_size):
            batch = collate_classification([(r or [pad], 0) for r in rows[i: i + self.batch_size]], pad)
            logits = self.model(batch["input_ids"].to(self.model.device),
                                attention_mask=batch["attention_mask"].to(self.model.device)).logits
            out.append(torch.softmax(logits.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.num_labels)

    def predict(self, texts: Sequence[str]) -> list[Hashable]:
        probs = self.predict_proba(texts)
        return [self.labels[i] for i in probs.argmax(-1).tolist()]


def _pad_id(tokenizer: Any, config: GPTConfig) -> int:
    for candidate in (getattr(tokenizer, "pad_token_id", None), config.pad_token_id, getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0


def load_classifier(path: str | os.PathLike, device: str | torch.device | None = "auto",
                    tokenizer: Any = None, batch_size: int = 32) -> Classifier:
    """A fine-tuned classifier directory (with its tokenizer) ready to `predict(texts)`."""
    model = GPTForSequenceClassification.from_pretrained(path, device=device)
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        from lmforge.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_pretrained(tokenizer or model.checkpoint_dir)
    return Classifier(model, tokenizer, batch_size)
