"""Token datasets: prepare -> read reproduces every document exactly; the header, dtype and split
are right; samplers are deterministic and shard across ranks; bad input is a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lmforge.data as data_module
from lmforge import CharTokenizer, TokenDataset, Tokenizer, prepare
from lmforge.cli import main
from lmforge.data import IGNORE_INDEX, read_header
from lmforge.errors import ConfigError, DataError
from lmforge.tokenizer import EOS

DOCS = [
    "The first document.\nIt has two lines.",
    "中文文档，带标点。",
    "emoji 👍🏽 and combining e\u0301 and \ttabs   and spaces  ",
    "a document that mentions <|endoftext|> literally",
    "",
    "control \x00\x1b chars\r\nand CRLF",
    " ".join(f"word{i}" for i in range(2000)),  # longer than a piece when pieces are small
]


@pytest.fixture(scope="module")
def bpe():
    corpus = "\n".join(DOCS) + " ".join(f"w{i % 50} x{i % 13}" for i in range(3000))
    return Tokenizer.train(corpus, vocab_size=400, show_progress=False)


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({field: d, "meta": 1}, ensure_ascii=False) + "\n")
    return path


def all_documents(directory: Path, tok) -> list[str]:
    """Decode train then val documents, joining a document the split cut in two."""
    train, val = TokenDataset(directory, "train"), TokenDataset(directory, "val")
    tokens = np.concatenate([np.asarray(train.tokens), np.asarray(val.tokens)]).astype(np.int64)
    eos = tok.eos_token_id
    ends = np.flatnonzero(tokens == eos)
    assert ends[-1] == len(tokens) - 1  # every document ends with eos
    docs, start = [], 0
    for e in ends:
        docs.append(tok.decode(tokens[start:e]))
        start = e + 1
    return docs


@pytest.fixture
def small_pieces(monkeypatch):
    """Force many pieces and batches so chunking and flushing are exercised on small inputs."""
    monkeypatch.setattr(data_module, "PIECE_CHARS", 64)


# ---- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bpe", "byte", "char"])
def test_prepare_then_read_reproduces_every_document(kind, bpe, tmp_path, small_pieces):
    docs = DOCS * 5
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    tok = {"bpe": bpe, "byte": Tokenizer.byte_level(), "char": CharTokenizer.train("".join(DOCS) + EOS)}[kind]
    header = prepare(src, tok, tmp_path / "ds", val_fraction=0.2, batch_chars=500, show_progress=False)
    assert all_documents(tmp_path / "ds", tok) == docs
    assert header["documents"] == len(docs)
    assert header["splits"]["train"]["documents"] + header["splits"]["val"]["documents"] == len(docs)
    # ids equal encoding each document whole (pieces are cut at token boundaries)
    train = TokenDataset(tmp_path / "ds", "train", tokenizer=tok)
    expected = [i for d in docs for i in tok.encode(d, split_special_tokens=True) + [tok.eos_token_id]]
    assert np.asarray(train.tokens).tolist() == expected[:len(train.tokens)]


def test_documents_iterator_and_split_at_document_boundary(bpe, tmp_path):
    docs = [f"document number {i}: " + "text " * (i % 7) for i in range(200)]
    header = prepare(write_jsonl(tmp_path / "d.jsonl", docs), bpe, tmp_path / "ds", val_fraction=0.1, show_progress=False)
    assert header["split_inside_document"] is False
    train, val = TokenDataset(tmp_path / "ds", "train"), TokenDataset(tmp_path / "ds", "val")
    decoded = [bpe.decode(d) for d in [*train.documents(), *val.documents()]]
    assert decoded == docs
    assert header["splits"]["val"]["documents"] == len(list(val.documents())) > 0
    assert abs(len(val) / (len(train) + len(val)) - 0.1) < 0.03


def test_text_files_are_documents_and_a_single_one_is_split_inside(bpe, tmp_path, small_pieces):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("Only one file here.\n" * 100, encoding="utf-8")
    b.write_text("second\r\nfile", encoding="utf-8")
    header = prepare(str(tmp_path / "a.txt"), bpe, tmp_path / "one", show_progress=False)
    assert header["documents"] == 1 and header["split_inside_document"] is True
    assert all_documents(tmp_path / "one", bpe) == [a.read_text(encoding="utf-8")]
    prepare(str(tmp_path / "*.txt"), bpe, tmp_path / "two", val_fraction=0.0, show_progress=False)
    assert all_documents(tmp_path / "two", bpe) == [a.read_text(encoding="utf-8"), "second\r\nfile"]
    assert len(TokenDataset(tmp_path / "two", "val")) == 0


def test_prepare_matches_whole_text_encoding_on_real_data(bpe, shared_data, tmp_path):
    path = shared_data / "tinyshakespeare" / "input.txt"
    header = prepare(path, bpe, tmp_path / "ds", show_progress=False)
    text = path.read_text(encoding="utf-8")
    ids = bpe.encode(text, split_special_tokens=True) + [bpe.eos_token_id]
    train, val = TokenDataset(tmp_path / "ds", "train"), TokenDataset(tmp_path / "ds", "val")
    assert np.concatenate([train.tokens, val.tokens]).tolist() == ids
    assert header["tokens"] == len(ids) and header["dtype"] == "uint16"


def test_char_dataset_is_nanogpt_compatible(tmp_path):
    text = "hello world, this is a tiny corpus.\n" * 50
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    tok = CharTokenizer.train(text, special_tokens=(), eos_token=None)  # nanoGPT's shakespeare_char: no eos
    header = prepare(tmp_path / "input.txt", tok, tmp_path / "ds", show_progress=False)
    assert header["tokenizer"]["eos_token_id"] is None and header["tokens"] == len(text)
    raw = np.memmap(tmp_path / "ds" / "train.bin", dtype=np.uint16, mode="r")  # what nanoGPT's train.py reads
    assert tok.decode(raw) == text[:len(raw)]


def test_large_vocab_uses_uint32(tmp_path):
    chars = [chr(c) for c in range(0x10000, 0x10000 + 70_000)]  # no surrogates in this range
    tok = CharTokenizer(chars)
    text = "".join(chars[::997]) + chars[-1]
    header = prepare(write_jsonl(tmp_path / "d.jsonl", [text, text[::-1]]), tok, tmp_path / "ds",
                     val_fraction=0.0, show_progress=False)
    assert header["dtype"] == "uint32"
    ds = TokenDataset(tmp_path / "ds")
    assert ds.tokens.dtype == np.uint32 and [tok.decode(d) for d in ds.documents()] == [text, text[::-1]]


# ---- readers ---------------------------------------------------------------------------------


@pytest.fixture
def positional(tmp_path):
    """A dataset whose token at position p is p (a text of distinct, sorted characters)."""
    text = "".join(chr(0x4E00 + i) for i in range(3000))
    tok = CharTokenizer.train(text)
    prepare(write_jsonl(tmp_path / "d.jsonl", [text]), tok, tmp_path / "ds", val_fraction=0.0, show_progress=False)
    return tmp_path / "ds"


def test_random_batch_blocks_and_determinism(positional):
    ds = TokenDataset(positional)
    x, y = ds.random_batch(8, 16, seed=1)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # contiguous blocks; y is x shifted by one token
    x2, _ = ds.random_batch(8, 16, seed=1)
    assert torch.equal(x, x2)
    x3, _ = ds.random_batch(8, 16, torch.Generator().manual_seed(2))
    assert not torch.equal(x, x3)
    a = [TokenDataset(positional, seed=5).random_batch(4, 8)[0] for _ in range(2)]
    assert torch.equal(a[0], a[1])  # the dataset's own generator is seeded
    d = TokenDataset(positional, seed=5)
    assert not torch.equal(d.random_batch(4, 8)[0], d.random_batch(4, 8)[0])  # and advances


def test_dataset_pickles_by_path_for_dataloader_workers(positional):
    import pickle

    ds = TokenDataset(positional, seed=3)
    assert "tokens" not in ds.__getstate__()  # the path travels, not a copy of the tokens
    clone = pickle.loads(pickle.dumps(ds))
    assert isinstance(clone.tokens, np.memmap)
    assert torch.equal(clone.random_batch(2, 8, seed=0)[0], ds.random_batch(2, 8, seed=0)[0])


def test_random_batch_shards_across_ranks(positional):
    n = len(TokenDataset(positional))
    for rank in range(3):
        ds = TokenDataset(positional, rank=rank, world_size=3)
        lo, hi = n * rank // 3, n * (rank + 1) // 3
        x, y = ds.random_batch(64, 32, seed=0)
        assert x.min() >= lo and y.max() < hi


def test_sequential_batches_cover_every_target_once_across_ranks(positional):
    n = len(TokenDataset(positional))
    targets = []
    for rank in range(3):
        ds = TokenDataset(positional, rank=rank, world_size=3)
        batches = list(ds.sequential_batches(4, 50))
        assert sum(len(x) for x, _ in batches) == ds.num_blocks(50)
        for x, y in batches:
            valid = y != IGNORE_INDEX
            assert torch.equal(y[valid], x[valid] + 1)
            targets += y[valid].tolist()
    assert targets == list(range(1, n))


def test_tokenizer_of_the_dataset_and_mismatch_error(bpe, tmp_path):
    prepare(write_jsonl(tmp_path / "d.jsonl", DOCS), bpe, tmp_path / "ds", show_progress=False)
    assert TokenDataset(tmp_path / "ds").tokenizer.fingerprint == bpe.fingerprint
    with pytest.raises(DataError, match="different tokenizer"):
        TokenDataset(tmp_path / "ds", tokenizer=Tokenizer.byte_level())


# ---- bad input -------------------------------------------------------------------------------


def test_non_utf8_reports_file_and_offset_or_replaces(bpe, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("héllo\n".encode() * 1000 + b"\xc3\x28 rest")
    with pytest.raises(DataError, match=r"bad\.txt: invalid UTF-8 at byte offset 7000"):
        prepare(bad, bpe, tmp_path / "ds", show_progress=False)
    assert not (tmp_path / "ds" / "dataset.json").exists() and not (tmp_path / "ds" / "train.bin").exists()
    prepare(bad, bpe, tmp_path / "ds", errors="replace", val_fraction=0.0, show_progress=False)
    assert all_documents(tmp_path / "ds", bpe) == ["héllo\n" * 1000 + "\ufffd( rest"]
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid UTF-8 at byte offset 25"):
        prepare(jsonl, bpe, tmp_path / "ds2", show_progress=False)


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": oops}\n', r"d\.jsonl:2: not valid JSON"),
    ('{"text": "ok"}\n\n{"body": "x"}\n', r"d\.jsonl:3: the record has no 'text' field \(fields: 'body'\)"),
    ('{"text": 5}\n', r"d\.jsonl:1: field 'text' is int"),
    ('[1, 2]\n', r"d\.jsonl:1: expected a JSON object"),
    ('\n\n', r"no JSON records"),
])
def test_bad_jsonl_names_file_and_line(bpe, tmp_path, content, message):
    (tmp_path / "d.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        prepare(tmp_path / "d.jsonl", bpe, tmp_path / "ds", show_progress=False)


def test_other_bad_inputs_are_clear_errors(bpe, tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="empty.txt: the file is empty"):
        prepare(tmp_path / "empty.txt", bpe, tmp_path / "ds", show_progress=False)
    with pytest.raises(DataError, match="matches no files"):
        prepare(str(tmp_path / "*.nothing"), bpe, tmp_path / "ds", show_progress=False)
    with pytest.raises(DataError, match="is a folder"):
        prepare(tmp_path, bpe, tmp_path / "ds", show_progress=False)
    with pytest.raises(ConfigError, match="val_fraction"):
        prepare(tmp_path / "empty.txt", bpe, tmp_path / "ds", val_fraction=1.0, show_progress=False)
    write_jsonl(tmp_path / "d.jsonl", ["one", "two"])
    no_eos = CharTokenizer.train("onetw", special_tokens=(), eos_token=None)
    with pytest.raises(DataError, match="no eos token"):
        prepare(tmp_path / "d.jsonl", no_eos, tmp_path / "ds", show_progress=False)


def test_damaged_datasets_are_detected(bpe, tmp_path):
    with pytest.raises(DataError, match="not a prepared token dataset"):
        TokenDataset(tmp_path)
    prepare(write_jsonl(tmp_path / "d.jsonl", DOCS), bpe, tmp_path / "ds", show_progress=False)
    with pytest.raises(DataError, match="no split 'test'"):
        TokenDataset(tmp_path / "ds", "test")
    with pytest.raises(DataError, match="fewer than block_size"):
        TokenDataset(tmp_path / "ds", "val").random_batch(2, 10_000)
    train = tmp_path / "ds" / "train.bin"
    train.write_bytes(train.read_bytes()[:-2])
    with pytest.raises(DataError, match="incomplete or was modified"):
        TokenDataset(tmp_path / "ds")
    header = read_header(tmp_path / "ds")
    header["format"] = "something-else"
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps(header), encoding="utf-8")
    with pytest.raises(DataError, match="not an lmforge token dataset"):
        TokenDataset(tmp_path / "ds")


# ---- CLI -------------------------------------------------------------------------------------


def test_cli_prepare(bpe, tmp_path, capsys):
    bpe.save_pretrained(tmp_path / "tok")
    write_jsonl(tmp_path / "a.jsonl", DOCS, field="body")
    assert main(["prepare", "--data", str(tmp_path / "*.jsonl"), "--tokenizer", str(tmp_path / "tok"),
                 "--out", str(tmp_path / "ds"), "--field", "body", "--val-fraction", "0.2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "train:" in out and "val:" in out
    assert all_documents(tmp_path / "ds", bpe) == DOCS
    assert main(["prepare", "--data", str(tmp_path / "a.jsonl"), "--tokenizer", "byte-level",
                 "--out", str(tmp_path / "ds2"), "--quiet"]) == 2  # field 'text' is missing
    assert "a.jsonl:1: the record has no 'text' field" in capsys.readouterr().err
