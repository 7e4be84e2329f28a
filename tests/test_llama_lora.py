"""LoRA on Llama-family models by Hugging Face's module names: q/k/v_proj and gate/up_proj adapt only
their rows of lmforge's fused attn.c_attn / mlp.c_fc; merged weights and `lmforge merge-lora` give
transformers a checkpoint with the adapted model's logits."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge import load_model
from lmforge.errors import ConfigError
from lmforge.tasks.lora import ADAPTER_CONFIG, LoRALinear, apply_lora, load_lora, merge_lora

VOCAB, C, H, KV, D, INNER = 97, 64, 4, 2, 16, 96
# Output rows of each Hugging Face projection inside lmforge's fused modules (H*D = 64, KV*D = 32).
ROWS = {"q_proj": ("attn.c_attn", 0, 64), "k_proj": ("attn.c_attn", 64, 96), "v_proj": ("attn.c_attn", 96, 128),
        "gate_proj": ("mlp.c_fc", 0, 96), "up_proj": ("mlp.c_fc", 96, 192)}
# lmforge module -> Hugging Face module, per layer, for the whole-layer targets.
WHOLE = {"attn.c_proj": "self_attn.o_proj", "mlp.c_proj": "mlp.down_proj"}
PART_MODULE = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
               "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj"}
ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_model(model_type, seed=0, **overrides):
    """A random transformers model (fp32, eval): grouped-query attention; Qwen2 has q/k/v biases."""
    from transformers import AutoConfig, AutoModelForCausalLM

    keys = dict(vocab_size=VOCAB, hidden_size=C, intermediate_size=INNER, num_hidden_layers=2, num_attention_heads=H,
                num_key_value_heads=KV, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**keys, **overrides})).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith(".bias"):
                p.normal_(0.0, 0.2)
    return model


@pytest.fixture(params=["llama", "qwen2"])
def base(request, tmp_path):
    """(transformers model, its directory) for a tiny Llama and a tiny Qwen2."""
    hf = hf_model(request.param)
    hf.save_pretrained(tmp_path / "base")
    return hf, tmp_path / "base"


def randomise(lora, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def ids(seed=0, shape=(2, 12)):
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def hf_with_deltas(hf, lora):
    """The transformers model with W + scale B A added to each adapted Hugging Face projection,
    computed from the adapters alone (the oracle for what an adapter on q_proj, ... means)."""
    import copy

    out = copy.deepcopy(hf)
    weights = dict(out.named_parameters())
    with torch.no_grad():
        for name, m in lora.model.named_modules():
            if not isinstance(m, LoRALinear):
                continue
            layer, module = name.removeprefix("transformer.h.").split(".", 1)
            for part, (start, stop) in m.parts.items():
                a, b = (getattr(m, f"{matrix}_{part}" if part else matrix) for matrix in ("lora_A", "lora_B"))
                assert b.shape[0] == stop - start
                hf_module = PART_MODULE[part] if part else WHOLE[module]
                weights[f"model.layers.{layer}.{hf_module}.weight"] += m.scale * (b @ a)
    return out


@pytest.mark.parametrize("target", list(ROWS))
def test_an_adapter_on_one_part_changes_only_its_rows(target, base):
    _, directory = base
    model = load_model(directory, device="cpu")
    lora = apply_lora(model, rank=2, alpha=4, targets=[target])
    randomise(lora)
    suffix, start, stop = ROWS[target]
    wrapped = {n: m for n, m in lora.model.named_modules() if isinstance(m, LoRALinear)}
    assert list(wrapped) == [f"transformer.h.{i}.{suffix}" for i in range(2)]
    assert lora.lora_settings["parts"] == {n: {target: [start, stop]} for n in wrapped}
    trainable = {n: tuple(p.shape) for n, p in lora.model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{m}_{target}": shape for n in wrapped
                         for m, shape in (("A", (2, C)), ("B", (stop - start, 2)))}
    x = torch.randn(3, C)
    with torch.no_grad():
        for layer in wrapped.values():
            adapted, plain = layer(x), layer.base(x)
            others = torch.cat([plain[:, :start], plain[:, stop:]], dim=1)
            assert torch.equal(torch.cat([adapted[:, :start], adapted[:, stop:]], dim=1), others)
            assert (adapted[:, start:stop] - plain[:, start:stop]).abs().min() > 0
    merged = merge_lora(lora).state_dict()
    for n, layer in wrapped.items():
        w, w0 = merged[f"{n}.weight"], layer.base.weight
        assert torch.equal(w[:start], w0[:start]) and torch.equal(w[stop:], w0[stop:])
        assert not torch.equal(w[start:stop], w0[start:stop])


def test_q_and_v_share_one_wrapped_layer_and_equal_transformers_with_the_deltas(base):
    hf, directory = base
    lora = apply_lora(load_model(directory, device="cpu"))  # the Llama default: q_proj v_proj
    assert lora.lora_settings["targets"] == ["q_proj", "v_proj"]
    wrapped = [m for m in lora.model.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 2 and all(m.parts == {"q_proj": (0, 64), "v_proj": (96, 128)} for m in wrapped)
    randomise(lora)
    x = ids()
    with torch.no_grad():
        adapted = lora(x).logits
        expected = hf_with_deltas(hf, lora)(x).logits
        merged = merge_lora(lora)(x).logits
    assert (adapted - expected).abs().max() <= 1e-4
    assert (merged - adapted).abs().max() <= 1e-5


def test_all_seven_names_train_merge_save_and_reload(base, tmp_path):
    from transformers import AutoModelForCausalLM

    from lmforge.cli import main

    hf, directory = base
    lora = apply_lora(load_model(directory, device="cpu"), rank=4, alpha=8, targets=ALL_SEVEN,
                      base_model=str(directory))
    wrapped = {n.split(".", 3)[3]: m for n, m in lora.model.named_modules() if isinstance(m, LoRALinear)}
    assert set(wrapped) == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    assert set(wrapped["attn.c_attn"].parts) == {"q_proj", "k_proj", "v_proj"}
    assert set(wrapped["mlp.c_fc"].parts) == {"gate_proj", "up_proj"} and wrapped["mlp.c_proj"].parts == {"": (0, C)}
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    x = ids(1, (4, 16))
    for _ in range(3):  # A and B both move
        loss = lora(x[:, :-1], x[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    lora.eval()
    y = ids(2)
    with torch.no_grad():
        adapted = lora(y).logits
        assert (hf_with_deltas(hf, lora)(y).logits - adapted).abs().max() <= 1e-4
        assert (merge_lora(lora)(y).logits - adapted).abs().max() <= 1e-5
    lora.save_pretrained(tmp_path / "tuned")
    settings = json.loads((tmp_path / "tuned" / ADAPTER_CONFIG).read_text())
    assert settings["parts"]["transformer.h.1.attn.c_attn"] == {"q_proj": [0, 64], "k_proj": [64, 96], "v_proj": [96, 128]}
    rebuilt = load_lora(load_model(directory, device="cpu"), tmp_path / "tuned")
    assert main(["merge-lora", "--adapter", str(tmp_path / "tuned"), "--out", str(tmp_path / "merged")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(y).logits, adapted)
        assert (exported(y).logits - adapted).abs().max() <= 1e-4
    # the export changed the adapted projections' tensors and nothing else
    before, after = hf.state_dict(), exported.state_dict()
    for key in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        assert not torch.equal(before[key], after[key])
    assert all(torch.equal(before[k], after[k]) for k in before if "norm" in k or "embed" in k or k.endswith(".bias"))


def test_whole_layer_adapters_keep_the_old_format_and_load(tmp_path):
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path / "base")
    lora = apply_lora(load_model(tmp_path / "base", device="cpu"), rank=2, targets=["c_attn", "mlp.c_proj"])
    randomise(lora)
    lora.save_adapter(tmp_path / "adapter")
    settings = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert "parts" not in settings and settings["modules"][0] == "transformer.h.0.attn.c_attn"
    rebuilt = load_lora(load_model(tmp_path / "base", device="cpu"), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids()).logits, lora(ids()).logits)


def test_bad_targets_and_ranks_name_what_there_is(tmp_path):
    hf_model("llama").save_pretrained(tmp_path / "base")
    model = load_model(tmp_path / "base", device="cpu")
    with pytest.raises(ConfigError, match=r"\['query'\] match no linear module.*attn\.c_attn.*one of q_proj, k_proj, "
                                          r"v_proj, o_proj, gate_proj, up_proj, down_proj"):
        apply_lora(model, targets=["q_proj", "query"])
    with pytest.raises(ConfigError, match="'c_attn' and 'q_proj' both adapt transformer.h.0.attn.c_attn"):
        apply_lora(model, targets=["c_attn", "q_proj"])
    with pytest.raises(ConfigError, match=r"rank 33 exceeds .* transformer.h.0.attn.c_attn \(k_proj\) \(64 -> 32, width 32\)"):
        apply_lora(model, rank=33, targets=["q_proj", "k_proj"])
    assert all(p.requires_grad for p in model.parameters())  # failed calls left the model as it was
    apply_lora(model, rank=32, targets=["q_proj", "k_proj"])


def test_finetune_sft_with_q_and_v_then_merge_lora_loads_in_transformers(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from lmforge.cli import main
    from lmforge.tokenizer import Tokenizer

    hf_model("llama", vocab_size=257, bos_token_id=256, eos_token_id=256).save_pretrained(tmp_path / "base")
    Tokenizer.byte_level().save_pretrained(tmp_path / "base")
    rows = [{"source": f"n {i}", "target": f"N {i}"} for i in range(16)]
    train = tmp_path / "mt.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(["finetune", "sft", "--model", str(tmp_path / "base"), "--task", "translation", "--train", str(train),
                 "--lora-rank", "4", "--lora-targets", "q_proj", "v_proj", "--out", str(out), "--max-steps", "4",
                 "--eval-batches", "0", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "1", "--no-progress",
                 "--device", "cpu", "--no-plot"]) == 0
    # q: 4 * (64 + 64), v: 4 * (64 + 32), per layer
    assert "trainable parameters: 1,792 of" in capsys.readouterr().err
    assert main(["merge-lora", "--adapter", str(out / "model"), "--out", str(tmp_path / "merged")]) == 0
    tuned = load_model(out / "model", device="cpu")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    x = torch.randint(0, 257, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (exported(x).logits - tuned(x).logits).abs().max() <= 1e-4
        assert not torch.allclose(load_model(tmp_path / "base", device="cpu")(x).logits, tuned(x).logits, atol=1e-4)
