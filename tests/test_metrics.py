"""lmforge.metrics against the reference implementations: transformers (perplexity, log-likelihoods),
scikit-learn (classification), sacrebleu (BLEU, chrF), rouge-score (ROUGE), the official SQuAD v1.1
script (QA)."""

from __future__ import annotations

import math
import random
import re
import string
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge import load_model, metrics
from lmforge.errors import ConfigError, DataError

from conftest import hf_gpt2


# ---- perplexity vs transformers -----------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny transformers GPT-2 and the same weights loaded by lmforge."""
    hf = hf_gpt2(seed=3, n_positions=64, vocab_size=101)
    directory = tmp_path_factory.mktemp("ppl") / "tiny"
    hf.save_pretrained(directory)
    return hf, load_model(directory, device="cpu")


def hf_sliding_window_nll(hf, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """Hugging Face's documented loop ("Perplexity of fixed-length models"), with transformers'
    loss, counting the tokens each window's loss actually averages over (the labels left after the
    model's internal shift)."""
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=target_ids).loss
        counted = int((target_ids[:, 1:] != -100).sum())
        if counted:  # a last window of one token scores nothing (its loss is NaN)
            nll_sum += float(loss) * counted
        n_tokens += counted
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum / n_tokens, n_tokens


@pytest.mark.parametrize("n, max_length, stride, batch_size", [
    (300, 64, 16, 1), (300, 64, 16, 4), (257, 64, 64, 2), (200, 32, 7, 3), (40, 64, 32, 1), (65, 64, 63, 2),
])
def test_perplexity_equals_transformers_sliding_window(pair, n, max_length, stride, batch_size):
    hf, ours = pair
    ids = torch.randint(0, 101, (1, n), generator=torch.Generator().manual_seed(n + stride))
    want_nll, want_n = hf_sliding_window_nll(hf, ids, max_length, stride)
    got = metrics.perplexity(ours, ids[0], max_length=max_length, stride=stride, batch_size=batch_size)
    assert got.n_tokens == want_n
    assert got.perplexity == pytest.approx(math.exp(want_nll), rel=1e-4)
    assert got.nll == pytest.approx(want_nll, rel=1e-4)


def test_non_overlapping_windows_equal_the_documented_loop_verbatim(pair):
    """With stride == max_length the docs' weighting (valid labels - batch size) is exact: compare verbatim."""
    hf, ours = pair
    ids = torch.randint(0, 101, (1, 200), generator=torch.Generator().manual_seed(0))
    max_length = stride = 64
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, ids.size(1), stride):
        end_loc = min(begin_loc + max_length, ids.size(1))
        trg_len = end_loc - prev_end_loc
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            neg_log_likelihood = hf(input_ids, labels=target_ids).loss
        num_loss_tokens = (target_ids != -100).sum().item() - target_ids.size(0)
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == ids.size(1):
            break
    ppl = torch.exp(nll_sum / n_tokens).item()
    assert metrics.perplexity(ours, ids, max_length=64, stride=64).perplexity == pytest.approx(ppl, rel=1e-4)


def test_every_token_but_the_first_is_scored_once_with_overlap(pair):
    _, ours = pair
    ids = list(range(1, 100)) * 2
    r = metrics.perplexity(ours, ids, max_length=32, stride=8, return_token_nll=True)
    assert r.n_tokens == len(ids) - 1 == r.token_nll.numel()
    assert r.nll == pytest.approx(float(r.token_nll.mean()))
    # Tokens after the first window see max_length - stride .. max_length - 1 tokens of context.
    assert int(r.context_length.min()) == 1 and int(r.context_length[40:].min()) >= 32 - 8
    assert r.n_windows == len(metrics.sliding_windows(len(ids), 32, 8))


def test_perplexity_accepts_numpy_token_files_and_bf16(pair):
    _, ours = pair
    ids = np.random.default_rng(0).integers(0, 101, 150).astype(np.uint16)
    fp32 = metrics.perplexity(ours, ids, max_length=64, stride=32)
    bf16 = metrics.perplexity(ours, ids, max_length=64, stride=32, dtype="bf16")
    assert fp32.perplexity == pytest.approx(metrics.perplexity(ours, torch.from_numpy(ids.astype(np.int64)),
                                                               max_length=64, stride=32).perplexity)
    assert bf16.perplexity == pytest.approx(fp32.perplexity, rel=2e-2)
    assert ours.dtype == torch.float32 and not ours.training


def test_perplexity_bad_input_names_the_option(pair):
    _, ours = pair
    with pytest.raises(ConfigError, match=r"max_length=128.*n_positions=64"):
        metrics.perplexity(ours, list(range(100)), max_length=128)
    with pytest.raises(ConfigError, match="stride"):
        metrics.perplexity(ours, list(range(100)), max_length=32, stride=33)
    with pytest.raises(DataError, match="at least 2 tokens"):
        metrics.perplexity(ours, [5])
    with pytest.raises(DataError, match="1-D"):
        metrics.perplexity(ours, torch.zeros(2, 5, dtype=torch.long))


# ---- log-likelihood multiple choice vs transformers ---------------------------------------------


def test_continuation_logprobs_equal_transformers(pair):
    hf, ours = pair
    g = torch.Generator().manual_seed(7)
    requests = [(torch.randint(0, 101, (c,), generator=g).tolist(), torch.randint(0, 101, (k,), generator=g).tolist())
                for c, k in [(5, 1), (10, 3), (1, 4), (70, 2), (20, 20), (3, 3)]]
    got = metrics.continuation_logprobs(ours, requests, batch_size=4)
    for (ctx, cont), r in zip(requests, got):
        inp = torch.tensor((ctx + cont)[-65:][:-1])[None]
        with torch.no_grad():
            logp = torch.log_softmax(hf(inp).logits[0].float(), -1)
        tail = logp[-len(cont):]
        want = float(tail[torch.arange(len(cont)), torch.tensor(cont)].sum())
        assert r.logprob == pytest.approx(want, rel=1e-5, abs=1e-4)
        assert r.n_tokens == len(cont)
        assert r.is_greedy == bool((tail.argmax(-1) == torch.tensor(cont)).all())


def test_multiple_choice_acc_and_acc_norm():
    lls = [[-1.0, -2.0], [-9.0, -6.0], [-4.0, -3.0]]
    lengths = [[1, 10], [9, 3], [8, 3]]
    r = metrics.multiple_choice(lls, gold=[1, 1, 0], choice_lengths=lengths)
    # acc picks 0, 1, 1; acc_norm picks (-1 vs -0.2) 1, (-1 vs -2) 0, (-0.5 vs -1) 0
    assert r["predictions"] == [0, 1, 1] and r["predictions_norm"] == [1, 0, 0]
    assert r["acc"] == pytest.approx(1 / 3) and r["acc_norm"] == pytest.approx(2 / 3)
    with pytest.raises(DataError, match="gold index 2"):
        metrics.multiple_choice([[0.0, 1.0]], [2])


# ---- classification vs scikit-learn -------------------------------------------------------------

labels_strategy = st.integers(1, 5).flatmap(
    lambda k: st.integers(1, 40).flatmap(
        lambda n: st.tuples(st.lists(st.integers(0, k - 1), min_size=n, max_size=n),
                            st.lists(st.integers(0, k - 1), min_size=n, max_size=n))))


@pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")
@settings(max_examples=60, deadline=None)
@given(labels_strategy)
def test_classification_equals_scikit_learn(case):
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    y_pred, y_true = case
    assert metrics.accuracy(y_pred, y_true) == pytest.approx(accuracy_score(y_true, y_pred))
    matrix, labels = metrics.confusion_matrix(y_pred, y_true)
    assert matrix == confusion_matrix(y_true, y_pred).tolist()
    per_class = metrics.precision_recall_f1(y_pred, y_true, average=None)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, average=None, zero_division=0)
    for i, label in enumerate(labels):
        assert per_class[label]["precision"] == pytest.approx(p[i])
        assert per_class[label]["recall"] == pytest.approx(r[i])
        assert per_class[label]["f1"] == pytest.approx(f[i])
        assert per_class[label]["support"] == s[i]
    for average in ("macro", "micro", "weighted"):
        ours = metrics.precision_recall_f1(y_pred, y_true, average=average)
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
        assert (ours["precision"], ours["recall"], ours["f1"]) == pytest.approx((p, r, f)), average


def test_classification_string_labels_single_class_and_explicit_labels():
    from sklearn.metrics import f1_score, precision_recall_fscore_support

    y_true = ["positive"] * 6
    y_pred = ["positive", "negative", "positive", "positive", "negative", "positive"]
    report = metrics.classification_metrics(y_pred, y_true)
    assert report["labels"] == ["negative", "positive"]
    assert report["confusion_matrix"] == [[0, 0], [2, 4]]
    assert report["macro"]["f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert report["weighted"]["f1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted", zero_division=0))
    only = metrics.precision_recall_f1(["a"] * 3, ["a"] * 3, average="macro")
    assert only["f1"] == 1.0
    labels = ["c", "b", "a"]  # an order and a label that never occurs, as sklearn's `labels=`
    ours = metrics.precision_recall_f1(["a", "b", "b"], ["a", "a", "b"], average="macro", labels=labels)
    p, r, f, _ = precision_recall_fscore_support(["a", "a", "b"], ["a", "b", "b"], average="macro",
                                                 labels=labels, zero_division=0)
    assert (ours["precision"], ours["recall"], ours["f1"]) == pytest.approx((p, r, f))


def test_classification_bad_input():
    with pytest.raises(DataError, match="3 predictions but 2 references"):
        metrics.accuracy([1, 2, 3], [1, 2])
    with pytest.raises(DataError, match="empty"):
        metrics.classification_metrics([], [])
    with pytest.raises(ConfigError, match="average"):
        metrics.precision_recall_f1([1], [1], average="samples")
    with pytest.raises(DataError, match="labels"):
        metrics.confusion_matrix([1, "a"], ["a", 1])


# ---- BLEU, chrF, ROUGE vs sacrebleu / rouge-score -------------------------------------------------

GENERATION_CASES = {
    "plain": (["the cat sat on the mat today", "a quick brown fox jumps over it", "hello world"],
              ["the cat is on the mat today", "the quick brown fox jumped over it", "hello there world"]),
    "empty predictions": (["", "some words in a row here", ""], ["a reference sentence here", "some words in a row here", "x"]),
    "unicode": (["Ein Mann fährt Fahrrad über die Straße.", "猫が座った。", "naïve café 🙂 déjà vu"],
                ["Ein Mann fährt mit dem Fahrrad über eine Straße.", "猫は座った。", "naive cafe 🙂 deja vu"]),
}


def _random_corpus(seed: int, n: int = 12):
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "running", "runs", "the", "a", "zeta", "eta", "."]
    preds = [" ".join(rng.choices(words, k=rng.randint(0, 12))) for _ in range(n)]
    refs = [" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(n)]
    return preds, refs


@pytest.mark.parametrize("case", list(GENERATION_CASES) + ["random0", "random1"])
def test_bleu_and_chrf_equal_sacrebleu(case):
    import sacrebleu

    preds, refs = GENERATION_CASES[case] if case in GENERATION_CASES else _random_corpus(int(case[-1]))
    ours = metrics.bleu(preds, refs)
    want = sacrebleu.corpus_bleu(preds, [refs])
    assert ours["score"] == pytest.approx(want.score)
    assert ours["precisions"] == pytest.approx(want.precisions)
    assert "tok:13a" in ours["signature"] and "nrefs:1" in ours["signature"]
    assert metrics.chrf(preds, refs)["score"] == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score)
    assert metrics.chrf(preds, refs, word_order=2)["score"] == pytest.approx(
        sacrebleu.corpus_chrf(preds, [refs], word_order=2).score)


def test_bleu_with_a_variable_number_of_references():
    import sacrebleu

    preds = ["the cat sat on the mat", "there is a dog in the park", "it rains"]
    refs = [["the cat is on the mat", "a cat sat on the mat"], ["a dog is in the park"],
            ["it is raining", "rain falls", "it rains today"]]
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(3)]
    ours = metrics.bleu(preds, refs)
    assert ours["score"] == pytest.approx(sacrebleu.corpus_bleu(preds, streams).score)
    assert "nrefs:var" in ours["signature"]
    assert metrics.chrf(preds, refs)["score"] == pytest.approx(sacrebleu.corpus_chrf(preds, streams).score)


@pytest.mark.parametrize("use_stemmer", [False, True])
@pytest.mark.parametrize("case", list(GENERATION_CASES) + ["random0", "random1", "random2"])
def test_rouge_equals_rouge_score(case, use_stemmer):
    from rouge_score import rouge_scorer

    preds, refs = GENERATION_CASES[case] if case in GENERATION_CASES else _random_corpus(int(case[-1]))
    scorer = rouge_scorer.RougeScorer(list(metrics.ROUGE_TYPES), use_stemmer=use_stemmer)
    per = [scorer.score(r, p) for p, r in zip(preds, refs)]
    ours = metrics.rouge(preds, refs, use_stemmer=use_stemmer)
    for t in metrics.ROUGE_TYPES:
        for k in ("precision", "recall", "fmeasure"):
            assert ours[t][k] == pytest.approx(np.mean([getattr(s[t], k) for s in per])), (t, k)


def test_rouge_multi_reference_and_lsum_sentences():
    from rouge_score import rouge_scorer

    preds = ["the model runs fast.\nit is small.", "nothing"]
    refs = [["a model that runs fast.\nit is tiny.", "the model runs fast.\nit is small and quick."], ["something"]]
    scorer = rouge_scorer.RougeScorer(list(metrics.ROUGE_TYPES))
    ours = metrics.rouge(preds, refs, return_per_example=True)
    for t in metrics.ROUGE_TYPES:
        want = np.mean([scorer.score_multi(r, p)[t].fmeasure for p, r in zip(preds, refs)])
        assert ours[t]["fmeasure"] == pytest.approx(want)
    assert len(ours["per_example"]) == 2
    with pytest.raises(ConfigError, match="rougeX"):
        metrics.rouge(preds, refs, rouge_types=["rougeX"])


def test_generation_metrics_bad_input():
    with pytest.raises(DataError, match="2 predictions but 1 references"):
        metrics.bleu(["a", "b"], ["a"])
    with pytest.raises(DataError, match="empty"):
        metrics.rouge([], [])
    with pytest.raises(DataError, match="reference 0"):
        metrics.chrf(["a"], [[]])


# ---- SQuAD vs the official v1.1 evaluation script -----------------------------------------------
# Verbatim from the official evaluate-v1.1.py (the oracle).


def official_normalize_answer(s):
    def remove_articles(text):
        return re.sub(r'\b(a|an|the)\b', ' ', text)

    def white_space_fix(text):
        return ' '.join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return ''.join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def official_f1_score(prediction, ground_truth):
    prediction_tokens = official_normalize_answer(prediction).split()
    ground_truth_tokens = official_normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    f1 = (2 * precision * recall) / (precision + recall)
    return f1


def official_exact_match_score(prediction, ground_truth):
    return (official_normalize_answer(prediction) == official_normalize_answer(ground_truth))


def official_metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    return max(metric_fn(prediction, gt) for gt in ground_truths)


QA_WORDS = ["The", "the", "a", "An", "Denver", "Broncos", "1,000", "Super", "Bowl", "50", "Élan", "théâtre",
            "(", ")", "-", "'s", "an", "Santa", "Clara", "!", "", " "]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.lists(st.sampled_from(QA_WORDS), max_size=6),
                          st.lists(st.lists(st.sampled_from(QA_WORDS), max_size=6), min_size=1, max_size=3)),
                min_size=1, max_size=8))
def test_squad_equals_official_script(items):
    preds = [" ".join(p) for p, _ in items]
    golds = [[" ".join(g) for g in gs] for _, gs in items]
    ours = metrics.squad(preds, golds)
    em = 100.0 * sum(official_metric_max_over_ground_truths(official_exact_match_score, p, g)
                     for p, g in zip(preds, golds)) / len(preds)
    f1 = 100.0 * sum(official_metric_max_over_ground_truths(official_f1_score, p, g)
                     for p, g in zip(preds, golds)) / len(preds)
    assert ours["exact_match"] == pytest.approx(em)
    assert ours["f1"] == pytest.approx(f1)
    for p in preds:
        assert metrics.normalize_answer(p) == official_normalize_answer(p)


def test_squad_examples():
    r = metrics.squad(["The Denver Broncos!", "Santa Clara, California", ""],
                      [["Denver Broncos", "Broncos"], ["Levi's Stadium"], ["x"]])
    assert r["exact_match"] == pytest.approx(100 / 3)
    assert r["f1"] == pytest.approx(100 / 3)


# ---- properties ---------------------------------------------------------------------------------

sentence = st.lists(st.sampled_from(["alpha", "beta", "gamma", "delta", "omega", "sigma", "tau"]),
                    min_size=4, max_size=12).map(" ".join)


@settings(max_examples=25, deadline=None)
@given(st.lists(sentence, min_size=1, max_size=6))
def test_a_perfect_prediction_scores_the_maximum_everywhere(texts):
    assert metrics.bleu(texts, texts)["score"] == pytest.approx(100.0)
    assert metrics.chrf(texts, texts)["score"] == pytest.approx(100.0)
    r = metrics.rouge(texts, texts)
    assert all(r[t]["fmeasure"] == pytest.approx(1.0) for t in metrics.ROUGE_TYPES)
    q = metrics.squad(texts, [[t] for t in texts])
    assert q["exact_match"] == 100.0 and q["f1"] == pytest.approx(100.0)
    c = metrics.classification_metrics(texts, texts)
    assert c["accuracy"] == 1.0
    assert all(c[a]["f1"] == pytest.approx(1.0) for a in ("macro", "micro", "weighted"))


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6).flatmap(lambda k: st.tuples(st.just(k), st.lists(st.integers(0, k - 1), min_size=1, max_size=50))))
def test_reversed_labels_drop_accuracy_to_the_fixed_points(case):
    k, refs = case
    reversed_preds = [k - 1 - y for y in refs]
    fixed = sum(1 for y in refs if y == k - 1 - y) / len(refs)  # only the middle label (odd k) survives
    assert metrics.accuracy(reversed_preds, refs) == pytest.approx(fixed)
    if k == 2:
        assert metrics.accuracy(reversed_preds, refs) == 0.0
        assert metrics.classification_metrics(reversed_preds, refs)["macro"]["f1"] == 0.0
