"""Tokenizers: parity with transformers' GPT2TokenizerFast on the same files, lossless round trips
(hypothesis), batch calls, save/load, the character tokenizer, and clear errors on bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge import CharTokenizer, Tokenizer
from lmforge.cli import main
from lmforge.corpus import _CUT_AFTER_NEWLINE, _CUT_BEFORE_SPACE, split_text
from lmforge.errors import CheckpointError, ConfigError, DataError
from lmforge.tokenizer import EOS

# Varied text: scripts, emoji (with modifiers and ZWJ), combining marks, whitespace runs, control
# characters, CRLF, code, numbers, and the special token's string inside text.
SAMPLES = [
    "Hello world",
    " Hello  world\t\tand   spaces   ",
    "The quick brown fox jumps over the lazy dog. It's 3.14159, isn't it? We'll see; they've gone!",
    "中文分词测试：你好，世界！这是一个句子。",
    "日本語のテキストとカタカナ、ひらがな。한국어 문장도 있습니다.",
    "emoji 👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇩🇪 and ❤️",
    "combining: e\u0301 a\u0300 n\u0303 Z\u0351\u0334\u0353a\u0336lgo",
    "control \x00\x01\x07\x1b[31m red \x7f and \u200b zero width \ufeff bom",
    "line one\r\nline two\n\n\nline five\r\n",
    "    indented code:\n\tdef f(x):\n\t\treturn x ** 2  # comment\n",
    "numbers 1234567890 0.001 -42 1e10 ١٢٣",
    "before <|endoftext|> after<|endoftext|><|endoftext|>",
    "Ünïcödé àccénts, Ελληνικά, русский текст, עברית, العربية",
    "",
    " ",
    "\n",
    "a" * 300,
]

CORPUS = "\n".join(SAMPLES * 3) + "\n" + " ".join(f"word{i} token{i % 7}" for i in range(400))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small byte-level BPE trained here (no GPT-2 files offline) and saved in both formats."""
    tok = Tokenizer.train(CORPUS, vocab_size=600, min_frequency=2, show_progress=False)
    directory = tmp_path_factory.mktemp("bpe")
    tok.save_pretrained(directory)
    return tok, directory


@pytest.fixture(scope="module")
def hf_tok(trained):
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(str(trained[1]))


# ---- parity with transformers --------------------------------------------------------------


def test_saved_files_load_in_transformers_with_identical_ids(trained, hf_tok):
    tok, directory = trained
    assert {"tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"} <= {p.name for p in directory.iterdir()}
    assert tok.vocab_size == 600 == len(hf_tok)
    assert hf_tok.eos_token_id == tok.eos_token_id == tok.bos_token_id == tok.token_to_id(EOS)
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == hf_tok(text)["input_ids"], text
        assert tok.decode(ids) == hf_tok.decode(ids) == text
    assert tok.encode_batch(SAMPLES) == hf_tok(SAMPLES)["input_ids"]


def test_vocab_and_merges_files_alone_give_the_same_ids(trained, tmp_path):
    from transformers import GPT2TokenizerFast

    tok, directory = trained
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(directory / name, tmp_path / name)
    loaded = Tokenizer.from_pretrained(tmp_path)
    hf = GPT2TokenizerFast.from_pretrained(str(tmp_path))
    assert loaded.eos_token_id == tok.eos_token_id and loaded.vocab_size == tok.vocab_size
    for text in SAMPLES:
        assert loaded.encode(text) == tok.encode(text) == hf(text)["input_ids"], text
    assert loaded.fingerprint == tok.fingerprint


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=80))
def test_parity_with_transformers_on_arbitrary_unicode(trained, hf_tok, text):
    tok, _ = trained
    assert tok.encode(text) == hf_tok(text)["input_ids"]


def test_batch_call_matches_transformers_padding_and_masks(trained, hf_tok):
    tok, _ = trained
    hf_tok.pad_token = EOS  # GPT-2 has no pad token; lmforge pads with eos then
    texts = ["short", "a somewhat longer sentence here", "中文 and 👍🏽"]
    for side in ("left", "right"):
        ours = tok(texts, padding=True, padding_side=side, return_tensors="pt")
        hf_tok.padding_side = side
        theirs = hf_tok(texts, padding=True, return_tensors="pt")
        assert torch.equal(ours["input_ids"], theirs["input_ids"]) and torch.equal(ours["attention_mask"], theirs["attention_mask"])
        assert ours.input_ids.dtype == torch.long
    ours = tok(texts, padding="max_length", truncation=True, max_length=4, return_tensors="np")
    hf_tok.padding_side = "right"
    theirs = hf_tok(texts, padding="max_length", truncation=True, max_length=4, return_tensors="np")
    np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
    np.testing.assert_array_equal(ours["attention_mask"], theirs["attention_mask"])


# ---- round trips -----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text())
def test_bpe_round_trips_any_string(trained, text):
    tok, _ = trained
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, split_special_tokens=True)) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_byte_level_round_trips_any_string_one_token_per_byte(text):
    tok = Tokenizer.byte_level()
    ids = tok.encode(text, split_special_tokens=True)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(text=st.text(min_size=1))
def test_char_tokenizer_round_trips_its_training_text(text):
    tok = CharTokenizer.train(text)
    ids = tok.encode(text, split_special_tokens=True)
    assert len(ids) == len(text) and tok.decode(ids) == text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from("ab Z\n\t\r'.!-1中👍\u00a0\u3000\x85"), max_size=60))
def test_safe_cut_points_are_token_boundaries(trained, text):
    """prepare encodes long documents piece by piece, cutting only at "safe" points; encoding the
    two sides of any safe point separately must give the ids of the whole text."""
    tok, _ = trained
    whole = tok.encode(text, split_special_tokens=True)
    cuts = [i for i in range(1, len(text)) if _CUT_BEFORE_SPACE.match(text, i)]
    cuts += [i + 1 for i in range(1, len(text) - 1) if _CUT_AFTER_NEWLINE.match(text, i)]
    for i in cuts:
        assert tok.encode(text[:i], split_special_tokens=True) + tok.encode(text[i:], split_special_tokens=True) == whole, i


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(st.tuples(st.text(alphabet=st.sampled_from("abc'.!中👍"), min_size=1, max_size=6),
                                st.sampled_from([" ", "\n"])), max_size=40))
def test_split_text_keeps_text_and_ids(trained, words):
    tok, _ = trained
    text = "".join(w + sep for w, sep in words)
    pieces = list(split_text(text, piece_chars=16))
    assert "".join(pieces) == text and all(len(p) <= 16 * 5 for p in pieces)
    assert sum((tok.encode(p) for p in pieces), []) == tok.encode(text)


def test_cutting_real_text_keeps_the_ids(trained, shared_data):
    tok, _ = trained
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:200_000]
    pieces = list(split_text(text, piece_chars=1000))
    assert len(pieces) > 100
    assert [i for p in pieces for i in tok.encode(p)] == tok.encode(text)


# ---- byte-level default, special tokens, save/load --------------------------------------------


def test_byte_level_tokenizer_layout():
    tok = Tokenizer.byte_level()
    assert tok.vocab_size == 257 and len(tok) == 257
    assert tok.eos_token_id == tok.bos_token_id == 256 and tok.pad_token_id is None
    assert tok.encode("A") == [65] and tok.encode(EOS) == [256]
    assert tok.decode([72, 105, 256], skip_special_tokens=True) == "Hi"


def test_byte_level_saves_for_transformers(tmp_path):
    from transformers import GPT2TokenizerFast

    tok = Tokenizer.byte_level()
    tok.save_pretrained(tmp_path)
    hf = GPT2TokenizerFast.from_pretrained(str(tmp_path))
    for text in SAMPLES:
        assert hf(text)["input_ids"] == tok.encode(text)
    assert Tokenizer.from_pretrained(tmp_path).fingerprint == tok.fingerprint


def test_pad_token_and_special_ids(tmp_path):
    tok = Tokenizer.train(CORPUS, vocab_size=300, special_tokens=[EOS, "<|pad|>"], pad_token="<|pad|>", show_progress=False)
    assert tok.pad_token_id == tok.token_to_id("<|pad|>") != tok.eos_token_id
    batch = tok(["a", "a b c"], padding=True)
    assert batch["input_ids"][0][-1] == tok.pad_token_id and batch["attention_mask"][0][-1] == 0
    tok.save_pretrained(tmp_path)
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert (loaded.pad_token_id, loaded.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)


def test_call_single_text_truncation_side_and_decode_tensors(trained):
    tok, _ = trained
    one = tok("hello world")
    assert one["input_ids"] == tok.encode("hello world") and one["attention_mask"] == [1] * len(one["input_ids"])
    ids = tok.encode(SAMPLES[2])
    assert tok(SAMPLES[2], truncation=True, max_length=5, truncation_side="left")["input_ids"] == ids[-5:]
    batch = tok(SAMPLES[:3], padding=True, return_tensors="pt")
    decoded = tok.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert decoded == SAMPLES[:3]
    with pytest.raises(ConfigError, match="padding=True"):
        tok(SAMPLES[:3], return_tensors="pt")


def test_training_is_deterministic():
    a = Tokenizer.train(CORPUS, vocab_size=400, show_progress=False)
    b = Tokenizer.train(CORPUS, vocab_size=400, show_progress=False)
    assert a.fingerprint == b.fingerprint and a.encode(CORPUS[:500]) == b.encode(CORPUS[:500])


def test_train_from_files_and_jsonl_field(tmp_path):
    (tmp_path / "a.txt").write_text(CORPUS, encoding="utf-8")
    with open(tmp_path / "b.jsonl", "w", encoding="utf-8") as f:
        for s in SAMPLES:
            f.write(json.dumps({"body": s, "id": 1}) + "\n")
    tok = Tokenizer.train([tmp_path / "a.txt", tmp_path / "b.jsonl"], vocab_size=500, field="body", show_progress=False)
    assert tok.vocab_size == 500
    from_text = Tokenizer.train([CORPUS, *SAMPLES], vocab_size=500, show_progress=False)
    assert tok.encode(CORPUS[:300]) == from_text.encode(CORPUS[:300])


def test_tokenizer_saved_with_the_model_loads_from_the_model_directory(tmp_path):
    from lmforge import GPT, load_model

    tok = Tokenizer.byte_level()
    model = GPT.from_preset("tiny", vocab_size=tok.vocab_size)
    model.save_pretrained(tmp_path / "m", tokenizer=tok)
    loaded_model = load_model(tmp_path / "m", device="cpu")
    loaded = Tokenizer.from_pretrained(loaded_model.checkpoint_dir)
    assert loaded.fingerprint == tok.fingerprint and loaded.encode("héllo") == tok.encode("héllo")


# ---- character tokenizer ---------------------------------------------------------------------


def test_char_tokenizer_matches_nanogpt_shakespeare_char(shared_data, tmp_path):
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    chars = sorted(set(text))  # nanoGPT's data/shakespeare_char/prepare.py
    stoi = {c: i for i, c in enumerate(chars)}
    tok = CharTokenizer.train(shared_data / "tinyshakespeare" / "input.txt")
    assert tok.vocab_size == len(chars) + 1 == 66 and tok.eos_token_id == 65
    assert tok.encode(text[:1000]) == [stoi[c] for c in text[:1000]]
    assert CharTokenizer.train(text, special_tokens=(), eos_token=None).vocab_size == 65


def test_char_tokenizer_interface_and_save_load(tmp_path):
    tok = CharTokenizer.train("hello world\n", special_tokens=[EOS, "<pad>"], pad_token="<pad>")
    assert tok.encode("hello" + EOS) == [tok.token_to_id(c) for c in "hello"] + [tok.eos_token_id]
    batch = tok(["he", "hello"], padding=True, padding_side="left", return_tensors="pt")
    assert batch["input_ids"][0, :3].tolist() == [tok.pad_token_id] * 3
    assert batch["attention_mask"].tolist() == [[0, 0, 0, 1, 1], [1] * 5]
    assert tok.batch_decode(batch["input_ids"], skip_special_tokens=True) == ["he", "hello"]
    tok.save_pretrained(tmp_path)
    loaded = Tokenizer.from_pretrained(tmp_path)  # the generic loader finds the char tokenizer
    assert isinstance(loaded, CharTokenizer) and loaded.fingerprint == tok.fingerprint
    assert loaded.pad_token_id == tok.pad_token_id and CharTokenizer.from_pretrained(tmp_path).chars == tok.chars


def test_char_tokenizer_rejects_unknown_characters():
    tok = CharTokenizer.train("abc")
    with pytest.raises(DataError, match=r"not in the vocabulary.*'z'"):
        tok.encode("abz")


# ---- bad input -------------------------------------------------------------------------------


def test_mismatched_vocab_and_merges_is_a_clear_error(trained, tmp_path):
    _, directory = trained
    shutil.copy(directory / "vocab.json", tmp_path / "vocab.json")
    merges = (directory / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges.insert(5, "Ġzq Ġxw")
    (tmp_path / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"merges\.txt:6: .*different tokenizers"):
        Tokenizer.from_pretrained(tmp_path)


def test_missing_files_and_names_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no tokenizer found"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_text("{}", encoding="utf-8")
    with pytest.raises(DataError, match="merges.txt: missing"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        Tokenizer.from_pretrained("no-such-org/no-such-tokenizer")
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_bad_arguments_are_clear_errors(trained, tmp_path):
    tok, directory = trained
    with pytest.raises(ConfigError, match="at least 257"):
        Tokenizer.train("abc", vocab_size=100, show_progress=False)
    with pytest.raises(ConfigError, match="looks like a file name"):
        Tokenizer.train(str(directory / "vocab.json"), vocab_size=300, show_progress=False)
    with pytest.raises(ConfigError, match="looks like a file name"):
        CharTokenizer.train(str(directory / "*.json"))
    assert CharTokenizer.train("*").chars == ["*"]  # a bare "*" is text
    with pytest.raises(DataError, match="out of range"):
        tok.decode([0, 10_000])
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text\n" * 3 + b"\xff oops")
    with pytest.raises(DataError, match=r"bad\.txt: invalid UTF-8 at byte offset 30"):
        Tokenizer.train([bad], vocab_size=300, show_progress=False)


# ---- CLI -------------------------------------------------------------------------------------


def test_cli_train_tokenizer_bpe_and_char(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    assert main(["train-tokenizer", "--data", str(tmp_path / "*.txt"), "--vocab-size", "400",
                 "--out", str(tmp_path / "bpe"), "--quiet"]) == 0
    assert "vocab_size 400" in capsys.readouterr().out
    assert Tokenizer.from_pretrained(tmp_path / "bpe").vocab_size == 400
    assert main(["train-tokenizer", "--data", str(corpus), "--char", "--out", str(tmp_path / "char"), "--quiet"]) == 0
    assert isinstance(Tokenizer.from_pretrained(tmp_path / "char"), CharTokenizer)
    assert main(["train-tokenizer", "--data", str(corpus), "--out", str(tmp_path / "x")]) == 2
    assert "--vocab-size is required" in capsys.readouterr().err
