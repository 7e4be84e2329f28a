"""`lmforge run TASK`: a pipeline over a JSONL file (tiny models built here), atomic output, bad input."""

from __future__ import annotations

import json

import pytest
from conftest import byte_level_lm
import torch

from lmforge.cli import main


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return byte_level_lm(tmp_path_factory.mktemp("lm") / "model", n_positions=128)


@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory):
    from lmforge.config import GPTConfig
    from lmforge.tasks import GPTForSequenceClassification
    from lmforge.tokenizer import Tokenizer

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("clf") / "model"
    GPTForSequenceClassification(GPTConfig(vocab_size=257, n_positions=64, n_embd=32, n_layer=2, n_head=4),
                                 ["negative", "positive"]).save_pretrained(d, tokenizer=Tokenizer.byte_level())
    return d


COMMON = ["--device", "cpu", "--no-progress"]


def test_sentiment_keeps_rows_and_gold_label_and_matches_the_pipeline(tmp_path, clf_dir, capsys):
    rows = [{"text": t, "label": y, "id": i} for i, (t, y) in
            enumerate([("a gorgeous film", "positive"), ("dull and long", "negative"), ("fine", "positive"),
                       ("", "negative"), ("bad " * 40, "negative")])]
    src, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "sub" / "out.jsonl"
    assert main(["run", "sentiment-analysis", "--model", str(clf_dir), "--input", str(src), "--output", str(out),
                 "--batch-size", "2", *COMMON]) == 0
    assert "5 rows" in capsys.readouterr().out
    got = read_jsonl(out)
    assert [r["id"] for r in got] == [0, 1, 2, 3, 4]
    assert all(r["label"] == row["label"] and r["text"] == row["text"] for r, row in zip(got, rows))  # gold kept
    from lmforge.tasks import pipeline

    expected = pipeline("text-classification", model=clf_dir, device="cpu")([r["text"] for r in rows])
    assert [r["predicted_label"] for r in got] == [e["label"] for e in expected]
    assert [r["score"] for r in got] == pytest.approx([e["score"] for e in expected], abs=1e-5)
    assert not [p for p in out.parent.iterdir() if p.name != "out.jsonl"]  # no temp file left


@pytest.mark.parametrize("task,key", [("text-generation", "generated_text"), ("translation", "translation_text"),
                                      ("summarization", "summary_text")])
def test_generative_tasks_with_field_and_max_new_tokens(tmp_path, lm_dir, task, key):
    rows = [{"src": "A dog runs.", "n": 1}, {"src": "Two cats sleep on a mat.", "n": 2}, {"src": "Hi", "n": 3}]
    src, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    assert main(["run", task, "--model", str(lm_dir), "--input", str(src), "--output", str(out), "--field", "src",
                 "--max-new-tokens", "4", "--batch-size", "2", *COMMON]) == 0
    got = read_jsonl(out)
    assert [r["n"] for r in got] == [1, 2, 3] and all(isinstance(r[key], str) for r in got)
    if task == "text-generation":  # return_full_text: the prompt, then the continuation
        assert all(r[key].startswith(r["src"]) for r in got)


def test_question_answering_reads_question_and_context(tmp_path, lm_dir):
    rows = [{"question": "Who went home?", "context": "Bob went home."}, {"question": "What?", "context": "Nothing."}]
    src, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    assert main(["run", "question-answering", "--model", str(lm_dir), "--input", str(src), "--output", str(out),
                 "--max-new-tokens", "3", *COMMON]) == 0
    got = read_jsonl(out)
    assert len(got) == 2 and all({"question", "context", "answer", "score", "start", "end"} <= set(r) for r in got)
    assert main(["run", "question-answering", "--model", str(lm_dir), "--input", str(src), "--output", str(out),
                 "--field", "text", *COMMON]) == 2


def test_failure_mid_run_leaves_no_partial_output(tmp_path, clf_dir, monkeypatch):
    from lmforge.tasks import batch_run

    src = write_jsonl(tmp_path / "in.jsonl", [{"text": f"row {i}"} for i in range(6)])
    out = tmp_path / "out.jsonl"
    out.write_text("previous results\n")
    real, calls = batch_run._results, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed mid-run")
        return real(*args, **kwargs)

    monkeypatch.setattr(batch_run, "_results", failing)
    with pytest.raises(RuntimeError, match="killed mid-run"):
        batch_run.run_file("sentiment-analysis", clf_dir, src, out, batch_size=2, device="cpu", progress=False)
    assert out.read_text() == "previous results\n"  # the old file, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # no temp file
    monkeypatch.undo()
    summary = batch_run.run_file("sentiment-analysis", clf_dir, src, out, batch_size=4, device="cpu", progress=False)
    assert summary.rows == 6 and len(read_jsonl(out)) == 6


@pytest.mark.parametrize("lines,message", [
    ([{"text": "ok"}, {"review": "no text field"}], "in.jsonl:2: missing field(s) ['text']"),
    ([{"text": "ok"}, {"text": "ok"}, '{"text": "broken'], "in.jsonl:3: not valid JSON"),
    ([{"text": 5}], "in.jsonl:1: field 'text' must be a string"),
    (["[1, 2]"], "in.jsonl:1: expected a JSON object"),
])
def test_bad_input_names_file_and_line_and_writes_nothing(tmp_path, clf_dir, capsys, lines, message):
    src = tmp_path / "in.jsonl"
    src.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    out = tmp_path / "out.jsonl"
    assert main(["run", "sentiment-analysis", "--model", str(clf_dir), "--input", str(src), "--output", str(out),
                 *COMMON]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_unknown_task_and_options_that_do_not_apply(tmp_path, clf_dir, capsys):
    src, out = write_jsonl(tmp_path / "in.jsonl", [{"text": "x"}]), tmp_path / "out.jsonl"
    assert main(["run", "poetry", "--model", str(clf_dir), "--input", str(src), "--output", str(out), *COMMON]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'poetry'" in err and "question-answering" in err
    assert main(["run", "sentiment-analysis", "--model", str(clf_dir), "--input", str(src), "--output", str(out),
                 "--max-new-tokens", "5", *COMMON]) == 2
    assert "does not generate" in capsys.readouterr().err
    assert main(["run", "text-classification", "--model", str(clf_dir), "--input", str(tmp_path / "nope.jsonl"),
                 "--output", str(out), *COMMON]) == 2
    assert "nope.jsonl: no such file" in capsys.readouterr().err
    assert not out.exists()


def test_inputs_longer_than_the_context_keep_their_end(tmp_path, lm_dir):
    """A document longer than the context loses its beginning; the continuation is still returned
    (it used to come back empty: the new tokens were sliced at the untruncated prompt width)."""
    from lmforge import load_model
    from lmforge.tasks import pipeline
    from lmforge.tokenizer import Tokenizer

    document = "word " * 60  # 300 bytes + the template: more than the 128-token context
    got = pipeline("summarization", model=lm_dir, device="cpu")([document], max_new_tokens=8, stop_strings=[])
    tok, model = Tokenizer.from_pretrained(lm_dir), load_model(lm_dir, device="cpu")
    ids = torch.tensor([tok.encode(document + "\nTL;DR:")[-(128 - 8):]])
    out = model.generate(ids, max_new_tokens=8, return_dict_in_generate=True).sequences
    expected = tok.decode(out[0, ids.size(1):].tolist(), skip_special_tokens=True).strip().split("\n", 1)[0].strip()
    assert got == [{"summary_text": expected}]
