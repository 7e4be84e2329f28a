"""LoRA: zero-initialised adapters, frozen base, merge equivalence, save/load, bad targets."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.config import GPTConfig
from lmforge.errors import CheckpointError, ConfigError
from lmforge.model import GPT
from lmforge.tasks.classification import GPTForSequenceClassification
from lmforge.tasks.lora import (
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRALinear, LoRAModel, apply_lora, count_parameters, load_lora, merge_lora,
)

CFG = GPTConfig(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4, embd_pdrop=0.0, attn_pdrop=0.0,
                resid_pdrop=0.0)


def tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(CFG).eval()


def randomise_adapters(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.05)


def test_starts_equal_to_base_and_freezes_it():
    base = tiny()
    x = torch.randint(0, 101, (2, 10))
    expected = base(x).logits
    n_base = base.num_parameters()
    lora = apply_lora(base, rank=4, alpha=8, targets=["c_attn", "mlp.c_proj"])
    torch.testing.assert_close(lora(x).logits, expected)  # B = 0
    wrapped = [n for n, m in lora.model.named_modules() if isinstance(m, LoRALinear)]
    assert wrapped == ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj",
                       "transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_proj"]
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    n_train, total = count_parameters(lora)
    # c_attn: 4 * (32 + 96), mlp.c_proj: 4 * (128 + 32), per layer
    assert n_train == 2 * (4 * (32 + 96) + 4 * (128 + 32))
    assert total == n_base + n_train


def test_merged_logits_equal_adapted_logits_and_training_moves_only_adapters():
    lora = apply_lora(tiny(), rank=4, alpha=16, targets=["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"])
    frozen = {n: p.clone() for n, p in lora.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 101, (4, 12))
    for _ in range(3):
        loss = lora(x[:, :-1], x[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in lora.named_parameters() if not p.requires_grad)
    merged = merge_lora(lora)
    assert isinstance(merged, GPT) and not any(isinstance(m, LoRALinear) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, lora(x).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(merged(x).logits, tiny()(x).logits, atol=1e-4)


def test_save_writes_merged_model_and_adapters_and_resume_restores(tmp_path):
    from lmforge import load_model

    lora = apply_lora(tiny(), rank=2, alpha=4, targets=["c_attn"], base_model="base-dir")
    randomise_adapters(lora)
    lora.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / ADAPTER_WEIGHTS).is_file()
    settings = json.loads((tmp_path / "out" / ADAPTER_CONFIG).read_text())
    assert settings["rank"] == 2 and settings["base_model"] == "base-dir"
    x = torch.randint(0, 101, (2, 9))
    plain = load_model(tmp_path / "out", device="cpu")  # what generate and the server load
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, lora(x).logits, atol=1e-5, rtol=1e-5)
    # resume: a fresh LoRA model on the same base gets the adapters back, strictly
    again = apply_lora(tiny(), rank=2, alpha=4, targets=["c_attn"])
    again.load_weights(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, lora(x).logits)
    other = apply_lora(tiny(), rank=2, alpha=4, targets=["c_fc"])
    with pytest.raises(CheckpointError, match="does not fit"):
        other.load_weights(tmp_path / "out")
    # load_lora rebuilds the wrapping from the adapter config alone
    rebuilt = load_lora(tiny(), tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x).logits, lora(x).logits)


def test_classifier_head_stays_trainable_and_merges(tmp_path):
    torch.manual_seed(0)
    clf = GPTForSequenceClassification(CFG, labels=["a", "b"]).eval()
    lora = apply_lora(clf, rank=2, alpha=2, targets=["c_attn"])
    assert lora.score.weight.requires_grad and lora.num_labels == 2
    randomise_adapters(lora)
    lora.save_pretrained(tmp_path / "clf")
    loaded = GPTForSequenceClassification.from_pretrained(tmp_path / "clf", device="cpu")
    x = torch.randint(0, 101, (3, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, lora(x).logits, atol=1e-5, rtol=1e-5)


def test_targets_that_match_nothing_fail_with_the_names_there_are():
    with pytest.raises(ConfigError, match=r"\['q_proj'\] match no linear module.*c_attn"):
        apply_lora(tiny(), targets=["c_attn", "q_proj"])
    with pytest.raises(ConfigError, match="rank must be >= 1"):
        apply_lora(tiny(), rank=0)
    lora = apply_lora(tiny(), targets=[r"re:transformer\.h\.1\.attn\.c_attn"])
    assert [n for n, m in lora.named_modules() if isinstance(m, LoRALinear)] == ["model.transformer.h.1.attn.c_attn"]
    with pytest.raises(ConfigError, match="already has LoRA"):
        apply_lora(lora)


def test_wrapper_forwards_attributes_and_gradient_checkpointing():
    lora = apply_lora(tiny(), targets=["c_attn"])
    assert isinstance(lora, LoRAModel) and lora.config is lora.model.config
    lora.gradient_checkpointing = True
    assert lora.model.gradient_checkpointing is True
    out = lora.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3)
    assert out.shape == (1, 6)
