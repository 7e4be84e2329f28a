"""Llama-family checkpoints (model_type llama, mistral, qwen2, qwen3): config.json both ways, tensor
names both ways, streaming shard by shard, generation_config.json, and parity with transformers."""

import json
import warnings

import pytest
import torch

import lmforge
from lmforge import GPT, GPTConfig, load_model
from lmforge.checkpoint import lmforge_to_hf, load_config, load_generation_defaults, stream_state
from lmforge.errors import CheckpointError, ConfigError
from lmforge.families import family_for

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32, "rope_theta": 500000.0}
# name -> (model_type, transformers config keywords on top of BASE): every variant the issue names.
VARIANTS = {
    "llama-gqa": ("llama", dict(num_key_value_heads=2)),
    "llama-mqa-tied": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama-mha-biases": ("llama", dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True, rms_norm_eps=1e-5)),
    "llama3-rope": ("llama", dict(num_key_value_heads=2, rope_parameters=LLAMA3)),
    "linear-rope": ("llama", dict(num_key_value_heads=2, rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                                           "rope_theta": 20000.0})),
    "mistral-window": ("mistral", dict(num_key_value_heads=2, sliding_window=5)),
    "mistral-full": ("mistral", dict(num_key_value_heads=2, sliding_window=None)),
    "qwen2-tied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen3-head-dim": ("qwen3", dict(num_key_value_heads=2, head_dim=32)),
    "qwen3-mqa-bias": ("qwen3", dict(num_key_value_heads=1, head_dim=16, attention_bias=True)),
}
RUNTIME_KEYS = ("transformers_version", "dtype", "torch_dtype", "use_cache")


def hf_config(name, **overrides):
    from transformers import AutoConfig

    model_type, kw = VARIANTS[name]
    return AutoConfig.for_model(model_type, **{**BASE, **kw, **overrides})


def hf_model(name, seed=0, **overrides):
    """A random transformers model of the variant in fp32 eval mode; norms and biases randomised too
    (transformers starts them at 1 and 0, which would hide a mix-up of q_norm and k_norm)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return randomise_norms_and_biases(AutoModelForCausalLM.from_config(hf_config(name, **overrides)).eval())


def randomise_norms_and_biases(model: torch.nn.Module) -> torch.nn.Module:
    """transformers starts norms at 1 and biases at 0, which would hide a mix-up of them."""
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
            elif key.endswith(".bias"):
                p.normal_(0.0, 0.2)
    return model


def saved(name, directory, seed=0, **save_options):
    hf = hf_model(name, seed)
    hf.save_pretrained(directory, **save_options)
    return hf


def padded_batch(vocab, T=16, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(1, B):
        mask[b, : 3 * b] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def comparable(hf_config):
    """A transformers config as a dict, without what says where and by which version it was read."""
    return {k: v for k, v in hf_config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}


def file_config(directory):
    d = json.loads((directory / "config.json").read_text())
    return {k: v for k, v in d.items() if k not in RUNTIME_KEYS}


# ---- config.json ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_config_json_written_by_transformers_round_trips_key_for_key(name, tmp_path):
    from transformers import AutoConfig

    hf_config(name).save_pretrained(tmp_path)
    original = file_config(tmp_path)
    config = GPTConfig.from_hf_dict(original)
    assert config.family == VARIANTS[name][0] and (config.norm, config.positions, config.mlp) == ("rmsnorm", "rope", "gated")
    written = config.to_hf_dict()
    assert written.pop("architectures") == [family_for(config.family).ARCHITECTURES["causal_lm"]]
    assert written == original
    (tmp_path / "config.json").write_text(json.dumps(written))
    assert comparable(AutoConfig.from_pretrained(tmp_path)) == comparable(hf_config(name))


def test_fields_of_each_variant():
    cfg = {name: GPTConfig.from_hf_dict(hf_config(name).to_dict()) for name in VARIANTS}
    assert cfg["llama-gqa"].n_kv_head == 2 and cfg["llama-gqa"].head_size is None
    assert cfg["llama-mqa-tied"].n_kv_head == 1 and cfg["llama-mqa-tied"].tie_word_embeddings
    mha = cfg["llama-mha-biases"]
    assert mha.n_kv_head is None and (mha.qkv_bias, mha.proj_bias, mha.mlp_bias) == (True, True, True)
    assert mha.layer_norm_epsilon == 1e-5
    assert cfg["llama3-rope"].rope_theta == 500000.0
    assert cfg["llama3-rope"].rope_scaling == {k: v for k, v in LLAMA3.items() if k != "rope_theta"}
    assert cfg["linear-rope"].rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert cfg["linear-rope"].rope_theta == 20000.0
    assert cfg["mistral-window"].sliding_window == 5 and cfg["mistral-full"].sliding_window is None
    qwen2 = cfg["qwen2-tied"]
    assert (qwen2.qkv_bias, qwen2.proj_bias, qwen2.mlp_bias, qwen2.qk_norm) == (True, None, None, False)
    assert qwen2.rope_theta == 1e6 and qwen2.rope_scaling is None and qwen2.sliding_window is None
    qwen3 = cfg["qwen3-head-dim"]
    assert qwen3.qk_norm and qwen3.head_size == 32 and qwen3.head_dim == 32 and qwen3.n_embd // qwen3.n_head == 16
    assert (qwen3.qkv_bias, qwen3.proj_bias) == (None, None)
    assert (cfg["qwen3-mqa-bias"].qkv_bias, cfg["qwen3-mqa-bias"].proj_bias) == (True, True)
    assert all(c.bias is False and c.activation == "silu" and c.embd_pdrop == c.resid_pdrop == 0.0 for c in cfg.values())


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_absent_keys_take_transformers_defaults_for_the_type(model_type):
    from transformers import AutoConfig

    theirs = AutoConfig.for_model(model_type)
    ours = GPTConfig.from_hf_dict({"model_type": model_type})
    assert (ours.vocab_size, ours.n_embd, ours.n_layer, ours.n_head, ours.n_inner, ours.n_positions) == (
        theirs.vocab_size, theirs.hidden_size, theirs.num_hidden_layers, theirs.num_attention_heads,
        theirs.intermediate_size, theirs.max_position_embeddings)
    assert (ours.n_kv_heads, ours.head_dim, ours.layer_norm_epsilon, ours.tie_word_embeddings) == (
        theirs.num_key_value_heads, getattr(theirs, "head_dim", theirs.hidden_size // theirs.num_attention_heads),
        theirs.rms_norm_eps, theirs.tie_word_embeddings)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id)
    assert ours.sliding_window == getattr(theirs, "sliding_window", None)
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]


LEGACY_ROPE = [  # (legacy keys, rope_theta, lmforge's rope_scaling)
    (dict(rope_theta=500000.0), 500000.0, None),
    (dict(rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 2.0}), 10000.0,
     {"rope_type": "linear", "factor": 2.0}),
    (dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
     500000.0, {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}),
    # original_max_position_embeddings defaults to max_position_embeddings, as transformers does
    (dict(rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
     10000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 128}),
]


@pytest.mark.parametrize("legacy,theta,scaling", LEGACY_ROPE)
def test_legacy_rope_keys_read_as_transformers_reads_them(legacy, theta, scaling, tmp_path):
    from transformers import AutoConfig

    d = {"model_type": "llama", **BASE, **legacy}
    config = GPTConfig.from_hf_dict(d)
    assert (config.rope_theta, config.rope_scaling) == (theta, scaling)
    written = config.to_hf_dict()
    assert not {"rope_theta", "rope_scaling"} & set(written)  # written as transformers v5 writes them
    (tmp_path / "config.json").write_text(json.dumps(written))
    theirs = AutoConfig.for_model(**d).rope_parameters
    again = AutoConfig.from_pretrained(tmp_path).rope_parameters
    assert again == {k: v for k, v in theirs.items() if k != "type"}


@pytest.mark.parametrize("rope", [
    dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
    dict(rope_scaling={"type": "dynamic", "factor": 2.0}),
    dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}),
], ids=["yarn", "dynamic", "longrope"])
def test_unsupported_rope_scaling_is_named_with_the_supported_ones(rope):
    kind = (rope.get("rope_parameters") or rope["rope_scaling"]).get("rope_type") or rope["rope_scaling"]["type"]
    with pytest.raises(ConfigError, match=rf"^x/config.json: rope scaling type '{kind}' is not supported; "
                                          rf"lmforge supports 'default', 'linear', 'llama3'$"):
        GPTConfig.from_hf_dict({"model_type": "llama", **BASE, **rope}, source="x/config.json")


def test_other_rope_settings_lmforge_cannot_run_are_refused():
    with pytest.raises(ConfigError, match="partial_rotary_factor=0.5"):
        GPTConfig.from_hf_dict({"model_type": "llama", **BASE, "partial_rotary_factor": 0.5})
    with pytest.raises(ConfigError, match="needs factor, low_freq_factor, high_freq_factor, original_max_position_embeddings; missing high_freq_factor"):
        GPTConfig.from_hf_dict({"model_type": "llama", **BASE,
                                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}})
    with pytest.raises(ConfigError, match="per-layer-type RoPE is not supported"):
        GPTConfig.from_hf_dict({"model_type": "qwen2", **BASE, "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1e4}}})


QWEN_WINDOWS = [  # (config.json keys, the window lmforge applies to every layer)
    (dict(use_sliding_window=False, sliding_window=32768, max_window_layers=21), None),  # Qwen2.5's files
    (dict(use_sliding_window=True, sliding_window=8, max_window_layers=0), 8),
    (dict(use_sliding_window=True, sliding_window=8, max_window_layers=2), None),  # no layer from 2 on: none slides
    (dict(use_sliding_window=True, sliding_window=8, layer_types=["sliding_attention"] * 2), 8),
]


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
@pytest.mark.parametrize("keys,window", QWEN_WINDOWS)
def test_qwen_sliding_window_as_transformers_decides_it(model_type, keys, window, tmp_path):
    from transformers import AutoConfig

    d = {"model_type": model_type, **BASE, "num_key_value_heads": 2, **keys}
    config = GPTConfig.from_hf_dict(d)
    assert config.sliding_window == window
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    theirs, again = AutoConfig.for_model(**d), AutoConfig.from_pretrained(tmp_path)
    assert again.layer_types == theirs.layer_types == ["sliding_attention" if window else "full_attention"] * 2
    assert again.sliding_window == window and (window is None or theirs.sliding_window == window)
    if not keys["use_sliding_window"]:  # kept as it was, as transformers keeps it
        assert again.max_window_layers == theirs.max_window_layers


@pytest.mark.parametrize("keys", [
    dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
    dict(use_sliding_window=True, sliding_window=8, layer_types=["full_attention", "sliding_attention"]),
])
def test_a_window_on_some_layers_only_is_refused(keys):
    with pytest.raises(ConfigError, match=r"x.json: sliding-window attention on some layers only .*not supported yet"):
        GPTConfig.from_hf_dict({"model_type": "qwen2", **BASE, "num_key_value_heads": 2, **keys}, source="x.json")


@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-0.5b", "qwen3-0.6b", "llama-3.2-1b", "tinyllama-1.1b",
                                  "llama-baby"])
def test_presets_round_trip_through_config_json_and_transformers_counts_the_same(name, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = lmforge.preset(name)
    assert GPTConfig.from_hf_dict(json.loads(json.dumps(config.to_hf_dict()))) == config
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    with torch.device("meta"):
        theirs = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path))
        assert GPT(config).num_parameters() == theirs.num_parameters()


def test_configs_a_family_cannot_describe_are_refused_not_mislabelled():
    llama = lmforge.preset("llama-baby")
    with pytest.raises(ConfigError, match=r"cannot write a 'gpt2' config.json.*norm='rmsnorm'.*positions='rope'.*"
                                          r"mlp='gated'.*n_kv_heads=2 \(GPT-2: 4\).*set GPTConfig.family"):
        llama.replace(family="gpt2", n_kv_head=2).to_hf_dict()
    gpt2 = lmforge.preset("tiny")
    for change, field in [(dict(qk_norm=True), "qk_norm"), (dict(sliding_window=8), "sliding_window"),
                          (dict(head_size=16), "head_dim"), (dict(qkv_bias=False), "qkv_bias")]:
        with pytest.raises(ConfigError, match=f"cannot write a 'gpt2' config.json.*{field}="):
            gpt2.replace(**change).to_hf_dict()
    with pytest.raises(ConfigError, match=r"'llama' config.json: transformers' LlamaForCausalLM has no norm='layernorm'"):
        gpt2.replace(family="llama").to_hf_dict()
    with pytest.raises(ConfigError, match="MistralForCausalLM has no q/k/v bias True"):
        llama.replace(family="mistral", qkv_bias=True).to_hf_dict()
    with pytest.raises(ConfigError, match="Qwen2ForCausalLM has no q/k/v bias False"):
        llama.replace(family="qwen2").to_hf_dict()
    with pytest.raises(ConfigError, match="LlamaForCausalLM has no q/k/v bias True but output projection bias False"):
        llama.replace(qkv_bias=True).to_hf_dict()
    with pytest.raises(ConfigError, match="LlamaForCausalLM has no sliding_window=8"):
        llama.replace(sliding_window=8).to_hf_dict()
    with pytest.raises(ConfigError, match="Qwen3ForCausalLM has no qk_norm=False"):
        llama.replace(family="qwen3").to_hf_dict()


def test_each_model_type_names_its_transformers_classes_and_lora_targets():
    from lmforge.tasks.lora import apply_lora

    for model_type, prefix in [("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"), ("qwen3", "Qwen3")]:
        assert family_for(model_type).ARCHITECTURES == {"causal_lm": f"{prefix}ForCausalLM",
                                                        "sequence_classification": f"{prefix}ForSequenceClassification"}
    lora = apply_lora(GPT(lmforge.preset("llama-baby", vocab_size=65)), rank=2,
                      targets=["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    wrapped = {n.split(".", 3)[3] for n, m in lora.model.named_modules() if type(m).__name__ == "LoRALinear"}
    assert wrapped == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}


# ---- tensors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_tensor_names_round_trip_bit_exact(name):
    hf = hf_model(name)
    family, config = family_for(VARIANTS[name][0]), GPTConfig.from_hf_dict(hf.config.to_dict())
    state = {k: v for k, v in hf.state_dict().items() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    ours = family.state_from_hf(state, config)
    assert all(family.name_from_hf(k, config) in ours for k in state)
    with torch.device("meta"):
        model = GPT(config)
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()
                if not (config.tie_word_embeddings and k == "lm_head.weight")}
    assert {k: tuple(t.shape) for k, t in ours.items()} == expected
    back = family.state_to_hf(ours, config)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_old_rotary_buffers_wrapper_prefixes_and_a_bare_model_load(tmp_path):
    from safetensors.torch import save_file

    hf = saved("llama-mqa-tied", tmp_path)
    state = {k.removeprefix("model."): v.clone() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    state = {"module." + k: v for k, v in state.items()}
    state["module.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    state["module.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(state, str(tmp_path / "model.safetensors"))
    ours = load_model(tmp_path, device="cpu")
    hf_state = lmforge_to_hf(ours)
    assert all(torch.equal(hf_state[k], t) for k, t in hf.state_dict().items() if k != "lm_head.weight")


def test_q_k_v_of_a_layer_in_different_shards_are_fused_and_loading_streams(tmp_path):
    hf = saved("qwen2-tied", tmp_path, seed=4, max_shard_size="10KB")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    layer = "model.layers.1.self_attn."
    assert len({weight_map[layer + p + ".weight"] for p in ("q_proj", "k_proj", "v_proj")}) > 1
    config = load_config(tmp_path)
    source, chunks = stream_state(tmp_path, config)
    chunks = list(chunks)
    assert source.name == "model.safetensors.index.json"
    assert max(len(c) for c in chunks) == 1  # one lmforge tensor at a time, not the whole state
    with torch.device("meta"):
        assert {k for c in chunks for k in c} == set(GPT(config).state_dict()) - {"lm_head.weight"}
    ours = load_model(tmp_path, device="cpu")
    hf_state = lmforge_to_hf(ours)
    assert all(torch.equal(hf_state[k], t) for k, t in hf.state_dict().items() if k != "lm_head.weight")


def test_bad_tensors_are_named_with_expected_and_found_shapes(tmp_path):
    from safetensors.torch import load_file, save_file

    saved("llama-gqa", tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**d, "num_key_value_heads": 1}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.0.self_attn.k_proj.weight' has "
                                              r"shape \(32, 64\), but the config implies \(16, 64\)"):
        load_model(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text(json.dumps(d))
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.1.self_attn.v_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['model.layers.1.self_attn.v_proj.weight'\]"):
        load_model(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({**d, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}}))
    with pytest.raises(CheckpointError, match="rope scaling type 'yarn' is not supported"):
        load_model(tmp_path, device="cpu")


# ---- generation_config.json ----------------------------------------------------------------------


def test_generation_config_json_is_read_and_written_back(tmp_path):
    from transformers import GenerationConfig

    hf = hf_model("llama-gqa")
    hf.generation_config.update(eos_token_id=[2, 5], do_sample=True, temperature=0.6, top_p=0.9)
    hf.save_pretrained(tmp_path / "a")
    ours = load_model(tmp_path / "a", device="cpu")
    assert ours.generation_defaults == {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "bos_token_id": 1,
                                        "eos_token_id": [2, 5]}
    ours.save_pretrained(tmp_path / "b")
    again = GenerationConfig.from_pretrained(tmp_path / "b")
    assert (again.eos_token_id, again.do_sample, again.temperature, again.top_p) == ([2, 5], True, 0.6, 0.9)
    assert load_generation_defaults(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="generation_config.json: not valid JSON"):
        load_generation_defaults(tmp_path)


# ---- parity with transformers (the model itself) -------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_and_loss_match_transformers(name, tmp_path):
    hf = saved(name, tmp_path, seed=1)
    ours = load_model(tmp_path, device="cpu")
    ids, mask, pos = padded_batch(BASE["vocab_size"])
    keep = mask.bool()
    with torch.no_grad():
        diff = (ours(ids).logits - hf(ids).logits).abs().max().item()
        padded = (ours(ids, attention_mask=mask, position_ids=pos).logits
                  - hf(ids, attention_mask=mask).logits)[keep].abs().max().item()
        labels = ids.masked_fill(~keep, -100)
        hf_loss = hf(ids, labels=labels).loss
        our_loss = ours(ids[:, :-1], labels[:, 1:]).loss
    assert diff <= 1e-4 and padded <= 1e-4, (diff, padded)
    torch.testing.assert_close(our_loss, hf_loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_save_pretrained_writes_what_transformers_loads_bit_exact(name, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    hf = saved(name, tmp_path / "a", seed=2)
    ours = load_model(tmp_path / "a", device="cpu")
    ours.save_pretrained(tmp_path / "b")
    assert load_file(str(tmp_path / "b" / "model.safetensors")).keys() == load_file(
        str(tmp_path / "a" / "model.safetensors")).keys()
    assert file_config(tmp_path / "b") == file_config(tmp_path / "a")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "b").eval()
    a, b = hf.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = padded_batch(BASE["vocab_size"])[0]
    with torch.no_grad():
        assert (again(ids).logits - ours(ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("family,extra", [("llama", {}), ("mistral", dict(sliding_window=6)),
                                          ("qwen2", dict(qkv_bias=True)), ("qwen3", dict(qk_norm=True, head_size=24))])
def test_lmforge_to_transformers_to_lmforge_is_exact(family, extra, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    config = lmforge.preset("llama-baby", family=family, vocab_size=70, n_layer=2, n_kv_head=2, n_positions=64,
                            tie_word_embeddings=family != "llama", **extra)
    ours = GPT(config)
    ours.save_pretrained(tmp_path / "a")
    AutoModelForCausalLM.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")
    again = load_model(tmp_path / "b", device="cpu")
    assert again.config == ours.config
    a, b = ours.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["llama-gqa", "llama3-rope", "mistral-window", "qwen2-tied", "qwen3-head-dim"])
def test_greedy_generate_matches_transformers_on_a_left_padded_batch(name, tmp_path):
    hf = saved(name, tmp_path, seed=3)
    ours = load_model(tmp_path, device="cpu")
    ids, mask, _ = padded_batch(BASE["vocab_size"], T=8)
    ids = ids.masked_fill(mask == 0, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, mask, max_new_tokens=10, pad_token_id=0), theirs)
