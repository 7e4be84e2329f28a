"""The Transformer itself: attention kernels, masks, KV cache, loss, init."""

import math

import pytest
import torch

from lmforge import GPT, GPTConfig, KVCache, attention_reference, lm_loss, preset
from lmforge.errors import ConfigError
from lmforge.model import PackedKVCache, RaggedRows


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=61, n_positions=48, n_embd=32, n_layer=2, n_head=4,
               embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def left_padded_batch(B=3, T=12, vocab=61, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(1, B):
        mask[b, : 2 * b + 1] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("is_causal", [True, False])
def test_sdpa_equals_the_reference_equation(is_causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, dtype=torch.float64) for _ in range(3))
    ref = attention_reference(q, k, v, is_causal=is_causal)
    fused = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-10)
    # And by hand for one head and query: softmax(q k^T / sqrt(d)) v.
    w = torch.softmax(q[0, 0, -1] @ k[0, 0].T / math.sqrt(8), dim=-1)
    torch.testing.assert_close(ref[0, 0, -1], w @ v[0, 0])


def test_model_with_reference_attention_equals_sdpa_model():
    model = tiny(scale_attn_by_inverse_layer_idx=True)
    ids, mask, pos = left_padded_batch()
    with torch.no_grad():
        fast = model(ids, attention_mask=mask, position_ids=pos).logits
        plain = model(ids).logits
        model.set_attention("reference")
        ref = model(ids, attention_mask=mask, position_ids=pos).logits
        ref_plain = model(ids).logits
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, ref_plain, rtol=1e-5, atol=1e-5)


def test_causality_future_tokens_do_not_change_the_past():
    model = tiny()
    ids = torch.randint(0, 61, (2, 10))
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 61
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_left_padding_with_positions_equals_unpadded_rows():
    model = tiny()
    ids, mask, pos = left_padded_batch()
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=pos).logits
        for b in range(ids.size(0)):
            n = int(mask[b].sum())
            alone = model(ids[b:b + 1, -n:]).logits
            torch.testing.assert_close(batch[b:b + 1, -n:], alone, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(batch).all()  # padded rows stay finite too


@pytest.mark.parametrize("padded", [False, True])
def test_kv_cache_prefill_then_steps_equals_full_forward(padded):
    model = tiny()
    ids, mask, pos = left_padded_batch(T=14)
    if not padded:
        mask, pos = torch.ones_like(mask), None
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos).logits
        cache = KVCache.for_model(model, batch_size=ids.size(0), max_length=20)
        p = 8  # prefill 8 tokens, then a chunk of 3, then 3 single steps
        steps = [(0, p), (p, p + 3), (p + 3, p + 4), (p + 4, p + 5), (p + 5, 14)]
        pieces = []
        for s, e in steps:
            out = model(ids[:, s:e], attention_mask=mask[:, :e],
                        position_ids=None if pos is None else pos[:, s:e], kv_cache=cache)
            pieces.append(out.logits)
            assert cache.length == e and out.kv_cache is cache
    keep = mask.bool()
    torch.testing.assert_close(torch.cat(pieces, 1)[keep], full[keep], rtol=1e-5, atol=1e-5)


def test_kv_cache_is_preallocated_and_written_in_place():
    model = tiny()
    cache = KVCache.for_model(model, batch_size=2, max_length=10)
    k_ptr = cache.k.data_ptr()
    assert cache.k.shape == (2, 2, 4, 10, 8)
    with torch.no_grad():
        model(torch.randint(0, 61, (2, 4)), kv_cache=cache)
        model(torch.randint(0, 61, (2, 1)), kv_cache=cache)
    assert cache.k.data_ptr() == k_ptr and cache.length == 5
    assert cache.k[:, :, :, 5:].abs().sum() == 0 and cache.k[:, :, :, :5].abs().sum() > 0
    with pytest.raises(ValueError, match="KV cache is full"), torch.no_grad():
        model(torch.randint(0, 61, (2, 6)), kv_cache=cache)
    with pytest.raises(ValueError, match="max_length must be in 1..48"):
        KVCache.for_model(model, 1, 100)


def test_kv_cache_reorder_selects_rows():
    model = tiny()
    cache = KVCache.for_model(model, batch_size=3, max_length=5)
    with torch.no_grad():
        model(torch.randint(0, 61, (3, 2)), kv_cache=cache)
    before = cache.k.clone()
    cache.reorder(torch.tensor([2, 2, 0]))
    torch.testing.assert_close(cache.k[:, 0], before[:, 2])
    torch.testing.assert_close(cache.k[:, 2], before[:, 0])


def test_forward_returns_full_logits_and_the_mean_cross_entropy():
    model = tiny()
    x = torch.randint(0, 61, (2, 9))
    y = torch.randint(0, 61, (2, 9))
    y[0, :3] = -100
    out = model(x, y)
    assert out.logits.shape == (2, 9, 61)
    logp = torch.log_softmax(out.logits.double(), -1)
    keep = y != -100
    expected = -logp[keep].gather(-1, y[keep].unsqueeze(-1)).mean()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-6, atol=1e-6)
    assert model(x).loss is None
    torch.testing.assert_close(lm_loss(out.logits, y), out.loss)


def test_bad_shapes_raise_clear_errors():
    model = tiny()
    with pytest.raises(ValueError, match="input_ids must be \\(batch, seq_len\\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds the model's context n_positions=48"):
        model(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))


def test_weight_init_follows_gpt2():
    torch.manual_seed(0)
    model = GPT(preset("tiny", n_layer=8, n_embd=256, n_head=4))
    std = lambda t: t.float().std().item()  # noqa: E731
    assert abs(std(model.transformer.wte.weight) - 0.02) < 0.001
    assert abs(std(model.transformer.h[0].attn.c_attn.weight) - 0.02) < 0.001
    assert abs(std(model.transformer.h[0].mlp.c_proj.weight) - 0.02 / math.sqrt(16)) < 0.0005
    assert model.transformer.h[0].attn.c_attn.bias.abs().sum() == 0
    assert model.lm_head.weight is model.transformer.wte.weight  # tied


def test_untied_head_and_erf_activation_are_supported():
    model = tiny(tie_word_embeddings=False, activation="gelu")
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert isinstance(model.transformer.h[0].mlp.act, torch.nn.GELU)
    assert model.transformer.h[0].mlp.act.approximate == "none"


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randint(0, 61, (2, 10))
    grads = []
    for ckpt in (False, True):
        model = tiny().train()
        model.gradient_checkpointing = ckpt
        model(x, x).loss.backward()
        grads.append(model.transformer.h[0].attn.c_attn.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("tied", [True, False])
def test_optimize_for_decoding_lays_weights_out_for_the_kernels_and_changes_nothing_else(tied, kernels, tmp_path,
                                                                                       monkeypatch):
    # With lmforge.kernels: row-major (what they stream); without: MKL's faster fp32 column-major.
    monkeypatch.setattr("lmforge.model.kernels_available", lambda: kernels)
    model, plain = tiny(tie_word_embeddings=tied), tiny(tie_word_embeddings=tied)
    model.transformer.h[0].mlp.c_fc.weight.data = model.transformer.h[0].mlp.c_fc.weight.data.t().contiguous().t()
    ids, mask, positions = left_padded_batch()
    storage = {p.untyped_storage().nbytes() for p in model.parameters()}
    assert model.optimize_for_decoding() is model
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    for m in linears:
        rows, cols = m.weight.shape
        if kernels:
            assert m.weight.is_contiguous()
        else:
            assert m.weight.stride() == (1, rows) and m.weight.t().is_contiguous()
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied
    assert {p.untyped_storage().nbytes() for p in model.parameters()} == storage  # no extra copy kept
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask, position_ids=positions).logits,
                                   plain(ids, attention_mask=mask, position_ids=positions).logits)
    # It still saves, loads back and trains like the row-major model.
    model.save_pretrained(tmp_path / "m")
    from lmforge import load_model

    loaded = load_model(tmp_path / "m", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, plain(ids).logits)
    for m in (model, plain):
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        m(ids, ids).loss.backward()
        opt.step()
    torch.testing.assert_close(model.transformer.h[0].mlp.c_fc.weight, plain.transformer.h[0].mlp.c_fc.weight)
    torch.testing.assert_close(model.lm_head.weight, plain.lm_head.weight)


def test_optimize_for_decoding_makes_bf16_row_major(tmp_path):
    plain = tiny()
    plain.save_pretrained(tmp_path / "m")
    from lmforge import load_model

    model = load_model(tmp_path / "m", dtype="bf16", device="cpu")  # blocks come column-major
    assert not model.transformer.h[0].attn.c_attn.weight.is_contiguous()
    ids = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
        model.optimize_for_decoding()
        assert all(p.is_contiguous() for p in model.parameters())
        torch.testing.assert_close(model(ids).logits, before, rtol=2e-2, atol=2e-2)
    assert model.lm_head.weight is model.transformer.wte.weight


# ---- the Llama block's pieces against transformers' -------------------------------------------------

LLAMA_PRESET_COUNTS = {  # parameters as transformers counts them for the published models
    "smollm2-135m": 134_515_008, "smollm2-360m": 361_821_120, "qwen2.5-0.5b": 494_032_768,
    "qwen3-0.6b": 596_049_920, "llama-3.2-1b": 1_235_814_400, "tinyllama-1.1b": 1_100_048_384,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_transformers_rms_norm_bit_for_bit(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from lmforge.model import RMSNorm

    torch.manual_seed(0)
    ours, theirs = RMSNorm(48, 1e-6).to(dtype), LlamaRMSNorm(48, eps=1e-6).to(dtype)
    with torch.no_grad():
        ours.weight.normal_(1, 0.3)
        theirs.weight.copy_(ours.weight)
    x = (torch.randn(2, 5, 48) * 3).to(dtype)
    assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("scaling", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
])
def test_rotary_positions_are_transformers_bit_for_bit(scaling):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from lmforge.model import apply_rope, rope_cos_sin, rope_inverse_frequencies

    theta = 500000.0
    config = preset("llama-baby", rope_theta=theta, rope_scaling=scaling, n_positions=512)
    hf_scaling = dict(scaling or {"rope_type": "default"}, rope_theta=theta)
    hf = LlamaRotaryEmbedding(LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=512,
                                          rope_scaling=hf_scaling, rope_theta=theta))
    positions = torch.tensor([[0, 1, 2, 63, 64, 200, 511], [5, 5, 6, 7, 300, 301, 302]])
    q, k = torch.randn(2, 4, 7, 32), torch.randn(2, 2, 7, 32)
    cos, sin = hf(q, positions)
    ours = rope_cos_sin(rope_inverse_frequencies(config), positions, q.dtype)
    assert torch.equal(ours[0], cos) and torch.equal(ours[1], sin)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(apply_rope(q, cos[:, None], sin[:, None]), hf_q)
    assert torch.equal(apply_rope(k, cos[:, None], sin[:, None]), hf_k)


def test_llama_presets_have_the_published_shapes_and_parameter_counts():
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    for name, count in LLAMA_PRESET_COUNTS.items():
        c = preset(name)
        with torch.device("meta"):
            assert GPT(c).num_parameters() == count, name
        hf_class = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[c.family]
        hf_config = hf_class(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.n_inner,
                             num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                             head_dim=c.head_dim, tie_word_embeddings=c.tie_word_embeddings)
        with torch.device("meta"):
            assert AutoModelForCausalLM.from_config(hf_config).num_parameters() == count, name
    baby = GPT(preset("llama-baby", vocab_size=65))
    assert "wpe" not in dict(baby.transformer.named_children())  # rotary positions: no learned table
    assert baby.transformer.h[0].attn.c_attn.weight.shape == (3 * 128, 128)


def test_grouped_query_attention_caches_only_the_key_value_heads():
    model = GPT(preset("llama-baby", vocab_size=65, n_kv_head=1)).eval()
    cache = KVCache.for_model(model, batch_size=2, max_length=16)
    assert cache.k.shape == (4, 2, 1, 16, 32)  # (n_layer, B, n_kv_head, max_length, head_dim): 1/4 of full heads
    x = torch.randint(0, 65, (2, 10))
    with torch.no_grad():
        full = model(x).logits
        model(x[:, :6], kv_cache=cache)
        step = model(x[:, 6:], kv_cache=cache).logits
    torch.testing.assert_close(step, full[:, 6:], rtol=1e-5, atol=1e-5)




def test_kv_cache_grow_keeps_the_rows_asked_for():
    model = tiny()
    cache = KVCache.for_model(model, batch_size=3, max_length=4)
    cache.k.normal_(), cache.v.normal_()
    kept = cache.k[:, :2].clone()
    cache.grow(10, rows=2)  # rows of their own lengths: every old position of rows 0 and 1
    assert cache.max_length == 10
    torch.testing.assert_close(cache.k[:, :2, :, :4], kept)
    cache.length = 3
    filled = cache.k[:, :, :, :3].clone()
    cache.grow(12)  # the filled part of every row
    torch.testing.assert_close(cache.k[:, :, :, :3], filled)


@pytest.mark.parametrize("kind", ["gpt2", "llama-gqa-window"])
def test_ragged_rows_decode_each_row_as_if_alone(kind):
    """Three sequences of different lengths, left-aligned in one cache (garbage past each row's end,
    as a grown cache holds where nothing was written, but finite): three decode steps give each row
    the logits of the sequence run alone."""
    model = tiny() if kind == "gpt2" else GPT(preset("llama-baby", vocab_size=61, n_kv_head=2,
                                                     sliding_window=5)).eval()
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, 61, (1, n), generator=g) for n in (3, 9, 6)]
    cache = KVCache.for_model(model, batch_size=3, max_length=16)
    cache.k.normal_(generator=g), cache.v.normal_(generator=g)
    with torch.no_grad():
        for r, s in enumerate(seqs):
            one = KVCache.for_model(model, 1, 16)
            model.forward_hidden(s[:, :-3], kv_cache=one)
            cache.copy_row(r, one)
        lengths = torch.tensor([s.size(1) - 3 for s in seqs])
        steps = []
        for i in range(3):
            tokens = torch.stack([s[0, -3 + i] for s in seqs])[:, None]
            rows = RaggedRows(cache, lengths)
            hidden = model.forward_blocks(tokens, lengths[:, None], rows.mask(model.config.sliding_window), False, rows)
            steps.append(model.lm_head(hidden[:, -1]))
            lengths = lengths + 1
        for r, s in enumerate(seqs):
            alone = model(s).logits[0, -3:]
            torch.testing.assert_close(torch.stack([step[r] for step in steps]), alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="KV cache is full: 17 positions needed, 16 allocated"):
        RaggedRows(cache, torch.tensor([3, 16, 2]))


@pytest.mark.parametrize("kind", ["gpt2", "llama-gqa-window"])
def test_a_packed_pass_equals_each_sequence_run_alone(kind):
    """Three sequences' chunks in one row (one with a cached prefix, one past the sliding window):
    every segment's hidden states and cached keys/values are those of the sequence run alone."""
    model = tiny() if kind == "gpt2" else GPT(preset("llama-baby", vocab_size=61, n_kv_head=2,
                                                     sliding_window=5)).eval()
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 61, (1, n), generator=g) for n in (9, 4, 12)]
    done = [0, 0, 7]  # the third already holds 7 positions
    with torch.no_grad():
        alone = [model.forward_hidden(s) for s in seqs]
        caches = [KVCache.for_model(model, 1, 16) for _ in seqs]
        model.forward_hidden(seqs[2][:, :7], kv_cache=caches[2])
        lengths = [s.size(1) - d for s, d in zip(seqs, done)]
        ids = torch.cat([s[:, d:] for s, d in zip(seqs, done)], dim=1)
        positions = torch.cat([torch.arange(d, s.size(1)) for s, d in zip(seqs, done)])[None]
        packed = PackedKVCache(caches, lengths, model.config.sliding_window)
        hidden = model.forward_blocks(ids, positions, None, False, packed)
        packed.advance()
        reference = [KVCache.for_model(model, 1, 16) for _ in seqs]
        for s, cache in zip(seqs, reference):
            model.forward_hidden(s, kv_cache=cache)
    start = 0
    for s, d, t, cache, ref in zip(seqs, done, lengths, caches, reference):
        torch.testing.assert_close(hidden[:, start: start + t], alone.pop(0)[:, d:], rtol=1e-5, atol=1e-5)
        assert cache.length == s.size(1)
        torch.testing.assert_close(cache.k[:, :, :, : s.size(1)], ref.k[:, :, :, : s.size(1)], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.v[:, :, :, : s.size(1)], ref.v[:, :, :, : s.size(1)], rtol=1e-5, atol=1e-5)
        start += t
    with pytest.raises(ValueError, match="KV cache is full: 20 positions needed, 16 allocated"):
        PackedKVCache([caches[0]], [11])


@pytest.mark.parametrize("kind", ["gpt2", "llama-gqa-window"])
def test_decoding_rows_and_packed_chunks_in_one_pass_equal_each_sequence_alone(kind):
    """A server step in one forward pass: one new token of each of three running rows (left-aligned in a
    batched cache, garbage past each row's end) led by them, then chunks of two prompts (one with a cached
    prefix). Each row's hidden state and each chunk's are those of its sequence run alone, and every
    cache holds the keys/values the sequence alone writes."""
    model = tiny() if kind == "gpt2" else GPT(preset("llama-baby", vocab_size=61, n_kv_head=2,
                                                     sliding_window=5)).eval()
    g = torch.Generator().manual_seed(5)
    running = [torch.randint(0, 61, (1, n), generator=g) for n in (4, 10, 7)]
    prompts = [torch.randint(0, 61, (1, n), generator=g) for n in (6, 11)]
    done = [0, 4]  # the second prompt already holds 4 positions
    with torch.no_grad():
        batched = KVCache.for_model(model, batch_size=3, max_length=16)
        batched.k.normal_(generator=g), batched.v.normal_(generator=g)
        for r, s in enumerate(running):  # all but the last token cached
            one = KVCache.for_model(model, 1, 16)
            model.forward_hidden(s[:, :-1], kv_cache=one)
            batched.copy_row(r, one)
        lengths = torch.tensor([s.size(1) - 1 for s in running])
        caches = [KVCache.for_model(model, 1, 16) for _ in prompts]
        model.forward_hidden(prompts[1][:, :4], kv_cache=caches[1])
        chunks = [p.size(1) - d for p, d in zip(prompts, done)]
        ids = torch.cat([torch.stack([s[0, -1] for s in running])[None]] + [p[:, d:] for p, d in zip(prompts, done)], 1)
        positions = torch.cat([lengths] + [torch.arange(d, p.size(1)) for p, d in zip(prompts, done)])[None]
        packed = PackedKVCache(caches, chunks, model.config.sliding_window, rows=RaggedRows(batched, lengths))
        hidden = model.forward_blocks(ids, positions, None, False, packed)[0]
        packed.advance()
        for r, s in enumerate(running):
            alone = KVCache.for_model(model, 1, 16)
            torch.testing.assert_close(hidden[r], model.forward_hidden(s, kv_cache=alone)[0, -1], rtol=1e-5, atol=1e-5)
            n = s.size(1)
            torch.testing.assert_close(batched.k[:, r, :, :n], alone.k[:, 0, :, :n], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(batched.v[:, r, :, :n], alone.v[:, 0, :, :n], rtol=1e-5, atol=1e-5)
        start = len(running)
        for p, d, t, cache in zip(prompts, done, chunks, caches):
            alone = KVCache.for_model(model, 1, 16)
            torch.testing.assert_close(hidden[start: start + t], model.forward_hidden(p, kv_cache=alone)[0, d:],
                                       rtol=1e-5, atol=1e-5)
            assert cache.length == p.size(1)
            torch.testing.assert_close(cache.k[:, :, :, : p.size(1)], alone.k[:, :, :, : p.size(1)], rtol=1e-5, atol=1e-5)
            start += t

def test_llama_config_refuses_what_it_cannot_run():
    with pytest.raises(ConfigError, match="multiple of n_kv_head"):
        preset("llama-baby", n_kv_head=3)
    with pytest.raises(ConfigError, match="'yarn' is not supported; lmforge supports 'default', 'linear', 'llama3'"):
        preset("llama-baby", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ConfigError, match="needs factor, low_freq_factor"):
        preset("llama-baby", rope_scaling={"rope_type": "llama3", "factor": 4.0})
    with pytest.raises(ConfigError, match="norm 'batchnorm' is not supported"):
        preset("llama-baby", norm="batchnorm")
