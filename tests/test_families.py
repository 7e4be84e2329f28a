"""The family modules (Hugging Face naming schemes), the one strict state copy, and named config fields."""

import json
import warnings

import pytest
import torch

import lmforge
from lmforge import GPT, GPTConfig, load_model
from lmforge.checkpoint import copy_state
from lmforge.errors import CheckpointError, ConfigError
from lmforge.families import FAMILIES, family_for
from lmforge.generation.request import resolve_config
from lmforge.tasks.classification import GPTForSequenceClassification, HEAD_KEYS

from conftest import hf_gpt2

CONTRACT = ("ARCHITECTURES", "config_from_hf", "config_to_hf", "name_from_hf", "state_from_hf", "state_to_hf",
            "LORA_TARGETS", "LORA_DEFAULT_TARGETS")


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_every_family_module_has_the_whole_mapping(model_type):
    family = family_for(model_type)
    assert all(hasattr(family, name) for name in CONTRACT)
    assert set(family.ARCHITECTURES) >= {"causal_lm", "sequence_classification"}
    assert set(family.LORA_DEFAULT_TARGETS) <= set(family.LORA_TARGETS)


def test_unknown_family_fails_clearly():
    with pytest.raises(ConfigError, match="x.json: model_type 'bert' is not supported yet; lmforge supports 'gpt2'"):
        family_for("bert", "x.json")
    with pytest.raises(ConfigError, match="GPTConfig.family 'bert' is not supported"):
        GPTConfig(family="bert")


def test_eos_list_is_a_named_field_that_round_trips_and_stops_generation(tmp_path):
    from transformers import GPT2LMHeadModel

    hf_gpt2(eos_token_id=[3, 5]).save_pretrained(tmp_path / "a")
    model = load_model(tmp_path / "a", device="cpu")
    assert model.config.eos_token_id == [3, 5] and model.config.eos_token_ids == [3, 5]
    assert "eos_token_id_list" not in model.config.extra
    assert resolve_config(model).eos_token_id == [3, 5]
    model.save_pretrained(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["eos_token_id"] == [3, 5]
    assert GPT2LMHeadModel.from_pretrained(tmp_path / "b").config.eos_token_id == [3, 5]
    assert GPTConfig(eos_token_id=7).eos_token_ids == [7] and GPTConfig(eos_token_id=None).eos_token_ids == []
    with pytest.raises(ConfigError, match="eos_token_id must be a token id"):
        GPTConfig(eos_token_id="</s>")


def test_classifier_labels_live_on_the_model_not_in_config_extra(tmp_path):
    cfg = GPTConfig(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4, extra={"id2label": {"0": "x"}})
    clf = GPTForSequenceClassification(cfg, labels=["neg", "pos"])
    assert not set(HEAD_KEYS) & set(clf.config.extra) and cfg.extra == {"id2label": {"0": "x"}}
    clf.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["GPT2ForSequenceClassification"] and saved["num_labels"] == 2
    again = GPTForSequenceClassification.from_pretrained(tmp_path, device="cpu")
    assert again.labels == ["neg", "pos"] and not set(HEAD_KEYS) & set(again.config.extra)


def _tiny(**kw):
    torch.manual_seed(0)
    return GPT(lmforge.preset("tiny", vocab_size=50, n_positions=16, **kw))


def test_copy_state_is_strict_with_one_error_format():
    source, target = _tiny(), _tiny()
    state = {k: v + 1 for k, v in source.state_dict().items() if k != "lm_head.weight"}  # tied: once
    copy_state(target, state, "a.safetensors")
    assert torch.equal(target.transformer.wte.weight, state["transformer.wte.weight"])
    assert target.lm_head.weight is target.transformer.wte.weight
    before = target.transformer.ln_f.weight.clone()
    bad = {**state, "transformer.ln_f.weight": torch.zeros(3), "extra.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"^a.safetensors: does not fit this model \(n_layer=2.*unexpected tensors "
                                              r"\['extra.weight'\]; check this$"):
        copy_state(target, bad, "a.safetensors", hint="check this")
    del bad["extra.weight"]
    with pytest.raises(CheckpointError, match=r"^a.safetensors: tensor 'transformer.ln_f.weight' has shape \(3,\), "
                                              r"but the model's config implies \(64,\) \(n_layer=2"):
        copy_state(target, bad, "a.safetensors")
    assert torch.equal(target.transformer.ln_f.weight, before)  # nothing changed when something did not fit
    with pytest.raises(CheckpointError, match=r"missing tensors \['transformer.wpe.weight'\]"):
        copy_state(target, {k: v for k, v in state.items() if k != "transformer.wpe.weight"}, "a.safetensors")


def test_copy_state_assigns_into_a_meta_model_and_ties_again():
    state = {k: v for k, v in _tiny().state_dict().items() if k != "lm_head.weight"}
    with torch.device("meta"):
        model = GPT(lmforge.preset("tiny", vocab_size=50, n_positions=16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        copy_state(model, {**state, "unused": torch.zeros(1)}, "b", unexpected="warn", assign=True,
                   dtype=torch.bfloat16)
    assert any("ignoring tensors the model does not use: ['unused']" in str(w.message) for w in caught)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
