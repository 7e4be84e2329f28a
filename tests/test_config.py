"""GPTConfig validation, presets and the Hugging Face config mapping."""

import json

import pytest
import torch

import lmforge
from lmforge import GPT, GPTConfig, preset
from lmforge.errors import ConfigError

# Parameter counts that transformers reports for OpenAI's four GPT-2 sizes.
GPT2_PARAMS = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}


def test_defaults_are_gpt2_small():
    c = GPTConfig()
    assert (c.n_layer, c.n_head, c.n_embd, c.vocab_size, c.n_positions) == (12, 12, 768, 50257, 1024)
    assert c.inner_dim == 3072 and c.head_dim == 64 and c.activation == "gelu_new"


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(n_embd=100, n_head=3), "divisible by n_head"),
        (dict(n_layer=0), "n_layer must be a positive integer"),
        (dict(vocab_size=-5), "vocab_size"),
        (dict(n_inner=0), "n_inner"),
        (dict(activation="gelu_erf"), "activation 'gelu_erf' is not supported"),
        (dict(attn_pdrop=1.5), "attn_pdrop"),
        (dict(layer_norm_epsilon=0.0), "layer_norm_epsilon"),
    ],
)
def test_validation_raises_clear_value_error(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment) as info:
        GPTConfig(**kwargs)
    assert isinstance(info.value, ValueError)  # ConfigError is a ValueError too


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="did you mean 'n_embd'"):
        GPTConfig.from_dict({"n_emb": 64})
    with pytest.raises(ConfigError, match="did you mean 'n_layer'"):
        preset("tiny", n_layers=3)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="unknown preset 'gpt3'.*available presets: gpt2"):
        preset("gpt3")
    with pytest.raises(ConfigError, match="did you mean 'gpt2-xl'"):
        preset("gpt2-xxl")


@pytest.mark.parametrize("name", list(GPT2_PARAMS))
def test_gpt2_preset_parameter_counts(name):
    with torch.device("meta"):
        model = GPT.from_preset(name)
    assert model.num_parameters() == GPT2_PARAMS[name]


@pytest.mark.parametrize("name", list(lmforge.PRESETS))
def test_presets_match_transformers_parameter_count(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = preset(name)
    hf_cfg = AutoConfig.for_model(**cfg.to_hf_dict())  # GPT2Config, LlamaConfig, Qwen2Config, ... by model_type
    with torch.device("meta"):
        ours = GPT(cfg)
        theirs = AutoModelForCausalLM.from_config(hf_cfg)
    assert ours.num_parameters() == theirs.num_parameters()


def test_hf_dict_round_trip_keeps_fields_and_extras():
    cfg = GPTConfig(vocab_size=77, n_positions=33, n_embd=24, n_layer=3, n_head=6, n_inner=50,
                    activation="relu", layer_norm_epsilon=1e-6, scale_attn_by_inverse_layer_idx=True,
                    extra={"id2label": {"0": "neg", "1": "pos"}})
    back = GPTConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict())))
    assert back == cfg
    assert back.extra["id2label"] == {"0": "neg", "1": "pos"}


def test_hf_dict_reads_n_ctx_and_rejects_other_model_types():
    d = {"model_type": "gpt2", "n_ctx": 77, "n_embd": 32, "n_head": 4, "n_layer": 1, "vocab_size": 10}
    assert GPTConfig.from_hf_dict(d).n_positions == 77
    with pytest.raises(ConfigError, match="model_type 'bert' is not supported yet"):
        GPTConfig.from_hf_dict({"model_type": "bert"}, source="x/config.json")
    with pytest.raises(ConfigError, match="x/config.json"):
        GPTConfig.from_hf_dict({"model_type": "gpt2", "n_embd": 30, "n_head": 4}, source="x/config.json")
