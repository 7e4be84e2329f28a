"""Sequence classification: transformers' GPT2ForSequenceClassification is the oracle."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.errors import CheckpointError, ConfigError
from lmforge.tasks.classification import (
    GPTForSequenceClassification, balanced_class_weights, classification_loss, collate_classification,
    last_token_index, load_classifier,
)

PAD = 100


def hf_classifier(seed=0, num_labels=3):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                        eos_token_id=0, pad_token_id=PAD, num_labels=num_labels,
                        id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2})
    return GPT2ForSequenceClassification(config).eval()


def padded_batch(side):
    torch.manual_seed(1)
    rows = [torch.randint(1, 99, (n,)) for n in (7, 3, 5)]
    width = max(len(r) for r in rows)
    ids = torch.full((3, width), PAD)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, r in enumerate(rows):
        if side == "right":
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        else:
            ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


@pytest.mark.parametrize("side", ["right", "left"])
def test_loads_transformers_classifier_with_identical_logits(tmp_path, side):
    hf = hf_classifier()
    hf.save_pretrained(tmp_path / "hf")
    ours = GPTForSequenceClassification.from_pretrained(tmp_path / "hf", device="cpu")
    assert ours.labels == ["neg", "neu", "pos"] and ours.config.pad_token_id == PAD
    ids, mask, pos = padded_batch(side)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, attention_mask=mask, position_ids=pos).logits
        # Without a mask the last real token is found through pad_token_id, as transformers does
        # (right padding: causality keeps the padding out of the real tokens' states).
        nomask_hf, nomask = hf(ids, position_ids=pos).logits, ours(ids, position_ids=pos).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(nomask, nomask_hf, atol=1e-6, rtol=1e-5)
    if side == "right":
        torch.testing.assert_close(nomask, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_transformers_loads_our_classifier_with_identical_logits(tmp_path, side):
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(0)
    from lmforge.config import GPTConfig

    config = GPTConfig(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4, pad_token_id=PAD,
                       bos_token_id=0, eos_token_id=0)
    ours = GPTForSequenceClassification(config, labels=["negative", "positive"]).eval()
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["architectures"] == ["GPT2ForSequenceClassification"]
    assert saved["id2label"] == {"0": "negative", "1": "positive"} and saved["label2id"]["positive"] == 1
    assert saved["num_labels"] == 2 and saved["pad_token_id"] == PAD
    hf = GPT2ForSequenceClassification.from_pretrained(tmp_path / "ours").eval()
    assert hf.config.id2label == {0: "negative", 1: "positive"}
    ids, mask, pos = padded_batch(side)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask, position_ids=pos).logits,
                                   hf(ids, attention_mask=mask, position_ids=pos).logits, atol=1e-6, rtol=1e-5)


def test_left_padding_matches_unpadded_rows():
    torch.manual_seed(0)
    from lmforge.config import GPTConfig

    model = GPTForSequenceClassification(GPTConfig(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4),
                                         labels=[0, 1]).eval()
    ids, mask, _ = padded_batch("left")
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits  # positions derived from the mask
        for i in range(3):
            alone = model(ids[i][mask[i].bool()][None]).logits
            torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=1e-5)


def test_last_token_index_both_sides():
    ids = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 5, 6, 7]])
    mask = (ids != 0).long()
    assert last_token_index(ids, mask, None).tolist() == [2, 4]
    assert last_token_index(ids, None, 0).tolist() == [2, 4]
    assert last_token_index(ids, None, None).tolist() == [4, 4]


def test_starts_from_a_language_model_and_int_labels_round_trip(tiny_hf_dir, tmp_path):
    from lmforge.tokenizer import Tokenizer

    with pytest.raises(ConfigError, match="no classification head"):
        GPTForSequenceClassification.from_pretrained(tiny_hf_dir, device="cpu")
    model = GPTForSequenceClassification.from_pretrained(tiny_hf_dir, labels=[0, 1], device="cpu")
    assert model.score.weight.shape == (2, 32)
    tok = Tokenizer.byte_level()
    # byte-level ids go up to 256: use a model with a matching vocabulary for predict()
    from lmforge.config import GPTConfig

    clf = GPTForSequenceClassification(GPTConfig(vocab_size=257, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                                 pad_token_id=256), labels=[0, 1])
    clf.save_pretrained(tmp_path / "c", tokenizer=tok)
    loaded = load_classifier(tmp_path / "c", device="cpu")
    preds = loaded.predict(["good", "bad", "a much longer text here"])
    assert all(p in (0, 1) and isinstance(p, int) for p in preds)
    with pytest.raises(ConfigError, match="labels are"):
        GPTForSequenceClassification.from_pretrained(tmp_path / "c", labels=["a", "b"], device="cpu")


def test_load_weights_is_strict_and_in_place(tmp_path):
    from lmforge.config import GPTConfig

    cfg = GPTConfig(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    a = GPTForSequenceClassification(cfg, labels=["x", "y"])
    a.save_pretrained(tmp_path / "a")
    b = GPTForSequenceClassification(cfg, labels=["x", "y"])
    b.load_weights(tmp_path / "a")
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    c = GPTForSequenceClassification(cfg, labels=["x", "y", "z"])
    with pytest.raises(CheckpointError, match="score.weight"):
        c.load_weights(tmp_path / "a")


def test_loss_sum_and_count_give_weighted_mean_under_accumulation():
    from lmforge.config import GPTConfig

    torch.manual_seed(0)
    model = GPTForSequenceClassification(GPTConfig(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4),
                                         labels=["a", "b", "c"]).eval()  # no dropout: compare exactly
    examples = [([1, 2, 3], 0), ([4, 5], 1), ([6], 2), ([7, 8, 9, 10], 0), ([3, 3], 0), ([9], 1)]
    weights = balanced_class_weights([y for _, y in examples], 3)
    torch.testing.assert_close(weights, torch.tensor([6 / 9, 1.0, 2.0]))
    full = collate_classification(examples, PAD)
    logits = model(full["input_ids"], attention_mask=full["attention_mask"]).logits
    expected = (torch.nn.functional.cross_entropy(logits, full["labels"], reduction="none") * weights[full["labels"]]).mean()
    sums, counts = zip(*(classification_loss(model, collate_classification(examples[i: i + 2], PAD), weights)
                         for i in range(0, 6, 2)))
    assert sum(counts) == 6
    torch.testing.assert_close(sum(sums) / sum(counts), expected)
    unweighted = model(full["input_ids"], full["labels"], attention_mask=full["attention_mask"]).loss
    s, n = classification_loss(model, full)
    torch.testing.assert_close(s / n, unweighted)
