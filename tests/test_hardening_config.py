"""Issue 18, configuration: every config source is type-checked, special ids fit the vocabulary and
come from the tokenizer a model is saved with, seeds fit in 64 bits."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import lmforge
from lmforge import GPT, GPTConfig, GenerationConfig, preset
from lmforge.errors import CheckpointError, ConfigError
from lmforge.tokenizer import Tokenizer
from lmforge.training import TrainConfig, read_config_file

# ---- wrong types -----------------------------------------------------------------------------


@pytest.mark.parametrize("make, fragment", [
    (lambda: GPTConfig(bias="false"), r"GPTConfig\.bias must be true or false, got 'false' \(a string; write it without quotes\)"),
    (lambda: GPTConfig(tie_word_embeddings="false"), r"GPTConfig\.tie_word_embeddings must be true or false"),
    (lambda: GPTConfig(n_layer=True), r"GPTConfig\.n_layer must be an integer, got True \(a boolean\)"),
    (lambda: GPTConfig(layer_norm_epsilon="1e-5"), r"layer_norm_epsilon must be a number, got '1e-5'.*without quotes"),
    (lambda: GPTConfig(eos_token_id=[1, "2"]), r"eos_token_id must be a token id or a list of token ids or None"),
    (lambda: TrainConfig(batch_size=True), r"TrainConfig\.batch_size must be an integer, got True"),
    (lambda: TrainConfig(lr="1e-3"), r"TrainConfig\.lr must be a number, got '1e-3'"),
    (lambda: TrainConfig(compile="yes"), r"TrainConfig\.compile must be true or false"),
    (lambda: GenerationConfig(do_sample="false"), r"GenerationConfig\.do_sample must be true or false"),
    (lambda: GenerationConfig(max_new_tokens=True), r"GenerationConfig\.max_new_tokens must be an integer or None"),
    (lambda: GenerationConfig(early_stopping="always"), r"early_stopping must be true or false or 'never'"),
])
def test_a_value_of_the_wrong_type_is_refused_naming_the_key_and_type(make, fragment):
    with pytest.raises(ConfigError, match=fragment):
        make()


def test_a_whole_float_is_taken_for_an_int_and_the_right_types_still_pass():
    c = GPTConfig(n_layer=2.0, n_head=2, n_embd=64, vocab_size=97)
    assert c.n_layer == 2 and type(c.n_layer) is int
    assert TrainConfig(max_steps=1e3).max_steps == 1000
    with pytest.raises(ConfigError, match="n_layer must be an integer, got 2.5"):
        GPTConfig(n_layer=2.5)
    assert GenerationConfig(early_stopping="never", stop_strings="x").stop_strings == ["x"]


def test_config_json_with_a_string_boolean_is_refused_naming_the_file(tmp_path):
    GPT(preset("tiny", vocab_size=97)).save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    d["tie_word_embeddings"] = "false"  # would be true to bool()
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"config\.json: GPTConfig\.tie_word_embeddings must be true or false"):
        lmforge.load_model(tmp_path, device="cpu")


def test_unknown_keywords_get_a_did_you_mean_like_from_dict():
    with pytest.raises(ConfigError, match="GPTConfig: unknown key 'n_layr'; did you mean 'n_layer'"):
        GPTConfig(n_layr=2)
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        TrainConfig(batch_sise=2)
    with pytest.raises(ConfigError, match="did you mean 'max_new_tokens'"):
        GenerationConfig(max_new_token=2)


def test_yaml_reads_1e_3_as_a_number_and_types_are_checked_per_file(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("lr: 1e-3\nmin_lr: 5E-5\nmax_steps: 10\nbatch_size: 4\n")
    values = read_config_file(good)
    assert values["lr"] == 0.001 and isinstance(values["lr"], float) and values["min_lr"] == 5e-5
    assert TrainConfig.from_dict(values).lr == 0.001
    for text, fragment in [("batch_size: true\n", r"config file .*bad\.yaml: TrainConfig\.batch_size must be an integer"),
                           ('lr: "1e-3"\n', r"TrainConfig\.lr must be a number, got '1e-3'.*without quotes")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=fragment):
            TrainConfig.from_dict(read_config_file(bad), where=f"config file {bad}")


def test_the_cli_reads_a_yaml_config_with_lr_1e_3(tmp_path):
    import argparse

    from lmforge.cli.pretrain import add_train_flags, train_config_from_args

    (tmp_path / "c.yaml").write_text("lr: 1e-3\nwarmup_steps: 0\n")
    p = argparse.ArgumentParser()
    add_train_flags(p)
    config = train_config_from_args(p.parse_args(["--config", str(tmp_path / "c.yaml")]))
    assert config.lr == 0.001 and config.warmup_steps == 0


# ---- special ids -------------------------------------------------------------------------------


def test_gpt2_default_ids_only_where_the_vocabulary_has_them():
    assert GPTConfig().eos_token_id == 50256 and GPTConfig().bos_token_id == 50256
    assert preset("tiny", vocab_size=11).eos_token_id is None  # was 50256: an id past the embedding
    assert preset("gpt2").replace(vocab_size=65).eos_token_id is None
    assert json.loads(json.dumps(GPTConfig().to_dict()))["eos_token_id"] == 50256
    with pytest.raises(ConfigError, match=r"eos_token_id 50256 is outside the vocabulary \(vocab_size 11"):
        GPTConfig(vocab_size=11, eos_token_id=50256)
    with pytest.raises(ConfigError, match="pad_token_id -1 is outside"):
        GPTConfig(vocab_size=11, pad_token_id=-1)
    with pytest.raises(ConfigError, match="eos_token_id 12 is outside"):
        GPTConfig(vocab_size=11, eos_token_id=[3, 12])


def char_tokenizer(tmp_path):
    from lmforge.char_tokenizer import CharTokenizer

    text = tmp_path / "corpus.txt"
    text.write_text("hello world\n")
    return CharTokenizer.train([text], show_progress=False)


def test_a_char_model_saves_the_tokenizers_special_ids(tmp_path):
    tok = char_tokenizer(tmp_path)
    assert tok.vocab_size < 20 and tok.eos_token_id is not None
    model = GPT(preset("tiny", vocab_size=tok.vocab_size))  # as pretrain builds it
    model.save_pretrained(tmp_path / "m", tokenizer=tok)
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["eos_token_id"] == tok.eos_token_id and saved["vocab_size"] == tok.vocab_size
    loaded = lmforge.load_model(tmp_path / "m", device="cpu")
    from lmforge.generation import resolve_config

    assert resolve_config(loaded).eos_token_id == [tok.eos_token_id]  # generate() stops where run/serve do


def test_save_pretrained_keeps_an_eos_list_that_holds_the_tokenizers_eos(tmp_path):
    class Tok:  # a tokenizer whose eos is one of the model's several
        bos_token_id, eos_token_id, pad_token_id = 1, 2, None

        def __len__(self):
            return 50

        def save_pretrained(self, directory):
            pass

    model = GPT(GPTConfig(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=1,
                          eos_token_id=[2, 3], pad_token_id=4))
    model.save_pretrained(tmp_path, tokenizer=Tok())
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["eos_token_id"] == [2, 3] and saved["bos_token_id"] == 1 and saved["pad_token_id"] == 4


def test_save_pretrained_refuses_a_tokenizer_bigger_than_the_model(tmp_path):
    model = GPT(GPTConfig(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(CheckpointError, match=r"tokenizer has 257 ids but the model's vocabulary has 50"):
        model.save_pretrained(tmp_path / "m", tokenizer=Tokenizer.byte_level())
    assert not (tmp_path / "m").exists()  # refused before anything was written


def test_a_foreign_config_with_ids_past_the_vocabulary_loads_with_a_warning(tmp_path):
    GPT(preset("tiny", vocab_size=257)).save_pretrained(tmp_path, tokenizer=Tokenizer.byte_level())
    d = json.loads((tmp_path / "config.json").read_text())
    d.update(eos_token_id=50256, pad_token_id=-1)  # what an older lmforge wrote for a char model; an old pad
    (tmp_path / "config.json").write_text(json.dumps(d))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = lmforge.load_model(tmp_path, device="cpu")
    assert model.config.eos_token_id is None and model.config.pad_token_id is None
    assert any("eos_token_id 50256 is outside the vocabulary" in str(w.message) for w in caught)


def test_generate_refuses_special_ids_outside_the_vocabulary():
    model = GPT(preset("tiny", vocab_size=50)).eval()
    for options, fragment in [(dict(eos_token_id=999), "eos_token_id 999 is outside the model's vocabulary"),
                              (dict(eos_token_id=[3, 50]), "eos_token_id 50 is outside"),
                              (dict(pad_token_id=60), "pad_token_id 60 is outside")]:
        with pytest.raises(ConfigError, match=fragment):
            model.generate([[1, 2]], max_new_tokens=2, **options)
    with pytest.raises(ConfigError, match="pad_token_id must be a token id >= 0"):
        GenerationConfig(pad_token_id=-1)


def test_seeds_must_fit_in_64_bits():
    assert GenerationConfig(seed=2**64 - 1).seed == 2**64 - 1
    for make in (lambda: GenerationConfig(seed=2**64), lambda: TrainConfig(seed=2**70), lambda: GenerationConfig(seed=-1)):
        with pytest.raises(ConfigError, match=r"seed must be in 0\.\.18446744073709551615"):
            make()


def test_the_int_subclass_default_is_a_plain_int_once_copied():
    import copy
    import pickle

    c = GPTConfig()
    for copied in (pickle.loads(pickle.dumps(c)).eos_token_id, copy.deepcopy(c).eos_token_id, c.to_dict()["eos_token_id"]):
        assert type(copied) is int and copied == 50256
    assert torch.tensor([c.eos_token_id]).tolist() == [50256]


def test_recipe_options_lora_settings_and_templates_are_typed_too(tmp_path):
    import argparse

    from lmforge.cli.pretrain import add_train_flags, train_config_from_args
    from lmforge.tasks.finetune import LoRASettings
    from lmforge.tasks.sft import SFTTemplate

    (tmp_path / "c.yaml").write_text('samples: "2"\n')
    p = argparse.ArgumentParser()
    add_train_flags(p)
    with pytest.raises(ConfigError, match=r"c\.yaml: RecipeOptions\.samples must be an integer or None, got '2'"):
        train_config_from_args(p.parse_args(["--config", str(tmp_path / "c.yaml")]))
    with pytest.raises(ConfigError, match="LoRASettings.alpha must be a number"):
        LoRASettings(alpha="16")
    with pytest.raises(ConfigError, match="SFTTemplate.prompt must be a string, got 3"):
        SFTTemplate.from_dict({"task": "qa", "prompt": 3, "response": " {a}"})


@pytest.mark.parametrize("key, value, fragment", [
    ("rope_theta", "1e4", r"GPTConfig\.rope_theta must be a number, got '1e4'"),
    ("rms_norm_eps", True, r"GPTConfig\.layer_norm_epsilon must be a number, got True"),
])
def test_hugging_face_numbers_of_the_wrong_type_are_not_converted(key, value, fragment):
    d = preset("llama-baby", vocab_size=97).to_hf_dict()
    d[key] = value
    d.pop("rope_parameters", None)
    with pytest.raises(ConfigError, match=fragment):
        GPTConfig.from_hf_dict(d)
