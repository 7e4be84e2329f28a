"""SFT data: templates, prompt masking, document-side truncation, packing, batches, sources."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.errors import ConfigError, DataError
from lmforge.tasks.data import Record, ShuffledSource, read_records, val_batches
from lmforge.tasks.sft import (
    TEMPLATES, SFTTemplate, build_sft_examples, collate_sft, encode_example, make_template, pack_examples,
)
from lmforge.tokenizer import Tokenizer

EOS = 256


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.byte_level()


def test_templates_render_and_match_evaluation_prompts(tok):
    from lmforge.evaluation import PROMPT_TEMPLATES

    for task in ("translation", "summarization", "qa"):
        assert TEMPLATES[task].prompt == PROMPT_TEMPLATES[task]  # a tuned model is scored with its own prompt
    t = TEMPLATES["qa"]
    row = {"context": "Paris is in France.", "question": "Where is Paris?", "answers": ["France", "in France"]}
    assert t.render_prompt(row) == "Context: Paris is in France.\nQuestion: Where is Paris?\nAnswer:"
    assert t.render_response(row) == " France"
    assert t.fields == ["context", "question", "answers"]


def test_prompt_tokens_are_masked_and_eos_appended(tok):
    t = make_template("translation")
    ex, cut = encode_example(tok, t, {"source": "Hi.", "target": "Hallo."}, max_length=64)
    prompt = tok.encode("Translate English to German:\nHi.\nGerman:")
    assert cut is None and ex.ids == prompt + tok.encode(" Hallo.") + [EOS]
    batch = collate_sft([ex], pad_id=EOS)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert torch.equal(ids, torch.tensor(ex.ids[:-1]))
    # labels[t] is the token after position t; only response tokens (and eos) are targets
    n_prompt = len(prompt)
    assert (labels[: n_prompt - 1] == -100).all()
    assert labels[n_prompt - 1:].tolist() == tok.encode(" Hallo.") + [EOS]


def test_long_documents_are_cut_on_the_document_side(tok):
    t = make_template("summarization")
    rows = [Record({"document": "word " * 100, "summary": "short"}, "f.jsonl", 1),
            Record({"document": "tiny", "summary": "ok"}, "f.jsonl", 2)]
    examples, stats = build_sft_examples(rows, tok, t, max_length=60)
    assert stats.truncated == 1 and stats.examples == 2 and "1 truncated" in stats.summary()
    first = examples[0]
    assert len(first) <= 61
    text = tok.decode(first.ids)
    assert text.endswith("\nTL;DR: short<|endoftext|>")  # instruction and answer kept
    # the prompt still fills the budget: nearly everything cut came from the document
    assert len(first) >= 55


def test_custom_template_and_errors(tok):
    with pytest.raises(ConfigError, match="unknown task"):
        make_template("poetry")
    with pytest.raises(ConfigError, match="prompt-template"):
        make_template("custom")
    t = make_template("custom", "Q: {question}\nA:", " {answer}")
    assert t.fields == ["question", "answer"]
    with pytest.raises(ConfigError, match="no \\{field\\} slot"):
        SFTTemplate("custom", "no slots", " {answer}")
    with pytest.raises(DataError, match="f.jsonl:3: missing field 'answer'"):
        build_sft_examples([Record({"question": "x"}, "f.jsonl", 3)], tok, t, 64)
    over = make_template("qa", prompt="{context}\n{question}\n")
    assert over.document_field == "context" and over.response == " {answers[0]}"


def test_packing_keeps_masks_per_example(tok):
    t = make_template("custom", "Q:{q}\nA:", " {a}")
    rows = [Record({"q": str(i), "a": "x" * i}, "f", i) for i in range(1, 6)]
    examples, _ = build_sft_examples(rows, tok, t, max_length=32)
    packed = pack_examples(examples, max_length=32)
    assert len(packed) < len(examples)
    assert sum(len(p) for p in packed) == sum(len(e) for e in examples)
    assert all(len(p) <= 33 for p in packed)
    batch = collate_sft(packed, pad_id=EOS)
    # every response token and eos is a target exactly once; prompt tokens and padding never are
    assert int((batch["labels"] != -100).sum()) == sum(sum(e.targets) for e in examples)
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_read_records_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": 1}\n\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:3: missing field\(s\) \['label'\]"):
        read_records(p, ["text", "label"])
    p.write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(DataError, match="d.jsonl:2: not valid JSON"):
        read_records(p, ["text"])


def test_shuffled_source_resumes_and_splits_ranks():
    examples = list(range(10))
    collate = lambda xs: {"input_ids": torch.tensor(xs)[:, None]}  # noqa: E731
    a = ShuffledSource(examples, 3, collate, seed=5)
    seen = [a.next_batch()["input_ids"].flatten().tolist() for _ in range(4)]
    assert sorted(sum(seen[:3], []) + seen[3][:1]) == list(range(10))  # one epoch first, then the next
    b = ShuffledSource(examples, 3, collate, seed=5)
    for _ in range(2):
        b.next_batch()
    state = json.loads(json.dumps(b.state_dict()))
    c = ShuffledSource(examples, 3, collate, seed=5)
    c.load_state_dict(state)
    assert [c.next_batch()["input_ids"].flatten().tolist() for _ in range(2)] == seen[2:]
    r0 = ShuffledSource(examples, 5, collate, seed=1, rank=0, world_size=2).next_batch()["input_ids"].flatten()
    r1 = ShuffledSource(examples, 5, collate, seed=1, rank=1, world_size=2).next_batch()["input_ids"].flatten()
    assert sorted(r0.tolist() + r1.tolist()) == list(range(10))
    assert [len(b["input_ids"]) for b in val_batches(examples, 4, collate)()] == [4, 4, 2]


def test_sft_loss_trains_only_on_responses(tok):
    """A few steps of the real causal-LM loss on SFT batches lower the response loss."""
    from lmforge.config import GPTConfig
    from lmforge.model import GPT
    from lmforge.training import causal_lm_loss

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=257, n_positions=64, n_embd=32, n_layer=2, n_head=4, embd_pdrop=0.0,
                          attn_pdrop=0.0, resid_pdrop=0.0))
    t = make_template("custom", "{q}=", "{a}")
    rows = [Record({"q": f"{i}+{i}", "a": str(2 * i)}, "f", i) for i in range(8)]
    examples, _ = build_sft_examples(rows, tok, t, 64)
    batch = collate_sft(examples, EOS)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss_sum, count = causal_lm_loss(model, batch)
        loss = loss_sum / count
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert count == sum(sum(e.targets) for e in examples)
    assert loss.item() < 0.5 * first
