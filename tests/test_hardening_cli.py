"""Issue 18, models and the command line: one model-name rule (folder, then Hub name; presets only
by --preset), generation edge cases that match transformers, and every expected failure as one
line and exit code 2, checked before any work."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge import GPT, GPTConfig, preset
from lmforge.cli import main
from lmforge.errors import ConfigError, DataError
from lmforge.tokenizer import Tokenizer

from conftest import hf_gpt2

FAST = ["--batch-size", "2", "--max-steps", "1", "--no-progress", "--device", "cpu", "--no-plot"]


def one_line_error(capsys, argv, *fragments):
    """Run the CLI; it must fail with exit code 2 and one line on stderr holding every fragment."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert lines and "Traceback" not in err, err
    assert all(f in lines[-1] for f in fragments), lines[-1]
    return lines[-1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny byte-level model saved with its tokenizer."""
    tok = Tokenizer.byte_level()
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("hardening") / "m"
    GPT(preset("tiny", vocab_size=tok.vocab_size)).save_pretrained(directory, tokenizer=tok)
    return directory


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- one model-name rule -----------------------------------------------------------------------


def test_finetune_model_tiny_is_a_name_not_a_preset(tmp_path, capsys):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    out = tmp_path / "run"
    one_line_error(capsys, ["finetune", "classify", "--model", "tiny", "--train", str(train), "--out", str(out), *FAST],
                   "'tiny'", "--preset tiny")
    assert not (out / "model").exists()


def test_finetune_preset_says_it_starts_from_random_weights(tmp_path, capsys):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    assert main(["finetune", "classify", "--preset", "tiny", "--train", str(train), "--out", str(tmp_path / "r"),
                 *FAST]) == 0
    err = capsys.readouterr().err
    assert sum("random weights" in line for line in err.splitlines()) == 1
    saved = json.loads((tmp_path / "r" / "model" / "config.json").read_text())
    assert saved["eos_token_id"] == Tokenizer.byte_level().eos_token_id  # the tokenizer's ids, not GPT-2's 50256


def test_an_existing_folder_wins_over_a_preset_of_the_same_name(tmp_path, capsys, monkeypatch):
    tok = Tokenizer.byte_level()
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "tiny", tokenizer=tok)  # preset "tiny" has n_embd 64 and 2 layers
    train = write_jsonl(tmp_path / "t.jsonl", [{"source": "a", "target": "b"}, {"source": "c", "target": "d"}])
    monkeypatch.chdir(tmp_path)
    assert main(["finetune", "sft", "--model", "tiny", "--task", "translation", "--train", str(train),
                 "--out", "run", *FAST]) == 0
    assert "random weights" not in capsys.readouterr().err
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert (saved["n_embd"], saved["n_layer"]) == (32, 1)


def test_the_api_takes_exactly_one_base():
    from lmforge.tasks.finetune import base_name, finetune_sft

    with pytest.raises(ConfigError, match="exactly one of them"):
        finetune_sft(lmforge.training.TrainConfig(), None, "t.jsonl", task="qa")
    with pytest.raises(ConfigError, match="unknown preset 'tinny'.*did you mean 'tiny'"):
        base_name(None, "tinny")


# ---- generation and the model ------------------------------------------------------------------


def test_an_all_zero_attention_mask_keeps_the_prompt_and_matches_transformers(tmp_path):
    hf = hf_gpt2(initializer_range=0.5)  # large weights: the tokens depend on every detail
    hf.save_pretrained(tmp_path)
    ours = lmforge.load_model(tmp_path, device="cpu")
    ids = torch.tensor([[5, 6, 7, 9], [1, 2, 3, 4]])
    for rows in (slice(0, 1), slice(0, 2)):  # a batch of one, and beside a real row
        mask = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]])[rows]
        theirs = hf.generate(ids[rows], attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
        mine = ours.generate(ids[rows], mask, max_new_tokens=6, eos_token_id=[])
        assert mine.tolist() == theirs.tolist()
        assert mine[0, :4].tolist() == [5, 6, 7, 9]  # the last prompt token is kept


def test_padding_queries_leave_real_outputs_and_gradients_finite():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2, embd_pdrop=0.0,
                          attn_pdrop=0.0, resid_pdrop=0.0))
    ids = torch.randint(0, 50, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    positions = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    for impl in ("sdpa", "reference"):
        model.set_attention(impl)
        out = model(ids, attention_mask=mask, position_ids=positions).logits
        assert torch.isfinite(out).all()
        out[0, 2:].sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        model.zero_grad()
    model.set_attention("sdpa")
    alone = model(ids[:1, 2:]).logits
    padded = model(ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(padded[0, 2:], alone[0], atol=1e-5, rtol=1e-5)


def test_model_call_with_an_id_past_the_vocabulary_or_a_cache_of_another_batch():
    model = GPT(preset("tiny", vocab_size=50)).eval()
    with pytest.raises(ValueError, match=r"token id 50, outside the model's vocabulary \(vocab_size 50"):
        model(torch.tensor([[1, 50]]))
    with pytest.raises(ValueError, match="token id -3"):
        model(torch.tensor([[-3, 1]]))
    cache = model.new_kv_cache(2)
    with pytest.raises(ValueError, match=r"KV cache holds 2 rows but input_ids has 1.*new_kv_cache\(1\)"):
        model(torch.tensor([[1, 2]]), kv_cache=cache)


def test_truncate_prompt_advice_does_not_repeat_itself():
    model = GPT(preset("tiny", vocab_size=50)).eval()  # context 128
    with pytest.raises(ValueError) as info:
        model.generate([[1, 2]], max_new_tokens=200, truncate_prompt=True)
    assert "truncate_prompt" not in str(info.value) and "at most 127 new tokens" in str(info.value)
    with pytest.raises(ValueError, match=r"truncate_prompt=True \(--truncate-prompt\)"):
        model.generate([list(range(40)) * 3], max_new_tokens=20)


def test_tokenizer_empty_batch_and_lone_surrogates():
    tok = Tokenizer.byte_level()
    assert tok([], padding=True) == {"input_ids": [], "attention_mask": []}
    out = tok([], padding=True, return_tensors="pt")
    assert out["input_ids"].shape == (0, 0) and out["attention_mask"].dtype == torch.long
    assert tok([], padding=True, return_tensors="np")["input_ids"].shape == (0, 0)
    with pytest.raises(DataError, match=r"not valid Unicode: '\\udcff' at character 1 is a lone surrogate"):
        tok.encode("a\udcffb")


def test_load_model_on_a_cuda_device_that_is_not_there(model_dir, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="device 'cuda' is not available"):
        lmforge.load_model(model_dir, device="cuda")
    one_line_error(capsys, ["generate", "--model", str(model_dir), "--prompt", "x", "--device", "cuda"],
                   "device 'cuda' is not available")


# ---- the command line: bad input is one line ---------------------------------------------------


def test_a_prompt_that_is_not_utf8(model_dir, capsys, monkeypatch):
    bad = os.fsdecode(b"caf\xe9")  # how Python hands over a Latin-1 argument: a lone surrogate
    one_line_error(capsys, ["generate", "--model", str(model_dir), "--prompt", bad], "--prompt is not UTF-8 text",
                   "byte 0xe9 at character 3")
    one_line_error(capsys, ["generate", "--model", str(model_dir), "--prompt", "x\ud800"], "lone surrogate U+D800")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"fine\ncaf\xe9\n"), encoding="utf-8"))
    one_line_error(capsys, ["generate", "--model", str(model_dir), "--prompt", "-"], "line 2 of stdin is not UTF-8")


def test_input_files_that_are_not_utf8_are_named(model_dir, tmp_path, capsys):
    (tmp_path / "in.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (tmp_path / "in.txt").write_bytes(b"one\ncaf\xe9\n")
    one_line_error(capsys, ["run", "text-generation", "--model", str(model_dir), "--input", str(tmp_path / "in.jsonl"),
                            "--output", str(tmp_path / "o.jsonl")], "in.jsonl:2: not UTF-8 text")
    one_line_error(capsys, ["evaluate", "score", "--predictions", str(tmp_path / "in.txt"), "--metric", "bleu",
                            "--output", str(tmp_path / "s.json")], "--predictions", "in.txt:2: not UTF-8")
    one_line_error(capsys, ["evaluate", "perplexity", "--model", str(model_dir), "--data", str(tmp_path / "in.txt"),
                            "--output", str(tmp_path / "p.json")], "--data", "in.txt:2: not UTF-8")
    one_line_error(capsys, ["run", "text-generation", "--model", str(model_dir), "--input", str(tmp_path),
                            "--output", str(tmp_path / "o.jsonl")], "is a directory")


def test_output_paths_are_checked_before_any_work(tmp_path, capsys):
    rows = write_jsonl(tmp_path / "in.jsonl", [{"text": "x"}])
    (tmp_path / "out_dir").mkdir()
    missing_model = str(tmp_path / "no-such-model")  # loading it would fail: the output check comes first
    for output, fragment in [(tmp_path / "out_dir", "is a directory"), (rows / "o.jsonl", "is a file, not a directory")]:
        one_line_error(capsys, ["run", "text-generation", "--model", missing_model, "--input", str(rows),
                                "--output", str(output)], "--output", fragment)
    one_line_error(capsys, ["evaluate", "perplexity", "--model", missing_model, "--data", str(rows),
                            "--output", str(rows / "p.json")], "--output", "is a file, not a directory")
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob(".lmforge-probe*"))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_refused_before_any_work(tmp_path, capsys):
    rows = write_jsonl(tmp_path / "in.jsonl", [{"text": "x"}])
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        one_line_error(capsys, ["run", "text-generation", "--model", str(tmp_path / "nope"), "--input", str(rows),
                                "--output", str(locked / "o.jsonl")], "cannot write in")
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("error, fragment", [
    (PermissionError(errno.EACCES, "Permission denied", "/data/x"), "Permission denied: /data/x"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "out"), "Is a directory: out"),
    (OSError(errno.ENOSPC, "No space left on device", "ckpt.safetensors"), "No space left on device: ckpt.safetensors"),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "can't decode byte 0xff"),
    (OverflowError("Python int too large to convert to C long"), "too large"),
    (MemoryError(), "out of memory"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 400000000000 bytes"),
     "out of memory"),
])
def test_expected_failure_classes_are_one_line(monkeypatch, capsys, tmp_path, error, fragment):
    def fail(args):
        raise error

    monkeypatch.setattr("lmforge.cli.info.run", fail)
    one_line_error(capsys, ["info", str(tmp_path)], "lmforge info: error:", fragment)


def test_a_bug_still_shows_its_traceback(monkeypatch, tmp_path):
    def fail(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr("lmforge.cli.info.run", fail)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["info", str(tmp_path)])


def test_seeds_that_overflow_64_bits(model_dir, capsys):
    huge = str(2**70)
    one_line_error(capsys, ["generate", "--model", str(model_dir), "--prompt", "x", "--do-sample", "--seed", huge],
                   "seed must be in 0..18446744073709551615")
    one_line_error(capsys, ["serve", "--preset", "tiny", "--seed", huge], f"--seed {huge} is out of range")


def test_sft_template_format_specs_that_allocate_gigabytes(tmp_path, capsys):
    from lmforge.tasks.sft import make_template

    for template, fragment in [("{text:>999999999}", "width or precision above 1000"),
                               ("{text.__class__}", "reads an attribute"), ("{a:{b}}", "slot inside its format spec")]:
        with pytest.raises(ConfigError, match=fragment):
            make_template("custom", template, " {label}")
    assert make_template("custom", "{text:>20} {meta[k]}", " {label}").fields == ["text", "meta", "label"]
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "b"}])
    one_line_error(capsys, ["finetune", "sft", "--preset", "tiny", "--task", "custom", "--prompt-template",
                            "{text:>999999999}", "--response-template", " {label}", "--train", str(train),
                            "--out", str(tmp_path / "r"), *FAST], "width or precision above 1000")


def test_info_on_broken_folders_and_plot_on_a_model(model_dir, tmp_path, capsys):
    import shutil

    config_dir = tmp_path / "config_dir"
    shutil.copytree(model_dir, config_dir)
    (config_dir / "config.json").unlink()
    (config_dir / "config.json").mkdir()
    one_line_error(capsys, ["info", str(config_dir)], "config.json: is a directory, not a file")
    weights_dir = tmp_path / "weights_dir"
    shutil.copytree(model_dir, weights_dir)
    (weights_dir / "model.safetensors").unlink()
    (weights_dir / "model.safetensors").mkdir()
    one_line_error(capsys, ["info", str(weights_dir)], "model.safetensors: is a directory, not a weight file")
    one_line_error(capsys, ["plot", str(model_dir)], "is a model directory, not a training run")


def test_info_into_a_closed_pipe_prints_no_traceback(model_dir):
    env = {**os.environ, "PYTHONPATH": str(Path(lmforge.__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "info", str(model_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # like `| head -0`: the reader is gone before the first line
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err and proc.returncode == 141, err
