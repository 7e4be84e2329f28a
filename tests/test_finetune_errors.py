"""Bad fine-tuning input fails with a clear error before any training starts (nothing in --out)."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.cli import main

FLAGS = ["--batch-size", "4", "--max-steps", "2", "--no-progress", "--device", "cpu", "--no-plot"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def save_lm(directory, vocab_size=257, n_embd=32):
    from lmforge.config import GPTConfig
    from lmforge.model import GPT
    from lmforge.tokenizer import Tokenizer

    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=vocab_size, n_positions=64, n_embd=n_embd, n_layer=1, n_head=2)).save_pretrained(
        directory, tokenizer=Tokenizer.byte_level())
    return directory


@pytest.fixture
def base_dir(tmp_path):
    return save_lm(tmp_path / "base")


def untouched(out):
    return not out.exists() or not any(out.iterdir())


def run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_single_class_train_set(tmp_path, capsys):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": f"good {i}", "label": "positive"} for i in range(6)])
    out = tmp_path / "run"
    code, err = run(capsys, "finetune", "classify", "--preset", "tiny", "--train", str(train), "--out", str(out), *FLAGS)
    assert code == 2 and "every example has label 'positive'" in err and "two labels or more" in err
    assert untouched(out)


@pytest.mark.parametrize("task,rows,where", [
    ("translation", [{"source": "a", "target": "b"}, {"source": "c", "target": "   "}], "t.jsonl:2"),
    ("translation", [{"source": "a", "target": ""}], "t.jsonl:1"),
    ("qa", [{"context": "c", "question": "q", "answers": ["x"]}, {"context": "c", "question": "q", "answers": ["\n"]}],
     "t.jsonl:2"),
])
def test_empty_sft_targets(tmp_path, capsys, base_dir, task, rows, where):
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "run"
    code, err = run(capsys, "finetune", "sft", "--model", str(base_dir), "--task", task, "--train", str(train),
                    "--out", str(out), *FLAGS)
    assert code == 2 and f"{where}: empty target" in err
    assert untouched(out)


def test_custom_template_with_literal_text_and_empty_field(tmp_path, capsys, base_dir):
    train = write_jsonl(tmp_path / "t.jsonl", [{"q": "2+2?", "a": " "}])
    code, err = run(capsys, "finetune", "sft", "--model", str(base_dir), "--task", "custom", "--prompt-template", "Q: {q}",
                    "--response-template", " Answer: {a}.", "--train", str(train), "--out", str(tmp_path / "r"), *FLAGS)
    assert code == 2 and "t.jsonl:1: empty target" in err and "['a']" in err


def test_tokenizer_larger_than_the_model_vocab(tmp_path, capsys, tiny_hf_dir, base_dir):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "good", "label": 1}, {"text": "bad", "label": 0}])
    out = tmp_path / "run"
    # tiny_hf_dir has vocab 101; the byte tokenizer has 257 ids
    code, err = run(capsys, "finetune", "classify", "--model", str(tiny_hf_dir), "--tokenizer", "byte",
                    "--train", str(train), "--out", str(out), *FLAGS)
    assert code == 2 and "--tokenizer byte has 257 tokens" in err and "embedding for 101" in err
    assert untouched(out)
    mt = write_jsonl(tmp_path / "mt.jsonl", [{"source": "a", "target": "b"}])
    code, err = run(capsys, "finetune", "sft", "--model", str(tiny_hf_dir), "--tokenizer", "byte", "--task",
                    "translation", "--train", str(mt), "--out", str(out), *FLAGS)
    assert code == 2 and "embedding for 101" in err
    assert untouched(out)


def test_model_trained_with_another_vocabulary(tmp_path, capsys):
    # a 1000-token model saved with the 257-token byte tokenizer: not the tokenizer it was trained with
    base = save_lm(tmp_path / "big", vocab_size=1000)
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "good", "label": "p"}, {"text": "bad", "label": "n"}])
    code, err = run(capsys, "finetune", "classify", "--model", str(base), "--train", str(train),
                    "--out", str(tmp_path / "run"), *FLAGS)
    assert code == 2 and "has 257 tokens" in err and "vocabulary of 1000" in err
    # padding the embedding to a multiple of 64 (as GPT-2's 50304) is fine
    padded = save_lm(tmp_path / "padded", vocab_size=320)
    assert main(["finetune", "classify", "--model", str(padded), "--train", str(train), "--out", str(tmp_path / "ok"),
                 *FLAGS]) == 0


def test_token_ids_beyond_the_vocab():
    from lmforge.errors import DataError
    from lmforge.tasks.finetune import check_token_ids

    check_token_ids([[0, 5], [], [256]], 257, "--train t.jsonl")
    with pytest.raises(DataError, match="token id 300, beyond the model's vocabulary of 257"):
        check_token_ids([[1, 2], [300]], 257, "--train t.jsonl")


@pytest.mark.parametrize("rank,message", [("0", "--lora-rank must be an integer >= 1"),
                                          ("-2", "--lora-rank must be an integer >= 1"),
                                          ("33", "LoRA rank 33 exceeds the width")])
def test_lora_rank_out_of_range(tmp_path, capsys, base_dir, rank, message):
    rows = [{"text": "good", "label": "p"}, {"text": "bad", "label": "n"}]
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    out = tmp_path / "run"
    code, err = run(capsys, "finetune", "classify", "--model", str(base_dir), "--train", str(train), "--lora-rank", rank,
                    "--out", str(out), *FLAGS)
    assert code == 2 and message in err
    assert untouched(out)
    if rank == "33":
        assert "use --lora-rank <= 32" in err  # n_embd 32: c_attn is 32 -> 96
        assert main(["finetune", "classify", "--model", str(base_dir), "--train", str(train), "--lora-rank", "32",
                     "--out", str(out), *FLAGS]) == 0


def test_lora_api_checks_rank_against_width():
    from lmforge.config import GPTConfig
    from lmforge.errors import ConfigError
    from lmforge.model import GPT
    from lmforge.tasks import apply_lora

    model = GPT(GPTConfig(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ConfigError, match="exceeds the width"):
        apply_lora(model, rank=17, targets=["c_attn"])
    assert all(p.requires_grad for p in model.parameters())  # the failed call left the model as it was
    apply_lora(model, rank=16, targets=["c_attn"])
