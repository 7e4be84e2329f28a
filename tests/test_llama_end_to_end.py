"""Llama-family models through the rest of lmforge, checked against transformers where it has the
same thing: beam search and sampling on left-padded batches, the serving engine's continuous
batching, sequence classification both ways, `lmforge pretrain --model llama-baby`, every `lmforge
evaluate` subcommand that runs a model, and pipeline(). The random transformers models come from
test_llama_checkpoint.py's variants (GQA Llama, Qwen3 with its own head_dim and q/k norms, ...)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import lmforge
from lmforge import evaluation, metrics
from lmforge.cli import main
from lmforge.serve import Engine, EngineConfig, SamplingParams
from lmforge.tasks import pipeline
from lmforge.tasks.classification import GPTForSequenceClassification
from lmforge.tokenizer import Tokenizer
from lmforge.training.checkpointing import RunDir

from test_generation import hf_generate, padded_batch
from test_llama_checkpoint import BASE, hf_config, hf_model, randomise_norms_and_biases
from test_serve_engine import CASES, PROMPTS, TOK, collectors, llama_engine_model, reference, tokens

pytest.importorskip("transformers")


# ---- generation on left-padded batches ---------------------------------------------------------------


@pytest.fixture(scope="module", params=["llama-gqa", "qwen3-head-dim"])
def pair(request, tmp_path_factory):
    """(transformers model, lmforge model) with the same weights; a vocabulary of 13 and a sharpened
    head make eos (2) and a second eos (5) frequent, so finished hypotheses really compete."""
    hf = hf_model(request.param, seed=3, vocab_size=VOCAB)
    with torch.no_grad():
        hf.lm_head.weight.mul_(10.0)
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory)
    return hf, lmforge.load_model(directory, device="cpu")


VOCAB = 13
BEAM_CASES = [dict(num_beams=4), dict(num_beams=3, num_return_sequences=2, length_penalty=0.6, early_stopping=True),
              dict(num_beams=2, length_penalty=1.5, early_stopping="never")]


@pytest.mark.parametrize("options", BEAM_CASES, ids=["4-beams", "3-beams-2-returned", "never-stop"])
def test_beam_search_on_a_left_padded_batch_matches_transformers(pair, options):
    hf, model = pair
    ids, mask = padded_batch(VOCAB, lengths=(7, 4, 2))
    options = dict(max_new_tokens=10, eos_token_id=[2, 5], return_dict_in_generate=True, output_scores=True, **options)
    ours = model.generate(ids, mask, pad_token_id=0, **options)
    theirs = hf_generate(hf, ids, mask, **options)
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores, rtol=1e-5, atol=1e-5)


def test_the_beam_cases_finish_hypotheses_at_eos(pair):
    """The parity above means something only if some hypotheses end at an eos before max length."""
    _, model = pair
    ids, mask = padded_batch(VOCAB, lengths=(7, 4, 2))
    out = model.generate(ids, mask, pad_token_id=0, max_new_tokens=10, eos_token_id=[2, 5], **BEAM_CASES[1])
    ended = ((out[:, ids.size(1):-1] == 2) | (out[:, ids.size(1):-1] == 5)).any(dim=1)
    assert ended.any() and not ended.all()


@pytest.mark.parametrize("options", [dict(), dict(top_k=5, top_p=0.8, temperature=0.7, num_return_sequences=3),
                                     dict(num_beams=3)], ids=["plain", "warped", "beam-sampling"])
def test_seeded_sampling_on_a_left_padded_batch_matches_transformers(pair, options):
    hf, model = pair
    ids, mask = padded_batch(VOCAB, lengths=(7, 4, 2))
    torch.manual_seed(11)
    ours = model.generate(ids, mask, do_sample=True, max_new_tokens=12, pad_token_id=0, **options)
    torch.manual_seed(11)
    theirs = hf_generate(hf, ids, mask, do_sample=True, max_new_tokens=12, **options)
    assert torch.equal(ours, theirs)
    torch.manual_seed(12)
    assert not torch.equal(ours, model.generate(ids, mask, do_sample=True, max_new_tokens=12, pad_token_id=0,
                                                **options))  # it really samples


# ---- the serving engine ------------------------------------------------------------------------------

ENGINE_MODELS = {
    "llama-gqa": dict(family="llama", n_kv_head=2),
    "qwen3-mqa-head-dim": dict(family="qwen3", n_kv_head=1, qk_norm=True, head_size=16),
    "mistral-window": dict(family="mistral", n_kv_head=2, sliding_window=6),
}


@pytest.mark.parametrize("name", list(ENGINE_MODELS))
def test_engine_gives_each_concurrent_request_the_tokens_of_generate(name):
    """Requests of different lengths join and leave a running batch of at most 4 rows (rows of their
    own lengths in one cache): each gets what generate() gives alone."""
    model = llama_engine_model(**ENGINE_MODELS[name])
    cases = ["greedy", "seeded sampling with top-k and top-p", "plain sampling", "repetition penalty, sampled"]
    jobs = [(case, prompt, 20 + 5 * (i % 3)) for i, (case, prompt) in enumerate(
        (case, prompt) for case in cases for prompt in PROMPTS)]
    results, done, collector = collectors(len(jobs))

    engine = Engine(model, TOK, EngineConfig(max_batch_size=4)).start()
    try:
        for i, (case, prompt, n) in enumerate(jobs):
            engine.submit([prompt], SamplingParams(max_tokens=n, ignore_eos=True, **CASES[case][0]), 1, collector(i))
        for _ in jobs:
            assert done.acquire(timeout=60)
        counters = dict(engine.counters)
    finally:
        engine.stop()
    assert counters["max_batch_seen"] == 4 and counters["joined_running_batch"] >= 4
    for i, (case, prompt, n) in enumerate(jobs):
        expected = reference(model, prompt, n, eos_token_id=[], **CASES[case][1])
        assert tokens(results[i]) == expected, (case, prompt)
        if case == "greedy":
            assert len(set(expected)) >= 5  # not one repeated token


# ---- sequence classification ------------------------------------------------------------------------


def hf_classifier(name: str, seed: int = 0, **overrides):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config = hf_config(name, num_labels=3, pad_token_id=0, **overrides)
    return randomise_norms_and_biases(AutoModelForSequenceClassification.from_config(config).eval())


def classification_batch(padding_side: str, T: int = 12, lengths=(12, 7, 3)):
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)  # pad id 0 everywhere else
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        cols = slice(T - n, T) if padding_side == "left" else slice(0, n)
        ids[row, cols] = torch.randint(3, BASE["vocab_size"], (n,), generator=g)
        mask[row, cols] = 1
    return ids, mask


@pytest.mark.parametrize("name,architecture", [("llama-gqa", "LlamaForSequenceClassification"),
                                               ("qwen2-tied", "Qwen2ForSequenceClassification"),
                                               ("qwen3-head-dim", "Qwen3ForSequenceClassification")])
def test_sequence_classification_equals_transformers_both_ways(name, architecture, tmp_path):
    """transformers' checkpoint -> lmforge: the same logits (score head on the last real token, left or
    right padding); lmforge -> save_pretrained -> transformers: the same tensors, bit for bit."""
    from transformers import AutoModelForSequenceClassification

    hf = hf_classifier(name)
    assert type(hf).__name__ == architecture
    hf.save_pretrained(tmp_path / "theirs")
    ours = GPTForSequenceClassification.from_pretrained(tmp_path / "theirs", device="cpu")
    assert ours.labels == ["LABEL_0", "LABEL_1", "LABEL_2"] and ours.config.family == hf.config.model_type
    with torch.no_grad():
        for side in ("left", "right"):  # transformers finds the last real token from pad ids, lmforge from the mask
            ids, mask = classification_batch(side)
            expected = hf(ids, attention_mask=mask).logits
            torch.testing.assert_close(ours(ids, attention_mask=mask).logits, expected, rtol=0, atol=1e-4)
        ids, _ = classification_batch("right")  # no mask: both find the last real token from the pad ids
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=0, atol=1e-4)
    ours.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["architectures"] == [architecture]
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours").eval()
    assert type(again).__name__ == architecture
    a, b = hf.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_classifier_started_from_a_causal_lm_loads_in_transformers(tmp_path):
    from transformers import AutoModelForSequenceClassification

    hf_model("llama-gqa", seed=1).save_pretrained(tmp_path / "lm")
    torch.manual_seed(0)
    ours = GPTForSequenceClassification.from_pretrained(tmp_path / "lm", labels=["neg", "pos"], device="cpu")
    ours.config.pad_token_id = 0
    ours.save_pretrained(tmp_path / "clf")
    theirs = AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf").eval()
    assert type(theirs).__name__ == "LlamaForSequenceClassification" and theirs.config.id2label == {0: "neg", 1: "pos"}
    ids, mask = classification_batch("right")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits, theirs(ids, attention_mask=mask).logits,
                                   rtol=0, atol=1e-4)


# ---- pretraining from scratch --------------------------------------------------------------------------


def test_pretrain_llama_baby_on_the_embedded_corpus_writes_what_transformers_loads(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    rc = main(["pretrain", "--model", "llama-baby", "--out", str(out), "--block-size", "32", "--batch-size", "4",
               "--max-steps", "4", "--eval-interval", "2", "--eval-batches", "1", "--samples", "1",
               "--sample-length", "20", "--device", "cpu", "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0 and "---------- sample 1 ----------" in printed
    written = json.loads((out / "model" / "config.json").read_text())
    assert (written["model_type"], written["architectures"], written["num_hidden_layers"]) == (
        "llama", ["LlamaForCausalLM"], 4)
    ours = lmforge.load_model(out / "model", device="cpu")
    theirs = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    assert ours.num_parameters() == theirs.num_parameters()
    ids = torch.randint(0, ours.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max() <= 1e-4
    assert max(r["step"] for r in RunDir(out).read_metrics() if "loss" in r) == 4


# ---- lmforge evaluate and pipeline() --------------------------------------------------------------------


@pytest.fixture(scope="module")
def byte_llama(tmp_path_factory):
    """A tiny transformers Llama (GQA) over lmforge's byte-level tokenizer (vocab 257, eos 256), and
    a Llama classifier beside it; both directories hold the tokenizer."""
    from transformers import AutoModelForSequenceClassification

    byte_vocab = dict(vocab_size=257, bos_token_id=256, eos_token_id=256)
    root = tmp_path_factory.mktemp("byte-llama")
    hf = hf_model("llama-gqa", seed=4, **byte_vocab)
    hf.save_pretrained(root / "lm")
    torch.manual_seed(5)
    config = hf_config("llama-gqa", **byte_vocab, pad_token_id=256, id2label={0: "negative", 1: "positive"},
                       label2id={"negative": 0, "positive": 1})
    clf = randomise_norms_and_biases(AutoModelForSequenceClassification.from_config(config).eval())
    clf.save_pretrained(root / "clf")
    for directory in (root / "lm", root / "clf"):
        Tokenizer.byte_level().save_pretrained(directory)
    return hf, clf, root / "lm", root / "clf"


def hf_greedy_text(hf, prompt: str, max_new_tokens: int) -> str:
    ids = torch.tensor([TOK.encode(prompt)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = hf.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=256)[0, ids.size(1):]
    new = out.tolist()
    return TOK.decode(new[: new.index(256)] if 256 in new else new)


def run_cli(capsys, *argv):
    rc = main(["evaluate", *map(str, argv)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def test_evaluate_perplexity_equals_transformers(byte_llama, tmp_path, capsys):
    hf, _, directory, _ = byte_llama
    text = "Perplexity of a Llama with rotary positions, ünïcode included. " * 5
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    run_cli(capsys, "perplexity", "--model", directory, "--data", tmp_path / "t.txt", "--device", "cpu",
            "--stride", 64, "--batch-size", 3, "--output", tmp_path / "r.json", "--no-progress")
    ids = torch.tensor(TOK.encode(text))[None]
    nll, n = 0.0, 0
    for begin, end, first in metrics.sliding_windows(ids.size(1), 128, 64):
        labels = ids[:, begin:end].clone()
        labels[:, : first - begin] = -100
        with torch.no_grad():
            loss = hf(ids[:, begin:end], labels=labels).loss
        nll, n = nll + float(loss) * (end - first), n + end - first
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["metrics"]["perplexity"] == pytest.approx(float(torch.tensor(nll / n).exp()), rel=1e-4)
    assert report["metrics"]["n_tokens"] == n == len(text.encode()) - 1


def test_evaluate_choice_scores_each_choice_as_transformers(byte_llama, tmp_path, capsys):
    hf, _, directory, _ = byte_llama
    items = [{"context": "The capital of France is", "choices": ["Paris", "Rome", "a cheese"], "gold": 0},
             {"context": "Water is", "choices": ["wet", "dry"], "gold": 1}]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    out = run_cli(capsys, "choice", "--model", directory, "--data", tmp_path / "items.jsonl", "--device", "cpu",
                  "--batch-size", 2, "--output", tmp_path / "c.json", "--no-progress")
    assert "acc_norm" in out
    predictions = [json.loads(line) for line in (tmp_path / "c.predictions.jsonl").read_text().splitlines()]
    for item, prediction in zip(items, predictions):
        expected = []
        for choice in item["choices"]:
            context, continuation = evaluation.encode_pair(TOK, item["context"], " " + choice)
            ids = torch.tensor([context + continuation])
            with torch.no_grad():
                logp = torch.log_softmax(hf(ids).logits[0, :-1].float(), -1)
            expected.append(float(logp[torch.arange(len(context) - 1, ids.size(1) - 1), continuation].sum()))
        assert prediction["logprobs"] == pytest.approx(expected, abs=1e-4)


def test_evaluate_generate_gives_transformers_greedy_answers(byte_llama, tmp_path, capsys):
    hf, _, directory, _ = byte_llama
    rows = [{"source": "A dog runs.", "target": "Ein Hund rennt."}, {"source": "Two men.", "target": "Zwei Männer."},
            {"source": "A much longer sentence to translate, so the batch is padded.", "target": "Ein Satz."}]
    (tmp_path / "mt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_cli(capsys, "generate", "--model", directory, "--task", "translation", "--data", tmp_path / "mt.jsonl",
            "--device", "cpu", "--max-new-tokens", 8, "--batch-size", 3, "--output", tmp_path / "g.json",
            "--no-progress")
    predictions = [json.loads(line) for line in (tmp_path / "g.predictions.jsonl").read_text().splitlines()]
    expected = [evaluation.first_line(hf_greedy_text(hf, evaluation.build_prompt("translation", row), 8))
                for row in rows]
    assert [p["prediction"] for p in predictions] == expected
    report = json.loads((tmp_path / "g.json").read_text())
    assert report["metrics"]["bleu"]["score"] == pytest.approx(metrics.bleu(expected, [r["target"] for r in rows])["score"])


def hf_labels(clf, texts: list[str]) -> tuple[list[str], torch.Tensor]:
    with torch.no_grad():
        probs = torch.cat([torch.softmax(clf(torch.tensor([TOK.encode(t)])).logits, -1) for t in texts])
    return [clf.config.id2label[i] for i in probs.argmax(-1).tolist()], probs


TEXTS = ["a lovely film", "awful", "the plot was dull and the cast was poor", "great", "fine"]


def test_evaluate_classify_predicts_the_labels_of_transformers(byte_llama, tmp_path, capsys):
    _, clf, _, directory = byte_llama
    rows = [{"text": t, "label": label} for t, label in zip(TEXTS, ["positive", "negative"] * 3)]
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_cli(capsys, "classify", "--model", directory, "--data", tmp_path / "val.jsonl", "--device", "cpu",
            "--batch-size", 2, "--output", tmp_path / "k.json", "--no-progress")
    expected, _ = hf_labels(clf, TEXTS)
    predictions = [json.loads(line) for line in (tmp_path / "k.predictions.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in predictions] == expected
    report = json.loads((tmp_path / "k.json").read_text())
    right = sum(e == r["label"] for e, r in zip(expected, rows))
    assert report["metrics"]["accuracy"] == pytest.approx(right / len(rows))


def test_pipelines_on_llama_directories_equal_transformers(byte_llama):
    hf, clf, lm_dir, clf_dir = byte_llama
    prompts = ["Hello", "A longer prompt, so the batch is left-padded"]
    generate = pipeline("text-generation", model=lm_dir, device="cpu")
    batched = generate(prompts, max_new_tokens=8, return_full_text=False)
    assert [b[0]["generated_text"] for b in batched] == [hf_greedy_text(hf, p, 8) for p in prompts]
    assert generate(prompts[0], max_new_tokens=3)[0]["generated_text"].startswith("Hello")
    classify = pipeline("text-classification", model=clf_dir, device="cpu", batch_size=2)
    labels, probs = hf_labels(clf, TEXTS)
    results = classify(TEXTS)
    assert [r["label"] for r in results] == labels
    assert [r["score"] for r in results] == pytest.approx(probs.max(-1).values.tolist(), abs=1e-5)
