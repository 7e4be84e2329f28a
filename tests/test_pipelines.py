"""pipeline(): the five applications return transformers' result shapes."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import GPTConfig
from lmforge.errors import ConfigError, DataError
from lmforge.model import GPT
from lmforge.tasks import pipeline
from lmforge.tasks.classification import GPTForSequenceClassification
from lmforge.tasks.sft import CONFIG_KEY, make_template
from lmforge.tokenizer import Tokenizer

CFG = dict(vocab_size=257, n_positions=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=256, eos_token_id=256)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("lm")
    GPT(GPTConfig(**CFG)).save_pretrained(directory, tokenizer=Tokenizer.byte_level())
    return directory


@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("clf")
    model = GPTForSequenceClassification(GPTConfig(**CFG, pad_token_id=256), labels=["NEGATIVE", "POSITIVE"])
    model.save_pretrained(directory, tokenizer=Tokenizer.byte_level())
    return directory


def test_text_generation_shapes(lm_dir):
    pipe = pipeline("text-generation", model=lm_dir, device="cpu")
    one = pipe("Hello", max_new_tokens=5)
    assert isinstance(one, list) and len(one) == 1 and one[0]["generated_text"].startswith("Hello")
    many = pipe(["Hi", "A longer prompt"], max_new_tokens=4, num_return_sequences=2, seed=0)
    assert [len(x) for x in many] == [2, 2] and many[1][0]["generated_text"].startswith("A longer prompt")
    # batched (left-padded) greedy equals one at a time
    batched = pipe(["Hi", "A longer prompt"], max_new_tokens=6, return_full_text=False)
    alone = [pipe(p, max_new_tokens=6, return_full_text=False)[0] for p in ["Hi", "A longer prompt"]]
    assert [b[0] for b in batched] == alone


def test_sentiment_analysis_shapes_and_alias(clf_dir):
    pipe = pipeline("sentiment-analysis", model=clf_dir, device="cpu", batch_size=2)
    one = pipe("I loved it")
    assert isinstance(one, list) and set(one[0]) == {"label", "score"} and one[0]["label"] in ("NEGATIVE", "POSITIVE")
    many = pipeline("text-classification", model=clf_dir)(["good", "bad", "fine film"])
    assert len(many) == 3 and all(0.0 <= r["score"] <= 1.0 for r in many)
    every = pipe("good", top_k=None)[0]
    assert [r["label"] for r in every] != [] and abs(sum(r["score"] for r in every) - 1) < 1e-5
    assert many[0] == pipe("good")[0] or abs(many[0]["score"] - pipe("good")[0]["score"]) < 1e-5


def test_translation_and_summarization_shapes(lm_dir):
    tr = pipeline("translation", model=lm_dir)
    out = tr(["A man.", "Two dogs run."], max_new_tokens=4)
    assert len(out) == 2 and set(out[0]) == {"translation_text"} and isinstance(out[0]["translation_text"], str)
    assert len(pipeline("translation_en_to_de", model=lm_dir)("Hi.", max_new_tokens=3)) == 1
    sm = pipeline("summarization", model=lm_dir)("A long document. " * 5, max_new_tokens=4)
    assert len(sm) == 1 and set(sm[0]) == {"summary_text"}


def test_question_answering_generative_with_span(lm_dir):
    qa = pipeline("question-answering", model=lm_dir)
    res = qa(question="Who?", context="Bob went home.", max_new_tokens=4)
    assert set(res) == {"answer", "score", "start", "end"} and 0.0 <= res["score"] <= 1.0
    many = qa(question=["Who?", "Where?"], context=["Bob went home.", "In Paris."], max_new_tokens=3)
    assert isinstance(many, list) and len(many) == 2
    assert qa({"question": "Who?", "context": "Bob went home."}, max_new_tokens=4) == res
    with pytest.raises(DataError, match="both question= and context="):
        qa(question="Who?")


def test_qa_span_and_score_on_a_model_that_learned_the_answer(lm_dir):
    """Teach the template's answer to a tiny model; the answer is located in the context."""
    from lmforge import load_model
    from lmforge.tasks.data import Record
    from lmforge.tasks.sft import build_sft_examples, collate_sft

    tok = Tokenizer.byte_level()
    model = load_model(lm_dir, device="cpu").train()
    t = make_template("qa")
    row = {"context": "Bob went home.", "question": "Who?", "answers": ["Bob"]}
    batch = collate_sft(build_sft_examples([Record(row, "f", 1)], tok, t, 128)[0], 256)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(batch["input_ids"]).logits[0], batch["labels"][0], ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.config.extra[CONFIG_KEY] = t.to_dict()
    res = pipeline("question-answering", model=model.eval(), tokenizer=tok)(question="Who?", context="Bob went home.")
    assert res["answer"] == "Bob" and (res["start"], res["end"]) == (0, 3) and res["score"] > 0.5


def test_bad_pipeline_requests(lm_dir, clf_dir):
    with pytest.raises(ConfigError, match="unknown pipeline task"):
        pipeline("fill-mask", model=lm_dir)
    with pytest.raises(ConfigError, match="needs model="):
        pipeline("text-generation")
    with pytest.raises(ConfigError, match="needs a classifier"):
        pipeline("sentiment-analysis", model=GPT(GPTConfig(**CFG)), tokenizer=Tokenizer.byte_level())


def test_top_level_export():
    import lmforge

    assert lmforge.pipeline is pipeline
