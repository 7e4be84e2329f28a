"""lmforge.evaluation and `lmforge evaluate`: running models over data, reports, predictions, plots, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmforge import evaluation, load_model, metrics
from lmforge.cli import main
from lmforge.errors import ConfigError, DataError

from conftest import hf_gpt2

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class CharTokenizer:
    """A stand-in with the Tokenizer contract (encode/decode/eos/batch call) over printable ASCII.
    id 0 = EOS, 1..95 = ' '..'~', 96 = newline, 97 = anything else; fits the tiny models' vocab of 101."""

    eos_token_id = 0

    def encode(self, text: str) -> list[int]:
        return [96 if c == "\n" else ord(c) - 31 if 32 <= ord(c) <= 126 else 97 for c in text]

    def decode(self, ids) -> str:
        return "".join("\n" if i == 96 else chr(i + 31) if 1 <= i <= 95 else "?" if i == 97 else "" for i in ids)

    def __call__(self, texts, padding=True, padding_side="left", return_tensors="pt"):
        enc = [self.encode(t) for t in texts]
        T = max(len(e) for e in enc)
        ids = torch.zeros(len(enc), T, dtype=torch.long)
        mask = torch.zeros(len(enc), T, dtype=torch.long)
        for r, e in enumerate(enc):
            ids[r, T - len(e):] = torch.tensor(e, dtype=torch.long)
            mask[r, T - len(e):] = 1
        return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = hf_gpt2(seed=5)
    directory = tmp_path_factory.mktemp("eval") / "tiny"
    hf.save_pretrained(directory)
    return hf, load_model(directory, device="cpu"), directory


def run_cli(capsys, *argv):
    rc = main(["evaluate", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


# ---- perplexity ---------------------------------------------------------------------------------


def test_perplexity_report_predictions_and_plot(tiny, tmp_path):
    _, model, directory = tiny
    ids = torch.randint(0, 101, (300,), generator=torch.Generator().manual_seed(1))
    result = evaluation.evaluate_perplexity(model, ids, max_length=64, stride=16, batch_size=2)
    assert result.metrics["perplexity"] == pytest.approx(
        metrics.perplexity(model, ids, max_length=64, stride=16).perplexity, rel=1e-6)
    by_context = result.metrics["by_context"]
    assert sum(b["n_tokens"] for b in by_context) == result.metrics["n_tokens"] == 299
    report = evaluation.build_report(result, dataset={"path": "x"}, model=evaluation.describe_model(model, directory),
                                     started=0.0)
    written = evaluation.write_report(result, report, tmp_path / "ppl.json", plot=True)
    saved = json.loads((tmp_path / "ppl.json").read_text())
    assert set(saved) >= {"task", "metrics", "dataset", "model", "settings", "versions", "time"}
    assert saved["settings"] == {"max_length": 64, "stride": 16, "batch_size": 2, "dtype": "model"}
    assert saved["model"]["n_positions"] == 64 and saved["versions"]["sacrebleu"] != "not installed"
    assert written["plot"].read_bytes().startswith(PNG_MAGIC)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_cli_perplexity_on_a_token_file(tiny, tmp_path, capsys):
    hf, model, directory = tiny
    ids = np.random.default_rng(0).integers(0, 101, 200).astype(np.uint16)
    np.save(tmp_path / "val.npy", ids)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 0, "loss": 4.6}\n{"step": 10, "loss": 3.9, "val_loss": 4.0}\n')
    rc, out, err = run_cli(capsys, "perplexity", "--model", directory, "--data", tmp_path / "val.npy",
                           "--device", "cpu", "--max-length", 32, "--stride", 16, "--output", tmp_path / "r.json",
                           "--plot", "--run-dir", tmp_path / "run", "--no-progress")
    assert rc == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    want = metrics.perplexity(model, ids, max_length=32, stride=16).perplexity
    assert report["metrics"]["perplexity"] == pytest.approx(want, rel=1e-6)
    assert report["dataset"]["n_tokens"] == 200 and len(report["dataset"]["sha256"]) == 64
    assert "perplexity" in out and (tmp_path / "r.png").exists()
    assert (tmp_path / "r.loss.png").read_bytes().startswith(PNG_MAGIC) and report["plots"] == ["r.png", "r.loss.png"]


def test_cli_window_longer_than_the_context_names_the_option(tiny, tmp_path, capsys):
    _, _, directory = tiny
    np.save(tmp_path / "val.npy", np.arange(100) % 101)
    rc, _, err = run_cli(capsys, "perplexity", "--model", directory, "--data", tmp_path / "val.npy",
                         "--device", "cpu", "--max-length", 128, "--output", tmp_path / "r.json")
    assert rc == 2 and "--max-length 128" in err and "n_positions=64" in err
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros(0, dtype=np.int64))
    rc, _, err = run_cli(capsys, "perplexity", "--model", directory, "--data", empty, "--device", "cpu",
                         "--output", tmp_path / "r.json")
    assert rc == 2 and str(empty) in err and "empty" in err


def test_loss_curves_of_a_run_directory(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "loss": 5 / (s + 1), **(
        {"val_loss": 6 / (s + 1)} if s % 5 == 0 else {})}) for s in range(20)) + "\n")
    evaluation.plot_loss_curves(run, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(DataError, match="no training log"):
        evaluation.plot_loss_curves(tmp_path, tmp_path / "x.png")


# ---- multiple choice ----------------------------------------------------------------------------


def test_encode_pair_follows_lm_evaluation_harness():
    tok = CharTokenizer()
    assert evaluation.encode_pair(tok, "Q: a?  ", "b") == (tok.encode("Q: a?"), tok.encode("  b"))
    assert evaluation.encode_pair(tok, "", " b") == ([0], tok.encode(" b"))


def test_choice_scores_every_choice_like_transformers(tiny):
    hf, model, _ = tiny
    tok = CharTokenizer()
    items = [{"context": "The sky is", "choices": ["blue", "green", "a very long answer"], "gold": 0},
             {"context": "2 + 2 =", "choices": ["4", "five"], "gold": "five"},
             {"context": "x" * 80, "choices": ["y", "zz"], "gold": 1}]
    result = evaluation.evaluate_choice(model, tok, items, batch_size=3)
    want_lls = []
    for item in items:
        lls = []
        for choice in item["choices"]:
            ctx, cont = tok.encode(item["context"]), tok.encode(" " + choice)
            inp = torch.tensor((ctx + cont)[-65:][:-1])[None]
            with torch.no_grad():
                logp = torch.log_softmax(hf(inp).logits[0], -1)[-len(cont):]
            lls.append(float(logp[torch.arange(len(cont)), torch.tensor(cont)].sum()))
        want_lls.append(lls)
    for got, want in zip(result.predictions, want_lls):
        assert got["logprobs"] == pytest.approx(want, rel=1e-5, abs=1e-4)
    golds = [0, 1, 1]
    want = metrics.multiple_choice(want_lls, golds, [[len(c) for c in i["choices"]] for i in items])
    assert result.metrics["acc"] == pytest.approx(want["acc"])
    assert result.metrics["acc_norm"] == pytest.approx(want["acc_norm"])
    with pytest.raises(DataError, match="row 1.*not one of its choices"):
        evaluation.evaluate_choice(model, tok, [{"context": "a", "choices": ["b"], "gold": "c"}])
    with pytest.raises(DataError, match=r"row 1 lacks field\(s\) \['choices'\]"):
        evaluation.evaluate_choice(model, tok, [{"context": "a", "gold": 0}])


# ---- classification -----------------------------------------------------------------------------


def test_classification_scorer_works_with_any_callable(tmp_path):
    rows = [{"text": t, "label": lab} for t, lab in [("good film", "positive"), ("bad plot", "negative"),
                                                      ("good bad", "negative"), ("fine", "positive")]]
    result = evaluation.evaluate_classification(
        lambda texts: ["positive" if "good" in t else "negative" for t in texts], rows, batch_size=3)
    preds = ["positive", "negative", "positive", "negative"]
    assert result.metrics == metrics.classification_metrics(preds, [r["label"] for r in rows])
    assert [p["prediction"] for p in result.predictions] == preds
    written = evaluation.write_report(result, {"task": "classify"}, tmp_path / "c.json", plot=True)
    assert written["plot"].read_bytes().startswith(PNG_MAGIC)
    lines = (tmp_path / "c.predictions.jsonl").read_text().splitlines()
    assert json.loads(lines[2]) == {"text": "good bad", "label": "negative", "prediction": "positive"}
    assert "confusion matrix" in evaluation.format_table(result)
    with pytest.raises(DataError, match="returned 1 labels for 3 texts"):
        evaluation.evaluate_classification(lambda texts: ["x"], rows, batch_size=3)


def test_cli_classify_on_a_language_model_says_it_needs_a_classification_head(tiny, tmp_path, capsys):
    _, _, directory = tiny
    data = tmp_path / "val.jsonl"
    data.write_text('{"text": "a", "label": "positive"}\n')
    rc, _, err = run_cli(capsys, "classify", "--model", directory, "--data", data, "--output", tmp_path / "r.json")
    assert rc == 2 and "fine-tuning" in err and "evaluate score --metric classification" in err


# ---- generation ---------------------------------------------------------------------------------


def test_generation_batches_equal_one_prompt_at_a_time_and_are_scored(tiny):
    _, model, _ = tiny
    tok = CharTokenizer()
    rows = [{"context": "Paris, France.", "question": "Where?", "answers": ["France", "in France"]},
            {"context": "c" * 70, "question": "long?", "answers": ["yes"]},  # longer than the context: truncated
            {"context": "Sky.", "question": "Color?", "answers": ["blue"]}]
    config = evaluation.generation_config_for("qa", max_new_tokens=8)
    result = evaluation.evaluate_generation(model, tok, "qa", rows, generation_config=config, batch_size=3)
    assert result.settings["prompts_truncated"] == 1
    for row, pred in zip(rows, result.predictions):
        alone, _ = evaluation.generate_texts(model, tok, [evaluation.build_prompt("qa", row)],
                                             config.replace(eos_token_id=0, pad_token_id=0))
        assert pred["output"] == alone[0]
        assert pred["prediction"] == evaluation.first_line(alone[0])
        assert "\n" not in pred["output"]
    assert result.metrics == {"squad": metrics.squad([p["prediction"] for p in result.predictions],
                                                     [r["answers"] for r in rows])}
    with pytest.raises(DataError, match=r"row 1 lacks field\(s\) \['question'\]"):
        evaluation.evaluate_generation(model, tok, "qa", [{"context": "a", "answers": ["b"]}])


def test_task_templates_and_references():
    assert evaluation.build_prompt("translation", {"source": "A dog."}) == "Translate English to German:\nA dog.\nGerman:"
    assert evaluation.build_prompt("summarization", {"document": "Text."}) == "Text.\nTL;DR:"
    assert evaluation.task_references("summarization", {"summary": "a", "summaries": ["a", "b"]}) == ["a", "b"]
    assert evaluation.task_references("summarization", {"summary": "a"}) == ["a"]
    assert evaluation.first_line("  Berlin \nmore text") == "Berlin"
    with pytest.raises(ConfigError, match="--task"):
        evaluation.build_prompt("poetry", {})


# ---- score --------------------------------------------------------------------------------------


def test_cli_score_bleu_and_chrf_from_text_files(tmp_path, capsys):
    import sacrebleu

    preds = ["Ein Hund läuft im Park.", "", "Zwei Männer spielen Fußball auf dem Rasen."]
    refs = ["Ein Hund rennt im Park.", "Eine Frau liest.", "Zwei Männer spielen Fußball."]
    (tmp_path / "p.txt").write_text("\n".join(preds) + "\n", encoding="utf-8")
    (tmp_path / "r.txt").write_text("\n".join(refs) + "\n", encoding="utf-8")
    rc, out, err = run_cli(capsys, "score", "--predictions", tmp_path / "p.txt", "--references", tmp_path / "r.txt",
                           "--metric", "bleu,chrf", "--output", tmp_path / "s.json")
    assert rc == 0, err
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["metrics"]["bleu"]["score"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
    assert report["metrics"]["chrf"]["score"] == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score)
    assert "tok:13a" in out and "bleu.score" in out
    saved = [json.loads(line) for line in (tmp_path / "s.predictions.jsonl").read_text().splitlines()]
    assert [s["prediction"] for s in saved] == preds


def test_cli_score_reads_references_from_a_predictions_jsonl(tmp_path, capsys):
    rows = [{"prediction": "Denver Broncos", "answers": ["Denver Broncos", "Broncos"]},
            {"prediction": "the stadium", "answers": ["Levi's Stadium"]}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, _, err = run_cli(capsys, "score", "--predictions", tmp_path / "p.jsonl", "--metric", "squad",
                         "--output", tmp_path / "s.json")
    assert rc == 0, err
    got = json.loads((tmp_path / "s.json").read_text())["metrics"]["squad"]
    assert got == metrics.squad([r["prediction"] for r in rows], [r["answers"] for r in rows])


def test_cli_score_classification_plots_the_confusion_matrix(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("positive\nnegative\npositive\n")
    (tmp_path / "r.txt").write_text("positive\npositive\nnegative\n")
    rc, out, err = run_cli(capsys, "score", "--predictions", tmp_path / "p.txt", "--references", tmp_path / "r.txt",
                           "--metric", "accuracy", "--plot", "--output", tmp_path / "s.json")
    assert rc == 0, err
    assert json.loads((tmp_path / "s.json").read_text())["metrics"]["classification"]["accuracy"] == pytest.approx(1 / 3)
    assert (tmp_path / "s.png").read_bytes().startswith(PNG_MAGIC) and "confusion matrix" in out


def test_cli_score_bad_input_names_the_file_or_option(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a\nb\nc\n")
    (tmp_path / "r.txt").write_text("a\nb\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"prediction": "a"}\n{oops\n')
    common = ["--output", tmp_path / "s.json"]
    rc, _, err = run_cli(capsys, "score", "--predictions", tmp_path / "p.txt", "--references", tmp_path / "r.txt",
                         "--metric", "bleu", *common)
    assert rc == 2 and "p.txt has 3 rows" in err and "r.txt" in err and "has 2" in err
    rc, _, err = run_cli(capsys, "score", "--predictions", tmp_path / "empty.txt", "--references", tmp_path / "r.txt",
                         "--metric", "bleu", *common)
    assert rc == 2 and "--predictions" in err and "empty.txt" in err and "empty" in err
    rc, _, err = run_cli(capsys, "score", "--predictions", tmp_path / "p.txt", "--references", tmp_path / "p.txt",
                         "--metric", "bleuu", *common)
    assert rc == 2 and "unknown metric 'bleuu' for --metric" in err and "did you mean 'bleu'" in err
    rc, _, err = run_cli(capsys, "score", "--predictions", tmp_path / "bad.jsonl", "--metric", "bleu", *common)
    assert rc == 2 and "bad.jsonl:2" in err and "not valid JSON" in err
    rc, _, err = run_cli(capsys, "score", "--predictions", tmp_path / "nope.txt", "--references", tmp_path / "r.txt",
                         "--metric", "bleu", *common)
    assert rc == 2 and "nope.txt" in err and "no such file" in err
    assert not (tmp_path / "s.json").exists()


# ---- end to end with a real tokenizer -------------------------------------------------------------


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    """A tiny checkpoint whose directory also holds lmforge's byte-level tokenizer (vocab 257)."""
    from lmforge.tokenizer import Tokenizer

    hf = hf_gpt2(seed=6, vocab_size=257, n_positions=128, bos_token_id=256, eos_token_id=256)
    directory = tmp_path_factory.mktemp("bytes") / "tiny"
    hf.save_pretrained(directory)
    Tokenizer.byte_level().save_pretrained(directory)
    return hf, load_model(directory, device="cpu"), Tokenizer.from_pretrained(directory), directory


def test_cli_perplexity_of_a_text_file_equals_transformers(byte_model, tmp_path, capsys):
    hf, model, tok, directory = byte_model
    text = "Perplexity of fixed-length models, ünïcode included. " * 8
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    rc, _, err = run_cli(capsys, "perplexity", "--model", directory, "--data", tmp_path / "t.txt", "--device", "cpu",
                         "--stride", 64, "--batch-size", 3, "--output", tmp_path / "r.json", "--no-progress")
    assert rc == 0, err
    ids = torch.tensor(tok.encode(text))[None]
    nll, n = 0.0, 0
    for begin, end, first in metrics.sliding_windows(ids.size(1), 128, 64):
        labels = ids[:, begin:end].clone()
        labels[:, : first - begin] = -100
        with torch.no_grad():
            loss = hf(ids[:, begin:end], labels=labels).loss
        nll, n = nll + float(loss) * (end - first), n + end - first
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["metrics"]["perplexity"] == pytest.approx(float(np.exp(nll / n)), rel=1e-4)
    assert report["metrics"]["n_tokens"] == n == len(text.encode()) - 1


def test_cli_choice_and_generate_end_to_end(byte_model, tmp_path, capsys):
    _, model, tok, directory = byte_model
    items = [{"context": "The capital of France is", "choices": ["Paris", "Rome", "a cheese"], "gold": 0},
             {"context": "Water is", "choices": ["wet", "dry"], "gold": 0}]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    rc, out, err = run_cli(capsys, "choice", "--model", directory, "--data", tmp_path / "items.jsonl",
                           "--device", "cpu", "--output", tmp_path / "c.json", "--no-progress")
    assert rc == 0, err
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["metrics"] == evaluation.evaluate_choice(model, tok, items).metrics
    assert len((tmp_path / "c.predictions.jsonl").read_text().splitlines()) == 2 and "acc_norm" in out

    rows = [{"source": "A dog runs.", "target": "Ein Hund rennt."}, {"source": "Two men.", "target": "Zwei Männer."}]
    (tmp_path / "mt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out, err = run_cli(capsys, "generate", "--model", directory, "--task", "translation", "--data",
                           tmp_path / "mt.jsonl", "--device", "cpu", "--max-new-tokens", 6,
                           "--output", tmp_path / "g.json", "--no-progress")
    assert rc == 0, err
    report = json.loads((tmp_path / "g.json").read_text())
    preds = [json.loads(line) for line in (tmp_path / "g.predictions.jsonl").read_text().splitlines()]
    assert report["metrics"]["bleu"]["score"] == pytest.approx(
        metrics.bleu([p["prediction"] for p in preds], [r["target"] for r in rows])["score"])
    assert report["settings"]["generation"]["max_new_tokens"] == 6
    assert report["settings"]["template"] == evaluation.PROMPT_TEMPLATES["translation"]
    assert "nrefs:1" in out


@pytest.mark.parametrize("task, folder", [("translation", "multi30k"), ("summarization", "scitldr"), ("qa", "squad")])
def test_generate_on_the_shared_datasets(byte_model, shared_data, tmp_path, capsys, task, folder):
    _, _, _, directory = byte_model
    rc, _, err = run_cli(capsys, "generate", "--model", directory, "--task", task, "--data",
                         shared_data / folder / "validation.jsonl", "--limit", 2, "--max-new-tokens", 4,
                         "--device", "cpu", "--output", tmp_path / "g.json", "--no-progress")
    assert rc == 0, err
    report = json.loads((tmp_path / "g.json").read_text())
    assert report["dataset"]["n_examples"] == 2
    assert set(report["metrics"]) == set(evaluation.TASK_METRICS[task])
    preds = [json.loads(line) for line in (tmp_path / "g.predictions.jsonl").read_text().splitlines()]
    if task == "summarization":  # scitldr: every reference TLDR is kept for multi-reference ROUGE
        assert all(len(p["references"]) >= 1 for p in preds)


def test_perplexity_on_wikitext2_validation(byte_model, shared_data, tmp_path, capsys):
    _, model, tok, directory = byte_model
    data = shared_data / "wikitext2" / "validation.txt"
    rc, _, err = run_cli(capsys, "perplexity", "--model", directory, "--data", data, "--max-tokens", 2000,
                         "--device", "cpu", "--batch-size", 4, "--output", tmp_path / "w.json", "--plot", "--no-progress")
    assert rc == 0, err
    report = json.loads((tmp_path / "w.json").read_text())
    ids = tok.encode(data.read_text(encoding="utf-8")[:40000])[:2000]
    assert report["metrics"]["perplexity"] == pytest.approx(metrics.perplexity(model, ids).perplexity, rel=1e-6)
    assert (tmp_path / "w.png").exists()


def test_cli_perplexity_on_a_prepared_token_dataset(byte_model, tmp_path, capsys):
    from lmforge.data import TokenDataset, prepare

    _, model, tok, directory = byte_model
    (tmp_path / "corpus.txt").write_text("Some text to prepare, with a validation split at the end. " * 30)
    prepare(tmp_path / "corpus.txt", tok, tmp_path / "ds", val_fraction=0.2, show_progress=False)
    rc, _, err = run_cli(capsys, "perplexity", "--model", directory, "--data", tmp_path / "ds", "--device", "cpu",
                         "--output", tmp_path / "r.json", "--no-progress")
    assert rc == 0, err
    val = TokenDataset(tmp_path / "ds", "val").tokens
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["dataset"]["split"] == "val" and report["dataset"]["n_tokens"] == len(val)
    assert report["metrics"]["perplexity"] == pytest.approx(metrics.perplexity(model, val).perplexity, rel=1e-6)
    rc, _, err = run_cli(capsys, "perplexity", "--model", directory, "--data", tmp_path / "ds", "--split", "test",
                         "--device", "cpu", "--output", tmp_path / "r.json")
    assert rc == 2 and "no split 'test'" in err
