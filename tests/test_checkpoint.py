"""Hugging Face checkpoint interop: parity with transformers, round trips, layouts, bad input."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import lmforge
from lmforge import GPT, GPTConfig, load_model
from lmforge.checkpoint import checkpoint_info, save_pretrained
from lmforge.errors import CheckpointError, LmforgeError

from conftest import hf_gpt2

# Varied shapes: layers, heads, width, context, vocab, epsilon, layer-idx scaling, activation, tying.
PARITY_CONFIGS = {
    "base": dict(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4),
    "deep-scaled": dict(vocab_size=257, n_positions=32, n_embd=48, n_layer=4, n_head=6,
                        layer_norm_epsilon=1e-6, scale_attn_by_inverse_layer_idx=True),
    "wide-inner": dict(vocab_size=50, n_positions=128, n_embd=64, n_layer=1, n_head=2, n_inner=100,
                       scale_attn_by_inverse_layer_idx=True),
    "relu-eps": dict(vocab_size=300, n_positions=40, n_embd=24, n_layer=3, n_head=3,
                     layer_norm_epsilon=1e-3, activation_function="relu"),
    "untied-1head": dict(vocab_size=97, n_positions=20, n_embd=16, n_layer=2, n_head=1,
                         tie_word_embeddings=False),
    "erf-gelu-8head": dict(vocab_size=128, n_positions=48, n_embd=64, n_layer=2, n_head=8,
                           activation_function="gelu"),
}


def batch_with_padding(vocab, T, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(1, B):
        mask[b, : 3 * b] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_logits_and_loss_match_transformers(name, tmp_path):
    cfg = dict(PARITY_CONFIGS[name], bos_token_id=0, eos_token_id=0)
    hf = hf_gpt2(seed=1, **cfg)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path, device="cpu")
    T = min(cfg["n_positions"], 16)
    ids, mask, pos = batch_with_padding(cfg["vocab_size"], T)
    keep = mask.bool()
    with torch.no_grad():
        diff = (ours(ids).logits - hf(ids).logits).abs().max().item()
        padded = (ours(ids, attention_mask=mask, position_ids=pos).logits
                  - hf(ids, attention_mask=mask, position_ids=pos).logits)[keep].abs().max().item()
        labels = ids.masked_fill(~keep, -100)
        hf_loss = hf(ids, labels=labels).loss
        our_loss = ours(ids[:, :-1], labels[:, 1:]).loss
    print(f"parity {name}: max|dlogits| {diff:.3g}, padded {padded:.3g}, "
          f"loss {our_loss.item():.6f} vs {hf_loss.item():.6f}")
    assert diff <= 1e-5 and padded <= 1e-5
    torch.testing.assert_close(our_loss, hf_loss, rtol=1e-6, atol=1e-6)


def _hf_state(model):
    return {k: v for k, v in model.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}


def test_round_trip_hf_to_lmforge_to_hf_is_exact(tmp_path):
    from transformers import GPT2LMHeadModel

    hf = hf_gpt2(seed=2, **PARITY_CONFIGS["deep-scaled"])
    hf.save_pretrained(tmp_path / "a")
    load_model(tmp_path / "a", device="cpu").save_pretrained(tmp_path / "b")
    back = GPT2LMHeadModel.from_pretrained(tmp_path / "b")
    original, reloaded = _hf_state(hf), _hf_state(back)
    assert original.keys() == reloaded.keys()
    for key in original:
        assert torch.equal(original[key], reloaded[key]), key
    assert back.config.n_layer == 4 and back.config.scale_attn_by_inverse_layer_idx


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_lmforge_to_hf_to_lmforge_is_exact(tmp_path, tied):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(3)
    ours = GPT(GPTConfig(vocab_size=70, n_positions=24, n_embd=32, n_layer=2, n_head=2,
                         tie_word_embeddings=tied, activation="gelu_new"))
    ours.save_pretrained(tmp_path / "a")
    GPT2LMHeadModel.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")
    again = load_model(tmp_path / "b", device="cpu")
    assert ours.config == again.config
    a, b = ours.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (again.lm_head.weight is again.transformer.wte.weight) == tied


def test_bias_free_model_saves_zero_biases_that_transformers_loads_to_the_same_logits(tmp_path):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(4)
    ours = GPT(GPTConfig(vocab_size=65, n_positions=32, n_embd=32, n_layer=2, n_head=4, bias=False,
                         activation="gelu", bos_token_id=0, eos_token_id=0)).eval()
    ours.save_pretrained(tmp_path / "a")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "a")
    assert hf.transformer.h[0].attn.c_attn.bias.abs().sum() == 0 and hf.transformer.ln_f.bias.abs().sum() == 0
    ids = torch.randint(0, 65, (2, 20))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max() <= 1e-5
    hf.save_pretrained(tmp_path / "b")  # transformers keeps the "bias": false key
    again = load_model(tmp_path / "b", device="cpu")
    assert again.config.bias is False and again.transformer.h[0].attn.c_attn.bias is None
    for key, value in ours.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key

    with torch.no_grad():
        hf.transformer.h[1].mlp.c_fc.bias[3] = 0.5  # a tool that trained the biases
    hf.save_pretrained(tmp_path / "c")
    with pytest.raises(CheckpointError, match=r"h\.1\.mlp\.c_fc\.bias.*not zero.*remove"):
        load_model(tmp_path / "c", device="cpu")


def test_saved_files_have_no_wrapper_prefixes_or_legacy_buffers(tmp_path):
    from safetensors import safe_open

    model = GPT(lmforge.preset("tiny", vocab_size=50))
    compiled_like = torch.nn.Module()
    compiled_like._orig_mod = model  # what torch.compile wraps
    save_pretrained(compiled_like, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert all(k.startswith("transformer.") for k in keys) and "lm_head.weight" not in keys
    assert meta == {"format": "pt"}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]


def test_loads_pickle_bin_with_legacy_buffers_prefixes_and_bare_gpt2model(tmp_path):
    hf = hf_gpt2(seed=4)
    hf.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    state = {}
    for key, t in hf.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied: older checkpoints omit it
        key = key.removeprefix("transformer.")  # as GPT2Model saves
        state["module." + key] = t.clone()
        if key.endswith("attn.c_proj.weight"):
            layer = key.split(".attn.")[0]
            state[f"module.{layer}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
            state[f"module.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    ours = load_model(tmp_path, device="cpu")
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("writer", ["transformers", "lmforge"])
def test_sharded_checkpoints_load_both_ways(tmp_path, writer):
    from transformers import GPT2LMHeadModel

    hf = hf_gpt2(seed=5)
    if writer == "transformers":
        hf.save_pretrained(tmp_path, max_shard_size="20KB")
    else:
        hf.save_pretrained(tmp_path / "single")
        load_model(tmp_path / "single", device="cpu").save_pretrained(tmp_path, max_shard_size="20KB")
        assert GPT2LMHeadModel.from_pretrained(tmp_path).num_parameters() == hf.num_parameters()
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    ours = load_model(tmp_path, device="cpu")
    ids = torch.randint(0, 101, (2, 7))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max() <= 1e-5


def test_resaving_in_another_layout_removes_stale_weights(tmp_path):
    model = GPT(lmforge.preset("tiny", vocab_size=64))
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loading(tiny_hf_dir, dtype):
    fp32 = load_model(tiny_hf_dir, device="cpu")
    half = load_model(tiny_hf_dir, dtype=str(dtype).removeprefix("torch."), device="cpu")
    assert all(p.dtype == dtype for p in half.parameters())
    assert half.lm_head.weight is half.transformer.wte.weight
    ids = torch.randint(0, 101, (2, 8))
    with torch.no_grad():
        a, b = fp32(ids).logits, half(ids).logits.float()
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    # A bf16 save keeps bf16 on disk.
    half.save_pretrained(tiny_hf_dir.parent / "half")
    assert checkpoint_info(tiny_hf_dir.parent / "half").dtypes == [str(dtype).removeprefix("torch.")]


# ---- bad input -------------------------------------------------------------------------------


def test_missing_config_json(tiny_hf_dir):
    (tiny_hf_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load_model(tiny_hf_dir, device="cpu")


def test_truncated_safetensors_names_the_file(tiny_hf_dir):
    path = tiny_hf_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read safetensors.*truncated or corrupt"):
        load_model(tiny_hf_dir, device="cpu")


def test_unsupported_model_type_is_named(tiny_hf_dir):
    cfg = json.loads((tiny_hf_dir / "config.json").read_text())
    cfg["model_type"] = "bert"
    (tiny_hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'bert' is not supported yet"):
        load_model(tiny_hf_dir, device="cpu")


def test_shape_mismatch_names_the_key(tiny_hf_dir):
    cfg = json.loads((tiny_hf_dir / "config.json").read_text())
    cfg["n_positions"] = 65
    (tiny_hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'transformer.wpe.weight' has shape \\(64, 32\\).*\\(65, 32\\)"):
        load_model(tiny_hf_dir, device="cpu")


def test_missing_tensors_and_malformed_json(tiny_hf_dir):
    cfg = json.loads((tiny_hf_dir / "config.json").read_text())
    (tiny_hf_dir / "config.json").write_text(json.dumps({**cfg, "n_layer": 3}))
    with pytest.raises(CheckpointError, match="missing tensors.*transformer.h.2"):
        load_model(tiny_hf_dir, device="cpu")
    (tiny_hf_dir / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_model(tiny_hf_dir, device="cpu")


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(lmforge.preset("tiny").to_hf_dict()))
    with pytest.raises(CheckpointError, match="no weights found; expected one of model.safetensors"):
        load_model(tmp_path, device="cpu")


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        load_model(str(tmp_path / "nope" / "model"), device="cpu")


# ---- the Hugging Face Hub (offline: through the cache) ---------------------------------------


def test_offline_uncached_hub_name_fails_fast_with_advice(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache.*HF_HUB_OFFLINE=1"):
        load_model("openai-community/gpt2", device="cpu")
    assert time.perf_counter() - start < 10


def test_hub_name_resolves_from_the_cache(monkeypatch, tmp_path, tiny_hf_dir):
    import huggingface_hub.constants as hub_constants

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--lmforge-test--tiny-gpt2"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in tiny_hf_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    model = load_model("lmforge-test/tiny-gpt2", device="cpu")
    assert model.config.vocab_size == 101
    assert checkpoint_info("lmforge-test/tiny-gpt2").num_parameters == model.num_parameters()


# ---- atomic writes ---------------------------------------------------------------------------


def test_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    model = GPT(lmforge.preset("tiny", vocab_size=64))
    model.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="No space left"):
        GPT(lmforge.preset("tiny", vocab_size=64)).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    load_model(tmp_path, device="cpu")


def test_killed_save_never_leaves_a_half_written_checkpoint(tmp_path):
    target = tmp_path / "ckpt"
    script = textwrap.dedent(f"""
        import sys, torch, lmforge
        model = lmforge.GPT(lmforge.preset("mini", vocab_size=8000))
        model.save_pretrained({str(target)!r})
        print("first save done", flush=True)
        while True:
            model.save_pretrained({str(target)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "first save done"
        time.sleep(0.7)  # in the middle of one of the repeated saves
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    model = load_model(target, device="cpu")  # complete old or complete new: loads either way
    assert model.config.vocab_size == 8000
    leftovers = [p.name for p in target.iterdir() if p.name not in ("config.json", "model.safetensors")]
    # Only hidden temp files may be left over (ours: .NAME.XXXX.tmp; safetensors' own: .tmpXXXX).
    assert all(name.startswith((".model.safetensors.", ".config.json.", ".tmp")) for name in leftovers), leftovers


def test_errors_are_typed():
    assert issubclass(CheckpointError, LmforgeError)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
