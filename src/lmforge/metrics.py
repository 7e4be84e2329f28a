"""Evaluation metrics as plain functions: perplexity, classification, BLEU/chrF, ROUGE, SQuAD, multiple choice.

Every function takes `(predictions, references)` in that order (as Hugging Face `evaluate` does) and
returns plain numbers, so results can be compared with published figures:

- perplexity: Hugging Face's documented sliding-window method (windows of `max_length`, moved by
  `stride`; each token scored once, with as much context as its window allows).
- classification: the definitions of scikit-learn (`precision_recall_fscore_support`, zero_division=0).
- BLEU / chrF: `sacrebleu` itself (default 13a tokenization), with its signature for reproducibility.
- ROUGE: Google's `rouge-score` itself; corpus figures are the mean of per-example scores.
- QA: the official SQuAD v1.1 evaluation (answer normalisation, max over gold answers, x100).
- multiple choice: lm-evaluation-harness' log-likelihood scoring (acc and acc_norm).
Perplexity and continuation log-probabilities need the model; everything else is model-free.
"""

from __future__ import annotations

import contextlib
import math
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterator, Sequence

import torch
import torch.nn.functional as F

from lmforge.device import resolve_dtype
from lmforge.errors import ConfigError, DataError

__all__ = [
    "PerplexityResult", "perplexity", "sliding_windows",
    "continuation_logprobs", "LogprobResult", "multiple_choice",
    "accuracy", "confusion_matrix", "precision_recall_f1", "classification_metrics",
    "bleu", "chrf", "rouge", "ROUGE_TYPES",
    "normalize_answer", "exact_match", "qa_f1", "squad",
]


def _check_pair(predictions: Sequence, references: Sequence, what: str) -> None:
    if len(predictions) != len(references):
        raise DataError(
            f"{what}: {len(predictions)} predictions but {len(references)} references; "
            f"there must be exactly one prediction per reference"
        )
    if len(predictions) == 0:
        raise DataError(f"{what}: no predictions to score (empty input)")


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Score in eval mode (no dropout) and give the model back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _autocast(model: torch.nn.Module, dtype: str | torch.dtype | None) -> Iterator[None]:
    """Run the forward pass under autocast to `dtype` (e.g. bf16); None/float32 = the model's own dtype."""
    dt = resolve_dtype(dtype)
    device_type = next(model.parameters()).device.type
    if dt is None or dt == torch.float32:
        yield
        return
    with torch.autocast(device_type=device_type, dtype=dt):
        yield


def _progress(total: int, enabled: bool | None, desc: str):
    """A tqdm bar on stderr; enabled=None shows it only when stderr is a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=None if enabled is None else not enabled, desc=desc, leave=False)


# ---- perplexity --------------------------------------------------------------------------------


@dataclass
class PerplexityResult:
    """exp(mean token NLL) over `n_tokens` scored tokens, with the window settings that produced it.

    token_nll / context_length (when requested): the NLL of every scored token, in text order, and
    how many tokens of context its window gave it (for per-context-length perplexity plots).
    """

    perplexity: float
    nll: float
    n_tokens: int
    n_windows: int
    max_length: int
    stride: int
    token_nll: torch.Tensor | None = field(default=None, repr=False)
    context_length: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"perplexity": self.perplexity, "nll": self.nll, "n_tokens": self.n_tokens,
                "n_windows": self.n_windows, "max_length": self.max_length, "stride": self.stride}


def sliding_windows(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows (begin, end, first_scored) of Hugging Face's perplexity loop over `n` tokens.

    Window [begin, end) is fed to the model; tokens first_scored..end-1 are scored (those not
    scored by an earlier window). A token needs at least one token of context inside its window, so
    first_scored >= begin + 1: with stride == max_length every window's first token goes unscored,
    exactly as in the documented loop.
    """
    windows, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        windows.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n:
            break
    return windows


def _as_token_tensor(token_ids: Any) -> torch.Tensor:
    """A 1-D int64 tensor from a tensor, a list of ints or a numpy array / memmap (e.g. uint16 tokens)."""
    if isinstance(token_ids, torch.Tensor):
        ids = token_ids
    else:
        import numpy as np

        ids = torch.from_numpy(np.asarray(token_ids).astype(np.int64))
    if ids.dim() == 2 and ids.size(0) == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise DataError(f"token ids must be one sequence (1-D), got shape {tuple(ids.shape)}; "
                        f"concatenate documents (separated by the EOS token) first")
    if ids.is_floating_point():
        raise DataError(f"token ids must be integers, got dtype {ids.dtype}")
    return ids.long()


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    token_ids: Sequence[int] | torch.Tensor,
    *,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 1,
    dtype: str | torch.dtype | None = None,
    return_token_nll: bool = False,
    progress: bool | None = False,
) -> PerplexityResult:
    """Perplexity exp(-1/N sum_t log P(w_t | w_<t)) of `model` on one token sequence.

    Texts longer than the context are scored with a sliding window (Hugging Face's "Perplexity of
    fixed-length models"): windows of `max_length` tokens (default: the model's context) start every
    `stride` tokens (default: max_length // 2); each token is scored once, in the first window that
    reaches it, conditioned on up to max_length - 1 earlier tokens. The first token is never scored.
    Windows are batched `batch_size` at a time; `dtype="bf16"` runs the forward under autocast.
    """
    ids = _as_token_tensor(token_ids)
    n = ids.numel()
    if n < 2:
        raise DataError(f"perplexity needs at least 2 tokens (the first is only context), got {n}")
    vocab = model.config.vocab_size
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise DataError(f"token ids must be in 0..{vocab - 1} (the model's vocab_size={vocab}), found "
                        f"{int(ids.min())}..{int(ids.max())}; were they made with this model's tokenizer?")
    context = model.config.n_positions
    max_length = context if max_length is None else int(max_length)
    if not 2 <= max_length <= context:
        raise ConfigError(
            f"max_length={max_length} is outside 2..{context}: the model's context is n_positions={context}, "
            f"so windows can hold at most {context} tokens"
        )
    stride = max(1, max_length // 2) if stride is None else int(stride)
    if not 1 <= stride <= max_length:
        raise ConfigError(f"stride={stride} must be in 1..max_length={max_length}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")

    device = next(model.parameters()).device
    windows = sliding_windows(n, max_length, stride)
    scoring = [w for w in windows if w[2] < w[1]]  # a last one-token window may score nothing
    nll_parts: list[torch.Tensor] = []
    ctx_parts: list[torch.Tensor] = []
    with _eval_mode(model):
        bar = _progress(len(scoring), progress, "perplexity")
        for i in range(0, len(scoring), batch_size):
            group = scoring[i: i + batch_size]
            T = max(end - begin for begin, end, _ in group)
            # Right padding is safe without a mask: causal attention never lets a real token see it.
            x = torch.zeros(len(group), T, dtype=torch.long)
            y = torch.full((len(group), T - 1), -100, dtype=torch.long)
            for row, (begin, end, first) in enumerate(group):
                x[row, : end - begin] = ids[begin:end]
                y[row, first - begin - 1: end - begin - 1] = ids[first:end]
            with _autocast(model, dtype):
                logits = model(x.to(device)).logits[:, :-1]
            nll = F.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)), y.to(device).reshape(-1),
                ignore_index=-100, reduction="none",
            ).view(len(group), T - 1)
            for row, (begin, end, first) in enumerate(group):
                nll_parts.append(nll[row, first - begin - 1: end - begin - 1].double().cpu())
                ctx_parts.append(torch.arange(first - begin, end - begin))
            bar.update(len(group))
        bar.close()
    token_nll = torch.cat(nll_parts)
    mean_nll = float(token_nll.mean())
    return PerplexityResult(
        perplexity=math.exp(mean_nll), nll=mean_nll, n_tokens=token_nll.numel(), n_windows=len(windows),
        max_length=max_length, stride=stride,
        token_nll=token_nll if return_token_nll else None,
        context_length=torch.cat(ctx_parts) if return_token_nll else None,
    )


# ---- log-likelihood of continuations (zero-shot multiple choice) --------------------------------


@dataclass
class LogprobResult:
    """log P(continuation | context) summed over its tokens; is_greedy: every token was the argmax."""

    logprob: float
    n_tokens: int
    is_greedy: bool


@torch.no_grad()
def continuation_logprobs(
    model: torch.nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 8,
    dtype: str | torch.dtype | None = None,
    progress: bool | None = False,
) -> list[LogprobResult]:
    """For each (context_ids, continuation_ids), the total log-probability of the continuation.

    As lm-evaluation-harness' `loglikelihood`: the model reads (context + continuation)[:-1], keeping
    only the last n_positions tokens, and the continuation's tokens are scored from the last
    len(continuation) positions. An empty context must be replaced by a BOS/EOS token by the caller.
    """
    context_len = model.config.n_positions
    rows = []
    for i, (ctx, cont) in enumerate(requests):
        ctx, cont = list(ctx), list(cont)
        if not cont:
            raise DataError(f"request {i}: the continuation is empty; every choice needs at least one token")
        if not ctx:
            raise DataError(f"request {i}: the context is empty; start it with the BOS/EOS token")
        if len(cont) > context_len:
            raise DataError(f"request {i}: continuation of {len(cont)} tokens exceeds the model's context "
                            f"n_positions={context_len}")
        if min(ctx + cont) < 0 or max(ctx + cont) >= model.config.vocab_size:
            raise DataError(f"request {i}: token ids outside the model's vocabulary 0..{model.config.vocab_size - 1}")
        inp = (ctx + cont)[-(context_len + 1):][:-1]
        rows.append((i, inp, cont))
    # Longest first, as the harness does: equal lengths batch together and padding stays small.
    rows.sort(key=lambda r: -len(r[1]))
    device = next(model.parameters()).device
    out: list[LogprobResult | None] = [None] * len(rows)
    with _eval_mode(model):
        bar = _progress(len(rows), progress, "log-likelihood")
        for b in range(0, len(rows), batch_size):
            group = rows[b: b + batch_size]
            T = max(len(inp) for _, inp, _ in group)
            x = torch.zeros(len(group), T, dtype=torch.long)
            for r, (_, inp, _) in enumerate(group):
                x[r, : len(inp)] = torch.tensor(inp)
            with _autocast(model, dtype):
                logits = model(x.to(device)).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            for r, (i, inp, cont) in enumerate(group):
                pos = torch.arange(len(inp) - len(cont), len(inp), device=device)
                target = torch.tensor(cont, device=device)
                lp = logp[r, pos]  # (len(cont), vocab)
                out[i] = LogprobResult(
                    logprob=float(lp.gather(-1, target[:, None]).sum()),
                    n_tokens=len(cont),
                    is_greedy=bool((lp.argmax(-1) == target).all()),
                )
            bar.update(len(group))
        bar.close()
    return out  # type: ignore[return-value]


def multiple_choice(
    choice_logprobs: Sequence[Sequence[float]],
    gold: Sequence[int],
    choice_lengths: Sequence[Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Zero-shot multiple choice from per-choice log-likelihoods (lm-evaluation-harness' rule).

    acc: the choice with the highest total log-probability is right. acc_norm: the highest
    log-probability per unit of length (the harness divides by the choice's length in characters;
    pass those as `choice_lengths`). Ties go to the first choice, as numpy's argmax does.
    Returns acc, acc_norm (fractions), n, and the predicted indices of both rules.
    """
    _check_pair(choice_logprobs, gold, "multiple choice")
    if choice_lengths is not None and len(choice_lengths) != len(choice_logprobs):
        raise DataError(f"multiple choice: {len(choice_lengths)} length lists for {len(choice_logprobs)} items")
    pred, pred_norm = [], []
    for i, lls in enumerate(choice_logprobs):
        if len(lls) == 0:
            raise DataError(f"multiple choice item {i} has no choices")
        if not 0 <= gold[i] < len(lls):
            raise DataError(f"multiple choice item {i}: gold index {gold[i]} is not one of its {len(lls)} choices")
        lengths = choice_lengths[i] if choice_lengths is not None else [1] * len(lls)
        if len(lengths) != len(lls) or any(n <= 0 for n in lengths):
            raise DataError(f"multiple choice item {i}: need one positive length per choice, got {list(lengths)}")
        pred.append(_argmax(lls))
        pred_norm.append(_argmax([ll / n for ll, n in zip(lls, lengths)]))
    n = len(gold)
    return {
        "acc": sum(p == g for p, g in zip(pred, gold)) / n,
        "acc_norm": sum(p == g for p, g in zip(pred_norm, gold)) / n,
        "n": n, "predictions": pred, "predictions_norm": pred_norm,
    }


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda j: (values[j], -j))


# ---- classification ----------------------------------------------------------------------------


def _labels(predictions: Sequence[Hashable], references: Sequence[Hashable],
            labels: Sequence[Hashable] | None) -> list:
    if labels is not None:
        if len(set(labels)) != len(labels) or not labels:
            raise DataError(f"labels must be a non-empty list without repeats, got {list(labels)}")
        return list(labels)
    try:
        return sorted(set(references) | set(predictions))
    except TypeError:
        raise DataError("labels mix types that cannot be sorted (e.g. str and int); pass `labels` explicitly") from None


def accuracy(predictions: Sequence[Hashable], references: Sequence[Hashable]) -> float:
    """The fraction of predictions equal to their reference."""
    _check_pair(predictions, references, "accuracy")
    return sum(p == r for p, r in zip(predictions, references)) / len(references)


def confusion_matrix(
    predictions: Sequence[Hashable], references: Sequence[Hashable], labels: Sequence[Hashable] | None = None,
) -> tuple[list[list[int]], list]:
    """(matrix, labels): matrix[i][j] counts references of labels[i] predicted as labels[j] (scikit-learn's layout)."""
    _check_pair(predictions, references, "confusion matrix")
    labels = _labels(predictions, references, labels)
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for p, r in zip(predictions, references):
        if p in index and r in index:
            matrix[index[r]][index[p]] += 1
    return matrix, labels


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return precision, recall, f1


def precision_recall_f1(
    predictions: Sequence[Hashable],
    references: Sequence[Hashable],
    average: str | None = "macro",
    labels: Sequence[Hashable] | None = None,
) -> dict[str, Any]:
    """Precision, recall, F1 and support, as scikit-learn's precision_recall_fscore_support(zero_division=0).

    average: None (per class: a dict label -> {precision, recall, f1, support}), "macro" (unweighted
    mean over labels), "micro" (from the summed counts) or "weighted" (mean weighted by support).
    Labels default to the sorted union of references and predictions.
    """
    _check_pair(predictions, references, "precision/recall/F1")
    if average not in (None, "macro", "micro", "weighted"):
        raise ConfigError(f"average must be None, 'macro', 'micro' or 'weighted', got {average!r}")
    labels = _labels(predictions, references, labels)
    counts = {label: [0, 0, 0] for label in labels}  # tp, fp, fn
    for p, r in zip(predictions, references):
        if p == r:
            if p in counts:
                counts[p][0] += 1
            continue
        if p in counts:
            counts[p][1] += 1
        if r in counts:
            counts[r][2] += 1
    support = {label: sum(1 for r in references if r == label) for label in labels}
    per_class = {}
    for label in labels:
        p, r, f = _prf(*counts[label])
        per_class[label] = {"precision": p, "recall": r, "f1": f, "support": support[label]}
    if average is None:
        return per_class
    total = sum(support.values())
    if average == "micro":
        tp, fp, fn = (sum(c[k] for c in counts.values()) for k in range(3))
        p, r, f = _prf(tp, fp, fn)
        return {"precision": p, "recall": r, "f1": f, "support": total}
    if average == "macro":
        weights = {label: 1.0 / len(labels) for label in labels}
    else:
        weights = {label: support[label] / total if total else 0.0 for label in labels}
    return {
        key: sum(weights[label] * per_class[label][key] for label in labels) for key in ("precision", "recall", "f1")
    } | {"support": total}


def classification_metrics(
    predictions: Sequence[Hashable], references: Sequence[Hashable], labels: Sequence[Hashable] | None = None,
) -> dict[str, Any]:
    """Everything for a classification report: accuracy, per-class / macro / micro / weighted
    precision-recall-F1, and the confusion matrix (rows: reference, columns: prediction)."""
    labels = _labels(predictions, references, labels)
    matrix, _ = confusion_matrix(predictions, references, labels)
    return {
        "accuracy": accuracy(predictions, references),
        "n": len(references),
        "labels": labels,
        "per_class": precision_recall_f1(predictions, references, None, labels),
        "macro": precision_recall_f1(predictions, references, "macro", labels),
        "micro": precision_recall_f1(predictions, references, "micro", labels),
        "weighted": precision_recall_f1(predictions, references, "weighted", labels),
        "confusion_matrix": matrix,
    }


# ---- generation: BLEU, chrF (sacrebleu), ROUGE (rouge-score) -------------------------------------


def _reference_streams(predictions: Sequence[str], references: Sequence[str | Sequence[str]], what: str) -> list[list]:
    """sacrebleu's layout: one stream per reference slot; a missing slot is None (variable counts)."""
    _check_pair(predictions, references, what)
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    for i, r in enumerate(refs):
        if not r or not all(isinstance(x, str) for x in r):
            raise DataError(f"{what}: reference {i} must be a string or a non-empty list of strings, got {r!r}")
    for i, p in enumerate(predictions):
        if not isinstance(p, str):
            raise DataError(f"{what}: prediction {i} must be a string, got {type(p).__name__}")
    width = max(len(r) for r in refs)
    return [[r[k] if k < len(r) else None for r in refs] for k in range(width)]


def bleu(predictions: Sequence[str], references: Sequence[str | Sequence[str]], **options: Any) -> dict[str, Any]:
    """Corpus BLEU by sacrebleu (default: 13a tokenization, exp smoothing), 0-100.

    references: one string per prediction, or a list of strings (several references; the number may
    vary). `options` go to sacrebleu.metrics.BLEU (e.g. tokenize="intl", lowercase=True).
    """
    from sacrebleu.metrics import BLEU

    streams = _reference_streams(predictions, references, "BLEU")
    metric = BLEU(**options)
    s = metric.corpus_score(list(predictions), streams)
    return {"score": s.score, "precisions": list(s.precisions), "bp": s.bp, "ratio": s.ratio,
            "sys_len": s.sys_len, "ref_len": s.ref_len, "signature": str(metric.get_signature())}


def chrf(predictions: Sequence[str], references: Sequence[str | Sequence[str]], **options: Any) -> dict[str, Any]:
    """Corpus chrF by sacrebleu (default chrF2: character 6-grams, beta 2); word_order=2 gives chrF++."""
    from sacrebleu.metrics import CHRF

    streams = _reference_streams(predictions, references, "chrF")
    metric = CHRF(**options)
    s = metric.corpus_score(list(predictions), streams)
    return {"score": s.score, "signature": str(metric.get_signature())}


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    rouge_types: Sequence[str] = ROUGE_TYPES,
    use_stemmer: bool = False,
    return_per_example: bool = False,
) -> dict[str, Any]:
    """ROUGE by Google's rouge-score: the mean over examples of each type's precision, recall and F.

    With several references, each example takes the reference with the best F (rouge-score's
    score_multi). rougeLsum treats "\\n" as the sentence separator. Scores are fractions in 0..1.
    """
    from rouge_score import rouge_scorer

    _reference_streams(predictions, references, "ROUGE")  # validates shapes and types
    unknown = [t for t in rouge_types if not re.fullmatch(r"rouge([1-9]|L|Lsum)", t)]
    if unknown or not rouge_types:
        raise ConfigError(f"unknown ROUGE type(s) {unknown}: use rouge1..rouge9, rougeL, rougeLsum")
    scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
    per_example = []
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred) if isinstance(ref, str) else scorer.score_multi(list(ref), pred)
        per_example.append({t: {"precision": s.precision, "recall": s.recall, "fmeasure": s.fmeasure}
                            for t, s in scores.items()})
    n = len(per_example)
    result: dict[str, Any] = {
        t: {k: sum(e[t][k] for e in per_example) / n for k in ("precision", "recall", "fmeasure")}
        for t in rouge_types
    }
    result["use_stemmer"] = use_stemmer
    if return_per_example:
        result["per_example"] = per_example
    return result


# ---- question answering: SQuAD v1.1 ------------------------------------------------------------

_PUNCTUATION = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD v1.1's normalisation: lower case, drop punctuation, drop articles, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(gold)


def qa_f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 between the normalised answers (SQuAD v1.1)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, Any]:
    """SQuAD v1.1 exact_match and f1 (0-100): each prediction takes its best score over its gold answers."""
    _check_pair(predictions, references, "SQuAD")
    em = f1 = 0.0
    for i, (pred, golds) in enumerate(zip(predictions, references)):
        golds = [golds] if isinstance(golds, str) else list(golds)
        if not golds:
            raise DataError(f"SQuAD: question {i} has no gold answers")
        em += max(float(exact_match(pred, g)) for g in golds)
        f1 += max(qa_f1(pred, g) for g in golds)
    n = len(predictions)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n, "n": n}
