"""Generation: token-identical to transformers' generate on the same weights, KV cache == recomputation,
streaming, stop strings, bad input. Tiny models keep it fast."""

import copy
import json
import itertools
import warnings

import pytest
import torch

import lmforge
from lmforge.generation import GenerationConfig, IncrementalDecoder, resolve_config, stream, stream_text
from lmforge.generation.forward import Forward
from conftest import hf_gpt2

pytest.importorskip("transformers")


def _pair(tmp_path_factory, name, sharpen=1.0, **cfg):
    """(transformers model, lmforge model) with the same weights, loaded through a saved checkpoint."""
    hf = hf_gpt2(**cfg)
    if sharpen != 1.0:  # peaked distributions: eos is chosen often, so finished beams really compete
        with torch.no_grad():
            hf.lm_head.weight.mul_(sharpen)
    directory = tmp_path_factory.mktemp(name)
    hf.save_pretrained(directory)
    return hf, lmforge.load_model(directory, device="cpu")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return _pair(tmp_path_factory, "plain", seed=1)


@pytest.fixture(scope="module")
def eos_models(tmp_path_factory):
    """A 13-token vocabulary where eos (3) is frequent."""
    return _pair(tmp_path_factory, "eos", sharpen=30.0, seed=2, vocab_size=13, bos_token_id=1, eos_token_id=3)


def padded_batch(vocab, seed=0, lengths=(6, 4, 2), low=4):
    """A left-padded batch of prompts of different lengths (pad id 0) and its attention mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(low, vocab, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


def hf_generate(hf, ids, mask, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf.generate(ids, attention_mask=mask, pad_token_id=0, **options)


# ---- exactness against transformers ----------------------------------------------------------


GREEDY_CASES = [
    dict(),
    dict(repetition_penalty=1.4),
    dict(repetition_penalty=0.7, no_repeat_ngram_size=2),
    dict(no_repeat_ngram_size=1),
    dict(min_new_tokens=6, eos_token_id=[3, 5]),
]


@pytest.mark.parametrize("which", ["models", "eos_models"])
@pytest.mark.parametrize("options", GREEDY_CASES, ids=lambda o: ",".join(o) or "plain")
def test_greedy_matches_transformers_on_a_left_padded_batch(which, options, request):
    hf, model = request.getfixturevalue(which)
    ids, mask = padded_batch(model.config.vocab_size)
    ours = model.generate(ids, mask, max_new_tokens=12, pad_token_id=0, **options)
    theirs = hf_generate(hf, ids, mask, max_new_tokens=12, **options)
    assert torch.equal(ours, theirs)


BEAM_CASES = [  # (num_beams, length_penalty, early_stopping, num_return_sequences)
    (2, 1.0, False, 1), (2, 0.6, True, 2), (3, 2.0, "never", 2), (3, -0.5, True, 3),
    (4, 1.0, "never", 4), (4, 1.5, False, 2), (4, 0.0, True, 1), (3, 1.0, False, 1),
]


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping,num_return_sequences", BEAM_CASES)
@pytest.mark.parametrize("eos", [3, [3, 5]], ids=["eos", "two-eos"])
def test_beam_search_matches_transformers(eos_models, num_beams, length_penalty, early_stopping,
                                          num_return_sequences, eos):
    hf, model = eos_models
    ids, mask = padded_batch(model.config.vocab_size, seed=num_beams)
    options = dict(max_new_tokens=10, num_beams=num_beams, length_penalty=length_penalty, eos_token_id=eos,
                   early_stopping=early_stopping, num_return_sequences=num_return_sequences,
                   return_dict_in_generate=True, output_scores=True)
    ours = model.generate(ids, mask, pad_token_id=0, **options)
    theirs = hf_generate(hf, ids, mask, **options)
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores, rtol=1e-5, atol=1e-5)


def test_beam_search_cases_really_end_early(eos_models):
    """The parity cases above are meaningful only if hypotheses finish at eos before max length."""
    _, model = eos_models
    ids, mask = padded_batch(model.config.vocab_size, seed=3)
    out = model.generate(ids, mask, max_new_tokens=10, num_beams=3, num_return_sequences=3, pad_token_id=0)
    new = out[:, ids.size(1):]
    ended_early = [(row[:-1] == 3).any().item() or row.size(0) < 10 for row in new]
    assert any(ended_early)


@pytest.mark.parametrize("options", [
    dict(), dict(top_k=5, top_p=0.8, temperature=0.7, num_return_sequences=3),
    dict(top_k=0, repetition_penalty=1.2, no_repeat_ngram_size=2, num_return_sequences=2),
], ids=["default", "warped", "penalised"])
def test_sampling_matches_transformers_from_the_same_global_seed(models, options):
    hf, model = models
    ids, mask = padded_batch(model.config.vocab_size)
    torch.manual_seed(11)
    ours = model.generate(ids, mask, do_sample=True, max_new_tokens=12, pad_token_id=0, **options)
    torch.manual_seed(11)
    theirs = hf_generate(hf, ids, mask, do_sample=True, max_new_tokens=12, **options)
    assert torch.equal(ours, theirs)


def test_beam_sampling_matches_transformers(eos_models):
    hf, model = eos_models
    ids, mask = padded_batch(model.config.vocab_size)
    torch.manual_seed(3)
    ours = model.generate(ids, mask, do_sample=True, num_beams=3, max_new_tokens=8, pad_token_id=0)
    torch.manual_seed(3)
    theirs = hf_generate(hf, ids, mask, do_sample=True, num_beams=3, max_new_tokens=8)
    assert torch.equal(ours, theirs)


def test_empty_prompt_starts_from_bos_like_transformers(models):
    hf, model = models
    ours = model.generate([], max_new_tokens=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = hf.generate(max_new_tokens=6, pad_token_id=0)
    assert torch.equal(ours, theirs) and ours[0, 0] == model.config.bos_token_id


# ---- batching, caching, determinism ----------------------------------------------------------


@pytest.mark.parametrize("options", [dict(), dict(num_beams=3)], ids=["greedy", "beam"])
def test_padded_and_unpadded_prompts_give_the_same_tokens(models, options):
    _, model = models
    ids, mask = padded_batch(model.config.vocab_size, lengths=(7, 3, 5))
    batch = model.generate(ids, mask, max_new_tokens=8, eos_token_id=[], **options)
    for row in range(ids.size(0)):
        alone = model.generate(ids[row][mask[row] == 1], max_new_tokens=8, eos_token_id=[], **options)
        assert torch.equal(batch[row, ids.size(1):], alone[0, alone.size(1) - 8:])


def test_kv_cached_decoding_equals_full_recomputation_at_every_step(models):
    _, model = models
    ids, mask = padded_batch(model.config.vocab_size)
    out = model.generate(ids, mask, max_new_tokens=10, do_sample=True, seed=0, eos_token_id=[],
                         return_dict_in_generate=True, output_logits=True)
    L = ids.size(1)
    full_mask = torch.cat([mask, torch.ones(mask.size(0), 10, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        for step, cached in enumerate(out.logits):
            n = L + step
            m = full_mask[:, :n]
            positions = (m.cumsum(-1) - 1).clamp(min=0)
            full = model(out.sequences[:, :n], attention_mask=m, position_ids=positions).logits[:, -1]
            torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_static_shape_step_equals_dynamic_step(models, padded):
    """The torch.compile decode path's step function, run eagerly."""
    _, model = models
    ids, mask = padded_batch(model.config.vocab_size)
    mask = mask if padded else None
    max_length = ids.size(1) + 6
    with torch.inference_mode():
        dynamic = Forward(model, 3, max_length, mask, "dynamic")
        static = Forward(model, 3, max_length, mask, "static")
        a, b = dynamic.prefill(ids, mask), static.prefill(ids, mask)
        for _ in range(5):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            tokens = a.argmax(-1)
            a, b = dynamic.step(tokens), static.step(tokens)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


LLAMA = dict(norm="rmsnorm", positions="rope", mlp="gated", activation="silu", bias=False, n_inner=80)
SINGLE_ROW_CONFIGS = [
    dict(),
    dict(bias=False, activation="gelu"),
    dict(activation="relu", scale_attn_by_inverse_layer_idx=True),
    dict(activation="silu", scale_attn_weights=False, tie_word_embeddings=False),
    dict(dtype=torch.bfloat16),
    # the Llama block: RMSNorm, rotary positions, SwiGLU; grouped-query, multi-query, Qwen2 biases,
    # Qwen3 q/k norms with a head_dim of its own, a sliding window shorter than the sequence
    dict(LLAMA, n_kv_head=2),
    dict(LLAMA, n_kv_head=1, qkv_bias=True, tie_word_embeddings=False),
    dict(LLAMA, n_kv_head=2, qk_norm=True, head_size=16, rope_theta=1e6,
         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8}),
    dict(LLAMA, n_kv_head=2, sliding_window=7),
    dict(LLAMA, n_kv_head=2, dtype=torch.bfloat16),
]


@pytest.mark.parametrize("options", SINGLE_ROW_CONFIGS)
def test_single_row_step_equals_batched_step(options):
    """One unpadded sequence decodes on vectors (row_step.py); same logits as the batched step."""
    options = dict(options)
    dtype = options.pop("dtype", torch.float32)
    torch.manual_seed(0)
    model = lmforge.GPT(lmforge.GPTConfig(vocab_size=97, n_positions=32, n_embd=48, n_layer=3, n_head=4,
                                          **options)).to(dtype).eval()
    with torch.no_grad():  # nonzero biases and LayerNorm affines, so every term is exercised
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.5)
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(1))
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        row, batched = Forward(model, 1, 32, None), Forward(model, 1, 32, None)
        batched.row_step = None
        assert row.row_step is not None
        a, b = row.prefill(ids, None), batched.prefill(ids, None)
        for _ in range(26):  # to the last slot of the cache (31 positions)
            tokens = b.argmax(-1)
            a, b = row.step(tokens), batched.step(tokens)
            assert a.shape == b.shape == (1, 97) and a.dtype == torch.float32
            torch.testing.assert_close(a, b, **tol)
        assert row.cache.length == batched.cache.length == 31
        with pytest.raises(ValueError, match="KV cache is full"):
            row.step(tokens)


def test_single_row_step_is_used_only_where_it_applies(models):
    _, model = models
    ids, mask = padded_batch(model.config.vocab_size)
    assert Forward(model, 1, 20, None).row_step is not None
    assert Forward(model, 3, 20, None).row_step is None
    assert Forward(model, 1, 20, mask[:1]).row_step is None  # padded: the batched step's mask and positions
    assert Forward(model, 1, 20, None, "static").row_step is None
    model.train()
    try:
        assert Forward(model, 1, 20, None).row_step is None  # dropout lives in the batched step
    finally:
        model.eval()
    from lmforge.tasks.lora import apply_lora

    adapted = apply_lora(copy.deepcopy(model), rank=2, alpha=4, targets=["c_fc"])
    assert Forward(adapted, 1, 20, None).row_step is None  # an adapter's forward is its own


@pytest.mark.parametrize("decode_layout", [False, True])
@pytest.mark.parametrize("options", [dict(), dict(repetition_penalty=1.3, no_repeat_ngram_size=2)])
def test_single_prompt_greedy_matches_transformers(models, options, decode_layout):
    hf, model = models
    if decode_layout:  # the decoding layout (column-major fp32 without lmforge.kernels), as the CLI,
        model = copy.deepcopy(model)  # server and pipelines load a model
        model.lm_head.weight.data = model.lm_head.weight.data.t().contiguous().t()
        model.optimize_for_decoding()
    ids = torch.randint(4, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(3))
    ours = model.generate(ids, max_new_tokens=40, eos_token_id=[], **options)
    theirs = hf_generate(hf, ids, None, max_new_tokens=40, eos_token_id=None, **options)
    assert torch.equal(ours, theirs)
    if decode_layout:  # and a left-padded batch (the batched step) with the same layout
        ids, mask = padded_batch(model.config.vocab_size)
        ours = model.generate(ids, mask, max_new_tokens=12, eos_token_id=[], **options)
        assert torch.equal(ours, hf_generate(hf, ids, mask, max_new_tokens=12, eos_token_id=None, **options))


def test_seed_makes_sampling_reproducible_without_touching_global_rng(models):
    _, model = models
    ids, mask = padded_batch(model.config.vocab_size)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = model.generate(ids, mask, do_sample=True, seed=123, max_new_tokens=10, num_return_sequences=2)
    assert torch.equal(torch.get_rng_state(), state)
    b = model.generate(ids, mask, do_sample=True, seed=123, max_new_tokens=10, num_return_sequences=2)
    c = model.generate(ids, mask, do_sample=True, seed=124, max_new_tokens=10, num_return_sequences=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_kv_cache_is_sized_from_the_request(models, monkeypatch):
    _, model = models
    sizes = []
    original = lmforge.KVCache.for_model

    def spy(cls_model, batch_size, max_length=None, *rest):
        sizes.append((batch_size, max_length))
        return original(cls_model, batch_size, max_length, *rest)

    monkeypatch.setattr(lmforge.KVCache, "for_model", staticmethod(spy))
    model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=True, num_return_sequences=2)
    assert sizes == [(2, 3 + 4 - 1)]  # batch x (prompt + new - 1): the last token is never fed back


def test_return_dict_scores_and_token_logprobs(models):
    _, model = models
    ids, mask = padded_batch(model.config.vocab_size)
    out = model.generate(ids, mask, max_new_tokens=5, do_sample=True, seed=1, top_k=4,
                         return_dict_in_generate=True, output_scores=True)
    assert len(out.scores) == 5 and out.token_logprobs.shape == (3, 5)
    chosen = out.sequences[:, ids.size(1):]
    for step, scores in enumerate(out.scores):
        want = torch.log_softmax(scores, -1).gather(1, chosen[:, step:step + 1]).squeeze(1)
        torch.testing.assert_close(out.token_logprobs[:, step], want)
        assert (torch.isfinite(scores).sum(-1) <= 4).all()  # top_k=4 was applied


def test_generation_config_object_and_overrides(models):
    _, model = models
    config = GenerationConfig(max_new_tokens=3, do_sample=True, seed=5)
    a = model.generate(torch.tensor([[5, 6]]), generation_config=config)
    b = model.generate(torch.tensor([[5, 6]]), generation_config=config, max_new_tokens=5)
    assert a.shape == (1, 5) and b.shape == (1, 7) and torch.equal(a, b[:, :5])
    assert resolve_config(model).eos_token_id == [model.config.eos_token_id]


def test_max_new_tokens_zero_returns_the_prompt(models):
    _, model = models
    prompt = torch.tensor([[5, 6, 7]])
    assert torch.equal(model.generate(prompt, max_new_tokens=0), prompt)


def test_default_length_is_twenty_new_tokens_capped_at_the_context(models):
    _, model = models
    assert model.generate(torch.tensor([[5]]), eos_token_id=[]).shape == (1, 21)
    near_end = torch.full((1, 60), 5)  # n_positions is 64
    assert model.generate(near_end, eos_token_id=[]).shape == (1, 64)


def test_truncate_prompt_keeps_the_last_tokens(models):
    _, model = models
    long_prompt = torch.randint(4, 100, (1, 70))  # context is 64
    with pytest.raises(ValueError, match="truncate_prompt"):
        model.generate(long_prompt, max_new_tokens=4)
    out = model.generate(long_prompt, max_new_tokens=4, truncate_prompt=True, eos_token_id=[])
    same = model.generate(long_prompt[:, -60:], max_new_tokens=4, eos_token_id=[])
    assert torch.equal(out, same)


# ---- stop strings and streaming --------------------------------------------------------------


class ByteTokenizer:
    """Token i < 256 is byte i; anything else decodes to nothing. Incomplete UTF-8 gives U+FFFD."""

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens=False):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def byte_model():
    torch.manual_seed(0)
    return lmforge.GPT.from_preset("tiny", vocab_size=257, n_positions=64, bos_token_id=256,
                                   eos_token_id=256).eval()


def test_incremental_decoder_never_splits_a_utf8_character():
    tok = ByteTokenizer()
    text = "héllo, 世界 🙂!"
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(b) for b in tok.encode(text)] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[tok.encode(text).index(0xE4)] == ""  # first byte of 世 alone: held back


def test_incremental_decoder_flushes_an_incomplete_tail_and_works_with_strict_decoders():
    class Strict:
        def decode(self, ids):
            return bytes(ids).decode("utf-8")  # raises on incomplete bytes

    for tok in (ByteTokenizer(), Strict()):
        decoder = IncrementalDecoder(tok)
        assert decoder.push([104, 105]) == "hi"
        assert decoder.push(0xE4) == "" and decoder.push(0xB8) == ""
        assert decoder.flush() == "\ufffd"


def test_stream_yields_the_tokens_generate_returns(byte_model):
    ids, mask = padded_batch(256, lengths=(5, 2))
    options = dict(max_new_tokens=12, do_sample=True, seed=3, num_return_sequences=2, top_k=0)
    full = byte_model.generate(ids, mask, **options)
    steps = list(stream(byte_model, ids, mask, **options))
    streamed = torch.stack([s.tokens for s in steps], dim=1)
    assert torch.equal(streamed, full[:, ids.size(1):])
    assert steps[-1].finished.all() and [s.index for s in steps] == list(range(len(steps)))


def test_stream_does_not_leave_inference_mode_on_between_steps(byte_model):
    for _ in stream(byte_model, [[65, 66]], max_new_tokens=3):
        assert not torch.is_inference_mode_enabled()


def test_stream_text_concatenates_to_the_decoded_continuation(byte_model):
    tok = ByteTokenizer()
    pieces = list(stream_text(byte_model, tok, "Hi ", max_new_tokens=40, do_sample=True, seed=0, top_k=0))
    ids = byte_model.generate([tok.encode("Hi ")], max_new_tokens=40, do_sample=True, seed=0, top_k=0)[0].tolist()
    new = ids[3:]
    if 256 in new:
        new = new[: new.index(256)]
    assert "".join(pieces) == tok.decode(new)


def test_stop_strings_end_generation_once_the_string_overlaps_the_newest_token(byte_model):
    tok = ByteTokenizer()
    free = byte_model.generate([tok.encode("ab")], max_new_tokens=30, do_sample=True, seed=4, top_k=0,
                               eos_token_id=[])[0].tolist()
    text = tok.decode(free[2:])
    stop = text[5:7]  # a 2-character string that is certainly produced
    stopped = byte_model.generate([tok.encode("ab")], max_new_tokens=30, do_sample=True, seed=4, top_k=0,
                                  eos_token_id=[], stop_strings=stop, tokenizer=tok)[0].tolist()
    out = tok.decode(stopped[2:])
    assert out.endswith(stop) and stop not in out[:-1] and len(stopped) < len(free)
    with pytest.raises(ValueError, match="tokenizer"):
        byte_model.generate([[65]], max_new_tokens=3, stop_strings="x")


def test_stop_strings_match_across_token_boundaries_and_multibyte_characters():
    from lmforge.generation.stops import StopStrings

    tok = ByteTokenizer()
    stop = StopStrings(["\u4e16", "stop"], tok)
    rows = [tok.encode("a \u4e16"), tok.encode("xx stop"), tok.encode("stopped"), tok.encode("a \u4e16")[:-1]]
    width = max(map(len, rows))
    batch = torch.tensor([[32] * (width - len(r)) + r for r in rows])
    assert stop.hits(batch).tolist() == [True, True, False, False]


# ---- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("options,name", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(eos_token_id=-3), "eos_token_id"),
    (dict(max_length=0), "max_length"),
    (dict(num_beams=0), "num_beams"),
    (dict(max_new_tokenz=3), "max_new_tokens"),  # a typo gets a "did you mean"
])
def test_bad_options_raise_value_error_naming_the_option(models, options, name):
    _, model = models
    with pytest.raises(ValueError, match=name):
        model.generate(torch.tensor([[5, 6]]), **options)


@pytest.mark.parametrize("prompt,options,needle", [
    (torch.full((1, 64), 5), dict(max_new_tokens=1), "n_positions=64"),  # at the context length
    (torch.full((1, 80), 5), dict(), "n_positions=64"),  # over it
    (torch.full((1, 10), 5), dict(max_length=10), "max_length"),
    (torch.tensor([[5, 101]]), dict(), "vocabulary"),
    (torch.tensor([[-1, 5]]), dict(), "vocabulary"),
    (torch.tensor([[[5]]]), dict(), "input_ids"),
    (torch.tensor([[0.5, 1.0]]), dict(), "input_ids"),
])
def test_bad_prompts_raise_value_error(models, prompt, options, needle):
    _, model = models
    with pytest.raises(ValueError, match=needle):
        model.generate(prompt, **options)


def test_bad_attention_mask_and_streamed_beam_search_are_refused(models):
    _, model = models
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(torch.tensor([[5, 6]]), torch.tensor([[1, 1, 1]]))
    with pytest.raises(ValueError, match="num_beams"):
        stream(model, [[5, 6]], num_beams=2)


def test_all_padding_row_is_an_empty_prompt(models):
    _, model = models
    ids = torch.tensor([[0, 0, 0], [0, 7, 8]])
    mask = torch.tensor([[0, 0, 0], [0, 1, 1]])
    out = model.generate(ids, mask, max_new_tokens=4, eos_token_id=[])
    alone = model.generate([], max_new_tokens=4, eos_token_id=[])
    assert torch.equal(out[0, -4:], alone[0, -4:])


def test_option_grid_runs(eos_models):
    """A broad smoke grid: every strategy x padding x eos setting produces well-formed output."""
    _, model = eos_models
    ids, mask = padded_batch(model.config.vocab_size)
    for beams, sample, eos in itertools.product([1, 2], [False, True], [[], 3, [3, 5]]):
        n = 2 if (sample or beams > 1) else 1
        out = model.generate(ids, mask, max_new_tokens=5, num_beams=beams, do_sample=sample, seed=0,
                             num_return_sequences=n, eos_token_id=eos, pad_token_id=0)
        assert out.shape[0] == 3 * n and ids.size(1) < out.size(1) <= ids.size(1) + 5


# ---- command line -----------------------------------------------------------------------------


def test_cli_preset_prints_numbered_generations_offline(capsys):
    from lmforge.cli import main

    args = ["generate", "--preset", "tiny", "--prompt", "Hello", "--max-length", "30",
            "--num-return-sequences", "3", "--seed", "0"]  # several sequences imply --do-sample
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Output:" and set(lines[1]) == {"-"}
    assert len(lines) == 5 and [line[:8] for line in lines[2:]] == ["0: Hello", "1: Hello", "2: Hello"]
    assert len(set(lines[2:])) == 3  # sampled, not three greedy copies
    assert main(args) == 0 and capsys.readouterr().out.splitlines() == lines  # --seed: reproducible


def test_cli_stream_prints_what_the_batch_run_prints_and_reads_stdin(capsys, monkeypatch):
    import io

    from lmforge.cli import main

    args = ["generate", "--preset", "tiny", "--prompt", "-", "--max-new-tokens", "16", "--do-sample",
            "--seed", "3", "--num-return-sequences", "2", "--top-k", "0"]
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi there\nSecond \u2603 prompt\n"))
    assert main(args) == 0
    batch = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi there\nSecond \u2603 prompt\n"))
    assert main(args + ["--stream"]) == 0
    assert capsys.readouterr().out == batch
    assert batch.count("Output:") == 2 and "1: Second \u2603 prompt" in batch


def test_cli_model_directory_uses_its_tokenizer_and_matches_the_api(tmp_path, capsys):
    from lmforge.cli import main
    from lmforge.tokenizer import Tokenizer

    tokenizer = Tokenizer.byte_level()
    hf = hf_gpt2(vocab_size=tokenizer.vocab_size, bos_token_id=256, eos_token_id=256)
    hf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "abc", "--max-new-tokens", "8",
                 "--num-beams", "2", "--num-return-sequences", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    model = lmforge.load_model(tmp_path, device="cpu")
    ids = model.generate([tokenizer.encode("abc")], max_new_tokens=8, num_beams=2, num_return_sequences=2)
    assert out[2:] == [f"{i}: {tokenizer.decode(row, skip_special_tokens=True)}" for i, row in enumerate(ids.tolist())]


@pytest.mark.parametrize("flags,needle", [
    (["--top-p", "1.5"], "top_p"), (["--temperature", "0", "--do-sample"], "temperature"),
    (["--top-k", "-2"], "top_k"), (["--max-new-tokens", "-1"], "max_new_tokens"),
    (["--num-beams", "2", "--num-return-sequences", "3"], "num_return_sequences"),
    (["--max-new-tokens", "200"], "n_positions"), (["--num-beams", "2", "--stream"], "stream"),
])
def test_cli_bad_input_prints_one_line_and_exits_nonzero(capsys, flags, needle):
    from lmforge.cli import main

    assert main(["generate", "--preset", "tiny", "--prompt", "Hello", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and err.startswith("lmforge generate: error:")


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens(models):
    """compile=True (torch.compile of the static step; CUDA graphs on GPU). About a minute on CPU."""
    _, model = models
    for seed in (0, 1):  # the second request reuses the compiled step's cache buffers
        ids, mask = padded_batch(model.config.vocab_size, seed=seed)
        eager = model.generate(ids, mask, max_new_tokens=6, eos_token_id=[])
        assert torch.equal(model.generate(ids, mask, max_new_tokens=6, eos_token_id=[], compile=True), eager)


def test_generation_config_json_supplies_the_defaults_the_user_left_unset(tmp_path):
    """As transformers applies a checkpoint's generation_config.json: its eos list and sampling
    settings where the call sets nothing, the call's own options where it does."""
    from lmforge.generation.request import resolve_config

    torch.manual_seed(0)
    lmforge.GPT(lmforge.GPTConfig(vocab_size=50, n_positions=32, n_embd=32, n_layer=1, n_head=2,
                                  eos_token_id=7)).save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [7, 9], "do_sample": True, "temperature": 0.6, "top_p": 0.9, "transformers_version": "5"}))
    model = lmforge.load_model(tmp_path, device="cpu")
    config = resolve_config(model)
    assert config.eos_token_id == [7, 9] and config.do_sample and config.temperature == 0.6 and config.top_p == 0.9
    mine = resolve_config(model, do_sample=False, eos_token_id=[3])
    assert not mine.do_sample and mine.eos_token_id == [3] and mine.temperature == 0.6
    ids = model.generate([[1, 2, 3]], max_new_tokens=5, seed=0)
    assert ids.shape[1] <= 8  # sampled with the file's settings (seeded), stops at 7 or 9 if drawn


@pytest.mark.parametrize("options", [dict(LLAMA, n_kv_head=2), dict(LLAMA, n_kv_head=1, sliding_window=5)])
def test_static_shape_step_equals_dynamic_step_for_the_llama_block(options):
    torch.manual_seed(0)
    model = lmforge.GPT(lmforge.GPTConfig(vocab_size=97, n_positions=32, n_embd=48, n_layer=2, n_head=4,
                                          **options)).eval()
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.inference_mode():
        dynamic, static = Forward(model, 2, 16, mask, "dynamic"), Forward(model, 2, 16, mask, "static")
        a, b = dynamic.prefill(ids, mask), static.prefill(ids, mask)
        for _ in range(8):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            tokens = a.argmax(-1)
            a, b = dynamic.step(tokens), static.step(tokens)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
