"""`lmforge finetune classify|sft` and `lmforge merge-lora` end to end on tiny models (the real trainer)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from lmforge.cli import main

TRAIN_FLAGS = ["--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "2", "--eval-interval", "10",
               "--log-interval", "5", "--no-progress", "--device", "cpu", "--no-plot"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def sentiment(tmp_path):
    rng = random.Random(0)
    words = {"positive": ["good", "great", "nice"], "negative": ["bad", "awful", "dull"]}

    def rows(n):
        out = []
        for _ in range(n):
            label = rng.choice(["positive", "negative"])
            out.append({"review": f"it was {rng.choice(words[label])}", "y": label})
        return out

    return write_jsonl(tmp_path / "train.jsonl", rows(48)), write_jsonl(tmp_path / "val.jsonl", rows(16))


@pytest.fixture
def base_dir(tmp_path):
    from lmforge.config import GPTConfig
    from lmforge.model import GPT
    from lmforge.tokenizer import Tokenizer

    torch.manual_seed(0)
    d = tmp_path / "base"
    GPT(GPTConfig(vocab_size=257, n_positions=96, n_embd=32, n_layer=2, n_head=4)).save_pretrained(d, tokenizer=Tokenizer.byte_level())
    return d


def test_classify_learns_saves_best_and_evaluate_loads_it(tmp_path, sentiment, capsys):
    train, val = sentiment
    out = tmp_path / "run"
    assert main(["finetune", "classify", "--preset", "tiny", "--train", str(train), "--val", str(val),
                 "--text-field", "review", "--label-field", "y", "--class-weights", "balanced",
                 "--out", str(out), "--max-steps", "30", *TRAIN_FLAGS]) == 0
    printed = capsys.readouterr()
    assert "accuracy" in printed.out and "'negative'" in printed.err and "trainable parameters" in printed.err
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    accuracies = [m["accuracy"] for m in metrics if "accuracy" in m and "event" not in m]
    assert len(accuracies) == 3 and max(accuracies) >= 0.9
    saved = json.loads((out / "best" / "config.json").read_text())
    assert saved["architectures"] == ["GPT2ForSequenceClassification"] and saved["label2id"] == {"negative": 0, "positive": 1}
    from lmforge.tasks.classification import load_classifier

    clf = load_classifier(out / "best", device="cpu")
    assert clf.predict(["it was great", "it was awful"]) == ["positive", "negative"]
    report = tmp_path / "eval.json"
    val_std = write_jsonl(tmp_path / "v2.jsonl", [{"text": r["review"], "label": r["y"]} for r in map(json.loads, val.read_text().splitlines())])
    assert main(["evaluate", "classify", "--model", str(out / "best"), "--data", str(val_std), "--output", str(report),
                 "--no-progress"]) == 0
    assert json.loads(report.read_text())["metrics"]["accuracy"] == max(accuracies)


def test_classify_bad_inputs_exit_2_with_file_and_line(tmp_path, sentiment, capsys):
    train, val = sentiment
    bad_val = write_jsonl(tmp_path / "bad.jsonl", [{"review": "x", "y": "positive"}, {"review": "y", "y": "neutral"}])
    common = ["finetune", "classify", "--preset", "tiny", "--train", str(train), "--text-field", "review",
              "--label-field", "y", "--out", str(tmp_path / "r"), "--max-steps", "1", *TRAIN_FLAGS]
    assert main(common + ["--val", str(bad_val)]) == 2
    assert "bad.jsonl:2: label 'neutral' does not occur in the training data" in capsys.readouterr().err
    assert main(common + ["--val", str(val), "--label-field", "label"]) == 2
    assert "train.jsonl:1: missing field(s) ['label']" in capsys.readouterr().err
    assert main(common + ["--lora-rank", "2", "--lora-targets", "q_proj"]) == 2
    assert "match no linear module" in capsys.readouterr().err


def test_sft_lora_run_is_a_model_directory_and_merge_lora_matches(tmp_path, base_dir, capsys):
    from lmforge import load_model

    rows = [{"context": f"The code is {i}.", "question": "What is the code?", "answers": [str(i)]} for i in range(24)]
    rows.append({"context": "filler " * 200, "question": "What is the code?", "answers": ["none"]})
    train = write_jsonl(tmp_path / "qa.jsonl", rows)
    out = tmp_path / "sft"
    assert main(["finetune", "sft", "--model", str(base_dir), "--task", "qa", "--train", str(train), "--val", str(train),
                 "--eval-batches", "2", "--lora-rank", "4", "--lora-targets", "c_attn", "mlp.c_proj",
                 "--out", str(out), "--max-steps", "10", *TRAIN_FLAGS]) == 0
    err = capsys.readouterr().err
    assert "1 truncated on the document side" in err and "trainable parameters: 2,304 of" in err
    tuned = load_model(out / "model", device="cpu")  # merged weights: what generate and the server load
    assert tuned.config.extra["lmforge_sft"]["task"] == "qa"
    assert main(["merge-lora", "--adapter", str(out / "model"), "--out", str(tmp_path / "merged")]) == 0
    merged = load_model(tmp_path / "merged", device="cpu")
    x = torch.randint(0, 257, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, tuned(x).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(load_model(base_dir, device="cpu")(x).logits, tuned(x).logits, atol=1e-4)
    from lmforge.tasks import pipeline

    answer = pipeline("question-answering", model=out / "model")(question="What is the code?", context="The code is 7.")
    assert set(answer) == {"answer", "score", "start", "end"}


def test_sft_resume_continues_a_lora_run(tmp_path, base_dir):
    rows = [{"source": f"n {i}", "target": f"N {i}"} for i in range(16)]
    train = write_jsonl(tmp_path / "mt.jsonl", rows)
    args = ["finetune", "sft", "--model", str(base_dir), "--task", "translation", "--train", str(train), "--pack",
            "--lora-rank", "2", "--eval-batches", "0", "--lr-decay-steps", "6", *TRAIN_FLAGS]
    assert main(args + ["--out", str(tmp_path / "a"), "--max-steps", "6", "--save-interval", "3"]) == 0
    assert main(args + ["--out", str(tmp_path / "b"), "--max-steps", "3", "--save-interval", "3"]) == 0
    assert main(args + ["--out", str(tmp_path / "b"), "--max-steps", "6", "--save-interval", "3", "--resume"]) == 0
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "model" / "lora_adapter.safetensors")
    b = load_file(tmp_path / "b" / "model" / "lora_adapter.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_sft_bad_inputs(tmp_path, base_dir, capsys):
    train = write_jsonl(tmp_path / "t.jsonl", [{"source": "a", "target": "b"}, {"source": "c"}])
    base = ["finetune", "sft", "--model", str(base_dir), "--train", str(train), "--out", str(tmp_path / "r"),
            "--max-steps", "1", *TRAIN_FLAGS]
    assert main(base + ["--task", "translation"]) == 2
    assert "t.jsonl:2: missing field(s) ['target']" in capsys.readouterr().err
    assert main(base + ["--task", "custom"]) == 2
    assert "--prompt-template" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(base + ["--task", "poetry"])
    assert e.value.code == 2


# ---- the real data in ../shared/data (skipped when absent) --------------------------------------


def _head(src, dst, n):
    with open(src, encoding="utf-8") as f:
        lines = [next(f) for _ in range(n)]
    dst.write_text("".join(lines))
    return dst


def test_sst2_short_finetune_on_real_data(tmp_path, shared_data):
    """SST-2 rows (string labels) through the classify recipe; the small form checks the plumbing."""
    train = _head(shared_data / "sst2" / "train.jsonl", tmp_path / "train.jsonl", 64)
    val = _head(shared_data / "sst2" / "validation.jsonl", tmp_path / "val.jsonl", 64)
    out = tmp_path / "sst2"
    assert main(["finetune", "classify", "--preset", "tiny", "--train", str(train), "--val", str(val),
                 "--out", str(out), "--max-steps", "4", "--max-length", "64", *TRAIN_FLAGS]) == 0
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["id2label"] == {"0": "negative", "1": "positive"}


@pytest.mark.parametrize("task,name", [("translation", "multi30k"), ("summarization", "scitldr"), ("qa", "squad")])
def test_sft_on_real_data(tmp_path, shared_data, task, name):
    train = _head(shared_data / name / "train.jsonl", tmp_path / "train.jsonl", 16)
    val = _head(shared_data / name / "validation.jsonl", tmp_path / "val.jsonl", 8)
    out = tmp_path / name
    assert main(["finetune", "sft", "--preset", "tiny", "--task", task, "--train", str(train), "--val", str(val),
                 "--eval-batches", "1", "--out", str(out), "--max-steps", "2", *TRAIN_FLAGS]) == 0
    assert (out / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_sst2_longer_run_full_validation(tmp_path, shared_data):
    """Longer form: 4,000 SST-2 rows, 300 steps of a tiny byte-level model, the full validation set
    scored at every evaluation. (A randomly initialised tiny model stays near chance here, about 53%
    on CPU; a pretrained base is what makes accuracy meaningful.)"""
    train = _head(shared_data / "sst2" / "train.jsonl", tmp_path / "train.jsonl", 4000)
    out = tmp_path / "sst2"
    assert main(["finetune", "classify", "--preset", "tiny", "--train", str(train),
                 "--val", str(shared_data / "sst2" / "validation.jsonl"), "--out", str(out), "--max-steps", "300",
                 "--max-length", "128", "--batch-size", "32", "--lr", "1e-3", "--warmup-steps", "20",
                 "--eval-interval", "100", "--no-progress", "--device", "auto", "--no-plot"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "accuracy" in r and "event" not in r]
    assert [r["step"] for r in evals] == [100, 200, 300] and all(0 <= r["accuracy"] <= 1 for r in evals)
    from lmforge.tasks.classification import load_classifier

    texts = [json.loads(line)["text"] for line in (shared_data / "sst2" / "validation.jsonl").read_text().splitlines()]
    assert set(load_classifier(out / "best").predict(texts)) <= {"negative", "positive"}


def test_group_by_length_batches_similar_lengths_and_resumes():
    from lmforge.tasks.data import ShuffledSource

    rng = random.Random(0)
    examples = [[0] * rng.randint(1, 60) for _ in range(1000)]
    collate = lambda rows: {"input_ids": torch.tensor([len(r) for r in rows])}  # noqa: E731
    lengths = [len(e) for e in examples]
    grouped = ShuffledSource(examples, 8, collate, seed=3, lengths=lengths)
    plain = ShuffledSource(examples, 8, collate, seed=3)
    order = grouped._permutation(0)
    assert sorted(order) == list(range(1000))  # an epoch still sees every example once
    spread = lambda src: sum(int(b.max() - b.min()) for b in (src.next_batch()["input_ids"] for _ in range(100)))  # noqa: E731
    assert spread(grouped) * 5 < spread(plain)  # far less padding
    first = [grouped.next_batch()["input_ids"].tolist() for _ in range(3)]
    assert first != sorted(first)  # batches are not in length order
    state = grouped.state_dict()
    after = [grouped.next_batch()["input_ids"].tolist() for _ in range(200)]  # crosses into the next epoch
    resumed = ShuffledSource(examples, 8, collate, seed=3, lengths=lengths)
    resumed.load_state_dict(state)
    assert [resumed.next_batch()["input_ids"].tolist() for _ in range(200)] == after


def test_group_by_length_flag_trains(tmp_path, sentiment):
    train, val = sentiment
    out = tmp_path / "run"
    assert main(["finetune", "classify", "--preset", "tiny", "--train", str(train), "--val", str(val), "--group-by-length",
                 "--text-field", "review", "--label-field", "y", "--out", str(out), "--max-steps", "3", *TRAIN_FLAGS]) == 0
    assert json.loads((out / "config.json").read_text())["data"]["group_by_length"] is True


# ---- SFT on conversations, through the tokenizer's chat template ---------------------------------

CONVERSATION = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you."}]


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    """A tiny Llama-block model with a Qwen2-style tokenizer (ChatML template, eos <|im_end|>)."""
    from test_llama_tokenizer import qwen2_style

    from lmforge import GPT, Tokenizer, preset

    directory = tmp_path_factory.mktemp("chatml")
    qwen2_style(directory)
    tok = Tokenizer.from_pretrained(directory)
    torch.manual_seed(0)
    GPT(preset("llama-baby", vocab_size=tok.vocab_size, bos_token_id=None,
               eos_token_id=tok.token_to_id("<|im_end|>"))).save_pretrained(directory, tokenizer=tok)
    return directory


def test_chat_examples_train_only_on_the_assistant_turns(chatml_dir):
    from lmforge import Tokenizer
    from lmforge.errors import ConfigError, DataError
    from lmforge.tasks.sft import encode_chat_example, make_template

    tok = Tokenizer.from_pretrained(chatml_dir)
    example, cut = encode_chat_example(tok, {"messages": CONVERSATION}, max_length=200)
    assert cut is None
    assert example.ids == tok.apply_chat_template(CONVERSATION, return_dict=False)  # as rendered at inference
    learned = tok.decode([i for i, t in zip(example.ids, example.targets) if t])
    assert learned == "Hello!<|im_end|>\nSee you.<|im_end|>\n"
    short, cut = encode_chat_example(tok, {"messages": CONVERSATION}, max_length=len(example.ids) - 4)
    assert cut == "response" and short.ids == example.ids[: len(example.ids) - 3]
    assert encode_chat_example(tok, {"messages": CONVERSATION}, max_length=5) == (None, "dropped")
    with pytest.raises(DataError, match="no assistant turn"):
        encode_chat_example(tok, {"messages": CONVERSATION[:1]}, 200, "chat.jsonl:3")
    with pytest.raises(DataError, match="chat.jsonl:4: 'messages' must be"):
        encode_chat_example(tok, {"messages": [{"role": "user"}]}, 200, "chat.jsonl:4")
    with pytest.raises(ConfigError, match="--task chat renders rows with the tokenizer's chat template"):
        make_template("chat", prompt="Q: {q}")


def test_sft_task_chat_runs_and_learns_the_assistant_replies(tmp_path, chatml_dir, capsys):
    from lmforge import load_model

    rows = [{"messages": [{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": w}]}
            for w in ("yes", "no", "maybe", "never") * 6]
    train = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "chat-run"
    assert main(["finetune", "sft", "--model", str(chatml_dir), "--task", "chat", "--train", str(train),
                 "--val", str(train), "--eval-batches", "2", "--out", str(out), "--max-steps", "20", *TRAIN_FLAGS]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert val[-1] < val[0]  # the assistant replies are being learned
    assert load_model(out / "model", device="cpu").config.extra["lmforge_sft"]["task"] == "chat"
    assert "24 examples" in capsys.readouterr().err
