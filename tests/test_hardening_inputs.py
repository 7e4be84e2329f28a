"""Hardening of inputs (issue 18): CSV/TSV read as well as JSONL by `finetune`, `run` and `evaluate`
(one reader, columns by name); finetune runs compare their data by content on --resume and resume
without retyping; a classifier's --best-metric is checked before training; the server's config
dataclasses are type-checked; SamplingParams refuses seeds and logit biases out of range."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil

import pytest
from conftest import byte_level_lm
import torch

from lmforge.errors import ConfigError, DataError

TRAIN_FLAGS = ["--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "1", "--eval-interval", "2", "--log-interval", "1",
               "--no-progress", "--device", "cpu", "--no-plot", "--seed", "5"]



def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_table(path, rows, delimiter=","):
    columns = list(rows[0])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(columns)
        for r in rows:
            w.writerow([json.dumps(r[c]) if isinstance(r[c], (list, dict)) else r[c] for c in columns])
    return path


def sentiment_rows(n, seed=0):
    rng = random.Random(seed)
    words = {1: ["good", "great, truly", "nice"], 0: ["bad", "awful", "dull\nand long"]}
    return [{"text": f"it was {rng.choice(words[y])}", "label": y} for y in (rng.choice([0, 1]) for _ in range(n))]


# ---- the one reader -------------------------------------------------------------------------------------


def test_csv_and_tsv_rows_are_the_jsonl_rows_as_text(tmp_path):
    from lmforge.tasks.data import read_records

    rows = [{"text": 'a "quoted", comma', "label": "pos"}, {"text": "two\nlines", "label": "neg"}, {"text": "", "label": "x"}]
    jsonl = read_records(write_jsonl(tmp_path / "a.jsonl", rows), ["text", "label"])
    for name, delimiter in (("a.csv", ","), ("a.tsv", "\t")):
        table = read_records(write_table(tmp_path / name, rows, delimiter), ["text", "label"])
        assert [r.row for r in table] == [r.row for r in jsonl]
        assert [r.line for r in table] == [2, 3, 5] and all(r.table for r in table)  # where each record starts
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbftext,label\r\nhi,pos\r\n\r\n")  # a spreadsheet's export
    assert [r.row for r in read_records(tmp_path / "bom.csv", ["text", "label"])] == [{"text": "hi", "label": "pos"}]


@pytest.mark.parametrize("name,body,message", [
    ("m.csv", "text,lab\nx,y\n", r"--train .*m.csv: no column 'label' \(the header row has \['text', 'lab'\]\)"),
    ("t.tsv", "text,label\nx,y\n", r"no column 'text', 'label' .*looks comma-separated: name it t.csv"),
    ("n.csv", b"text,label\nok,1\n\xff\xfe,2\n", r"--train .*n.csv:3: not UTF-8 text \(byte 0xff"),
    ("c.csv", "text,label\nx,y,z\n", r"c.csv:2: 3 cells, but the header row has 2 columns"),
    ("e.csv", "\n\n", r"e.csv: the file is empty; a CSV file needs a header row"),
    ("h.csv", "text,ok\n", r"h.csv: no column 'label'"),
    ("d.csv", "text,text,label\na,b,c\n", r"d.csv:1: the header row names column\(s\) \['text'\] more than once"),
    ("q.csv", 'text,label\n"x,1\n', r"q.csv:\d+: not valid CSV"),
])
def test_bad_tables_name_the_file_the_line_and_the_columns(tmp_path, name, body, message):
    from lmforge.tasks.data import read_records

    path = tmp_path / name
    path.write_bytes(body if isinstance(body, bytes) else body.encode())
    with pytest.raises(DataError, match=message):
        read_records(path, ["text", "label"])


def test_structured_cells_hold_json_and_an_indexed_text_slot_is_not_cut_to_a_character(tmp_path):
    from lmforge.tasks.data import read_records
    from lmforge.tasks.sft import CHAT, make_template

    qa = make_template("qa")
    assert qa.structured_fields == ["answers"] and CHAT.structured_fields == ["messages"]
    rows = [{"context": "Paris is in France.", "question": "Capital?", "answers": "Paris"},
            {"context": "c", "question": "q", "answers": ["Lyon", "lyon"]}]
    records = read_records(write_table(tmp_path / "qa.tsv", rows, "\t"), qa.fields, json_fields=qa.structured_fields)
    assert [r.row["answers"] for r in records] == ["Paris", ["Lyon", "lyon"]]
    # "{answers[0]}" of a text answer (a CSV cell, or a JSONL string) used to give its first character, "P"
    assert [qa.render_response(r.row) for r in records] == [" Paris", " Lyon"]
    chat = [{"messages": [{"role": "user", "content": "hi, there"}, {"role": "assistant", "content": "[hello]"}]}]
    got = read_records(write_table(tmp_path / "chat.csv", chat), ["messages"], json_fields=CHAT.structured_fields)
    assert got[0].row == chat[0]
    # a text column is never parsed, even when it looks like JSON
    plain = read_records(write_table(tmp_path / "p.csv", [{"text": "[1, 2]"}]), ["text"])
    assert plain[0].row["text"] == "[1, 2]"


# ---- finetune -----------------------------------------------------------------------------------------


def test_finetune_classify_on_csv_trains_the_same_classifier_as_on_jsonl(tmp_path, main):
    from safetensors.torch import load_file

    rows = sentiment_rows(24)
    outs = {}
    for name, path in (("jsonl", write_jsonl(tmp_path / "t.jsonl", rows)), ("csv", write_table(tmp_path / "t.csv", rows))):
        outs[name] = tmp_path / f"run_{name}"
        code, _, err = main("finetune", "classify", "--preset", "tiny", "--train", path, "--val", path,
                            "--out", outs[name], "--max-steps", "3", *TRAIN_FLAGS)
        assert code == 0, err
    configs = [json.loads((outs[k] / "model" / "config.json").read_text()) for k in ("jsonl", "csv")]
    assert configs[0]["label2id"] == configs[1]["label2id"] == {"0": 0, "1": 1}  # "0"/"1" cells are class ids
    assert configs[0].get("lmforge_label_type") == configs[1].get("lmforge_label_type")
    a, b = (load_file(outs[k] / "model" / "model.safetensors") for k in ("jsonl", "csv"))
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_finetune_sft_reads_a_tsv_with_plain_text_answers(tmp_path, main):
    rows = [{"context": f"The code is {i}.", "question": "What is the code?", "answers": str(i)} for i in range(8)]
    code, _, err = main("finetune", "sft", "--preset", "tiny", "--task", "qa",
                        "--train", write_table(tmp_path / "qa.tsv", rows, "\t"), "--eval-batches", "0",
                        "--out", tmp_path / "run", "--max-steps", "1", *TRAIN_FLAGS)
    assert code == 0, err
    assert "train: 8 examples" in err
    code, _, err = main("finetune", "sft", "--preset", "tiny", "--task", "qa",
                        "--train", write_table(tmp_path / "bad.csv", [{"context": "c", "question": "q"}]),
                        "--out", tmp_path / "run2", "--max-steps", "1", *TRAIN_FLAGS)
    assert code == 2 and "bad.csv: no column 'answers' (the header row has ['context', 'question'])" in err


def test_finetune_resume_compares_the_data_by_content_and_needs_no_retyping(tmp_path, main):
    data = tmp_path / "data"
    data.mkdir()
    train = write_table(data / "train.csv", sentiment_rows(24))
    out = tmp_path / "run"
    code, _, err = main("finetune", "classify", "--preset", "tiny", "--train", train, "--val", train, "--out", out,
                        "--max-steps", "2", "--save-interval", "2", *TRAIN_FLAGS)
    assert code == 0, err
    saved = json.loads((out / "config.json").read_text())
    assert len(saved["data"]["fingerprint"]) == 16 and saved["recipe"]["train"] == str(train)
    # other rows under the same name (and the same number of them): used to train on silently
    shutil.copy(train, tmp_path / "kept.csv")
    write_table(train, sentiment_rows(24, seed=1))
    code, _, err = main("finetune", "classify", "--out", out, "--resume", "--max-steps", "3", "--no-plot")
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("lmforge finetune: error: ") and "was trained on other data" in last
    # the same rows elsewhere, and the run directory renamed: used to refuse ("data.train" differs)
    os.rename(out, tmp_path / "moved")
    code, _, err = main("finetune", "classify", "--out", tmp_path / "moved", "--resume", "--train", tmp_path / "kept.csv",
                        "--val", tmp_path / "kept.csv", "--max-steps", "3", "--no-plot")
    assert code == 0, err
    assert "resumed from step 2" in err
    # nothing retyped but --out: the base, data and fields come from the run's config.json
    code, out_text, err = main("finetune", "classify", "--out", tmp_path / "moved", "--resume", "--max-steps", "4",
                               "--no-plot")
    assert code == 0, err
    assert "resumed from step 3" in err and "trained 4 steps" in out_text
    code, _, err = main("finetune", "classify", "--out", tmp_path / "moved", "--resume", "--max-steps", "5",
                        "--label-field", "text", "--no-plot")
    assert code == 2 and "data.label_field: 'label' -> 'text'" in err
    code, _, err = main("finetune", "sft", "--out", tmp_path / "moved", "--resume", "--no-plot")
    assert code == 2 and "is a classify run, not a finetune sft run" in err


def test_finetune_needs_a_base_and_data_unless_it_resumes(tmp_path, main):
    code, _, err = main("finetune", "classify", "--train", "t.csv", "--out", tmp_path / "r")
    assert code == 2 and "give the base model with --model" in err
    code, _, err = main("finetune", "sft", "--preset", "tiny", "--task", "qa", "--out", tmp_path / "r")
    assert code == 2 and "give the training data with --train FILE (.jsonl, .csv or .tsv)" in err
    assert not (tmp_path / "r").exists()


def test_a_classifier_best_metric_typo_is_refused_before_any_work(tmp_path, main):
    train = write_table(tmp_path / "t.csv", sentiment_rows(8))
    out = tmp_path / "run"
    code, _, err = main("finetune", "classify", "--preset", "tiny", "--train", train, "--val", train, "--out", out,
                        "--best-metric", "acuracy", "--max-steps", "4", *TRAIN_FLAGS)
    assert code == 2 and "did you mean 'accuracy'" in err
    assert not out.exists()  # used to train until the first evaluation, then fail
    code, _, err = main("finetune", "sft", "--preset", "tiny", "--task", "qa", "--train", train, "--out", out,
                        "--best-metric", "val_loss", *TRAIN_FLAGS)
    assert code == 2 and "reports no validation metrics" in err and not out.exists()


# ---- run and evaluate ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory):
    from lmforge.config import GPTConfig
    from lmforge.tasks import GPTForSequenceClassification
    from lmforge.tokenizer import Tokenizer

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("clf") / "model"
    GPTForSequenceClassification(GPTConfig(vocab_size=257, n_positions=64, n_embd=32, n_layer=2, n_head=4),
                                 [0, 1]).save_pretrained(d, tokenizer=Tokenizer.byte_level())
    return d


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return byte_level_lm(tmp_path_factory.mktemp("lm") / "model", n_positions=64)


def test_run_reads_csv_and_writes_csv_like_jsonl(tmp_path, clf_dir, main):
    rows = [dict(r, id=i) for i, r in enumerate(sentiment_rows(6))]
    common = ["run", "sentiment-analysis", "--model", clf_dir, "--device", "cpu", "--no-progress", "--batch-size", "4"]
    assert main(*common, "--input", write_jsonl(tmp_path / "in.jsonl", rows), "--output", tmp_path / "o.jsonl")[0] == 0
    code, _, err = main(*common, "--input", write_table(tmp_path / "in.csv", rows), "--output", tmp_path / "o.tsv")
    assert code == 0, err
    expected = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    with open(tmp_path / "o.tsv", newline="", encoding="utf-8") as f:
        got = list(csv.DictReader(f, delimiter="\t"))
    assert list(got[0]) == ["text", "label", "id", "predicted_label", "score"]
    assert [r["text"] for r in got] == [r["text"] for r in rows]  # quoted commas and newlines survive
    assert [int(r["predicted_label"]) for r in got] == [r["predicted_label"] for r in expected]
    assert [float(r["score"]) for r in got] == pytest.approx([r["score"] for r in expected], abs=1e-6)
    code, _, err = main(*common, "--input", tmp_path, "--output", tmp_path / "x.jsonl")
    assert code == 2 and "is a directory; pass a file" in err
    code, _, err = main(*common, "--input", write_table(tmp_path / "no.csv", [{"review": "x"}]),
                        "--output", tmp_path / "x.jsonl")
    assert code == 2 and "no.csv: no column 'text' (the header row has ['review'])" in err


def test_evaluate_reads_csv_like_jsonl(tmp_path, clf_dir, lm_dir, main):
    def metrics(*args):
        code, _, err = main("evaluate", *args, "--json", "--no-progress")
        assert code == 0, err
        return json.loads(_.strip().splitlines()[-1])["metrics"]

    rows = sentiment_rows(10)
    got = [metrics("classify", "--model", clf_dir, "--device", "cpu", "--data", p, "--output", tmp_path / f"c{i}.json")
           for i, p in enumerate((write_jsonl(tmp_path / "v.jsonl", rows), write_table(tmp_path / "v.csv", rows)))]
    assert got[0]["accuracy"] == got[1]["accuracy"]  # "1" cells against an integer-label classifier: not all wrong
    items = [{"context": "The sky is", "choices": ["blue", "green, or red"], "gold": 0},
             {"context": "Two plus two is", "choices": ["four", "five"], "gold": 1}]
    got = [metrics("choice", "--model", lm_dir, "--device", "cpu", "--data", p, "--output", tmp_path / f"m{i}.json")
           for i, p in enumerate((write_jsonl(tmp_path / "i.jsonl", items), write_table(tmp_path / "i.tsv", items, "\t")))]
    assert got[0] == got[1]
    preds = [{"prediction": "a cat sat", "references": ["a cat sat", "the cat sat"]}, {"prediction": "x", "references": ["y"]}]
    got = [metrics("score", "--metric", "bleu", "--predictions", p, "--output", tmp_path / f"s{i}.json")
           for i, p in enumerate((write_jsonl(tmp_path / "p.jsonl", preds), write_table(tmp_path / "p.csv", preds)))]
    assert got[0] == got[1]
    text = write_table(tmp_path / "ppl.csv", [{"text": "hello there"}, {"text": "general kenobi"}])
    ppl = metrics("perplexity", "--model", lm_dir, "--device", "cpu", "--data", text, "--output", tmp_path / "p.json")
    assert ppl["n_tokens"] == len("hello there\n\ngeneral kenobi") - 1


def test_evaluation_aligns_label_kinds_only_when_they_are_the_same_labels():
    from lmforge.evaluation.run import align_labels

    assert align_labels([0, 1], ["1", " 0"]) == [1, 0]
    assert align_labels(["1", "0"], [1, 0]) == ["1", "0"]
    assert align_labels([0, 1], ["pos", "1"]) == ["pos", "1"]


# ---- server configs -----------------------------------------------------------------------------------


def test_server_and_engine_configs_are_type_checked():
    from lmforge.serve import EngineConfig, SamplingParams, ServerConfig

    for make, message in [
        (lambda: EngineConfig(max_batch_size=True), r"EngineConfig.max_batch_size must be an integer, got True"),
        (lambda: EngineConfig(max_queue="4"), r"max_queue must be an integer, got '4'.*without quotes"),
        (lambda: EngineConfig(max_bach_size=4), r"did you mean 'max_batch_size'"),
        (lambda: ServerConfig(shutdown_timeout="1"), r"ServerConfig.shutdown_timeout must be a number"),
        (lambda: ServerConfig(host=0), r"ServerConfig.host must be a string"),
        (lambda: SamplingParams(temperature="0.5"), r"SamplingParams.temperature must be a number"),
        (lambda: SamplingParams(seed=2**64), r"SamplingParams.seed must be in -9223372036854775808\.\."),
        (lambda: SamplingParams(seed=-2**63 - 1), r"SamplingParams.seed must be in"),
        (lambda: SamplingParams(logit_bias={3: float("nan")}), r"logit_bias of token 3 must be a number in \[-100, 100\]"),
        (lambda: SamplingParams(logit_bias={3: 1e308}), r"logit_bias of token 3"),
    ]:
        with pytest.raises(ConfigError, match=message):
            make()
    assert SamplingParams(seed=-2**63).seed == -2**63 and SamplingParams(seed=2**64 - 1).seed == 2**64 - 1
    assert EngineConfig(max_batch_size=8.0).max_batch_size == 8 and ServerConfig(port=0).port == 0


def test_a_tiny_temperature_or_repetition_penalty_samples_instead_of_crashing():
    """Found by test_serve_hardening's fuzzing: repetition_penalty 4e-169 made scores +inf, softmax NaN, a 500."""
    from lmforge import GPT, preset
    from lmforge.generation.sampling import apply_repetition_penalty, apply_temperature

    scores = torch.tensor([[2.0, 1.0, -1.0, float("-inf")]])
    for out in (apply_temperature(scores, 1e-300), apply_repetition_penalty(scores, torch.tensor([[0, 1, 2]]), 1e-200)):
        probs = out.softmax(-1)
        assert torch.isfinite(probs).all() and probs[0, 3] == 0 and out[0, 3] == float("-inf")
        assert out[0, 0] >= out[0, 1] >= out[0, 2]  # the order of the scores is kept
    assert torch.equal(apply_temperature(scores, 0.5), scores / 0.5)  # ordinary values are untouched
    model = GPT(preset("tiny", vocab_size=50)).eval()
    for options in ({"temperature": 1e-300}, {"repetition_penalty": 1e-200}):
        out = model.generate([[1, 2, 3]], max_new_tokens=3, do_sample=True, seed=0, **options)
        assert out.shape == (1, 6)
