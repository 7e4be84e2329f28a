"""Llama-family tokenizers and chat templates against transformers: tokenizers built here (offline) in
the shape of Llama 3's (byte-level BPE, its split regex, <|begin_of_text|> added by a template
post-processor), Qwen2's (ChatML specials, NFC, no bos) and Llama 2 / TinyLlama's (SentencePiece BPE
with byte fallback), loaded by lmforge and by AutoTokenizer: same ids, same text, same chat prompts;
and the server and `lmforge generate --chat` on a model with a chat template."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from lmforge import GPT, GPTConfig, Tokenizer
from lmforge.chat_template import render_chat_template
from lmforge.errors import ChatTemplateError, ConfigError
from lmforge.serve import ChatTemplate, Engine, EngineConfig, ServerConfig, create_app

CORPUS = [
    "Hello world, this is a test of the tokenizer. The quick brown fox jumps over the lazy dog 12345.",
    "Guten Tag! Über die Brücke gehen Mädchen und Jungen; die Größe ist schön.",
    "你好，世界。我们在学习中文分词。", "こんにちは世界、カタカナとひらがなのテキスト。",
    "def f(x):\n    return x ** 2  # square\n\nclass A:\n\tpass\n", "   leading spaces\n\n\ttabs and\r\nCRLF",
    "emoji 😀🎉 ok 👍🏽", "You are a helpful assistant. What is the capital of France? Paris is.",
] * 40
TEXTS = [
    "Hello world", " Hello", "  two leading spaces", "trailing spaces   ", "Über Größe, straße: schön!",
    "中文测试，你好世界", "日本語のテキストです。", "emoji 😀 👍🏽 👨‍👩‍👧 🇫🇷", "def f(x):\n    return x ** 2\n",
    "\n\nnewlines first\n", "line\r\nbreaks\n\n\n", "numbers 1234567 3.14", "", " ", "\t",
    "It's what we'll see; they've gone", "unseen ✓ ∑ ☃ characters",
]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Meta-Llama-3-8B-Instruct's template, Qwen2.5's (ChatML, default system prompt) and Mistral-7B-Instruct-v0.1's.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{%- for message in messages %}\n    {%- if loop.first and message['role'] != 'system' %}\n"
    "        {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}\n    {%- endif %}\n"
    "    {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}\n"
    "{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\n' }}\n{%- endif %}\n"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# The environment's extras: namespace, loop controls, tojson without ASCII escapes, the generation tag, tools.
TOOLS_TEMPLATE = (
    "{%- set ns = namespace(n=0) %}{%- if tools is not none %}Tools: {{ tools | tojson }}\n{%- endif %}"
    "{%- for m in messages %}{%- if m['role'] == 'stop' %}{%- break %}{%- endif %}{%- set ns.n = ns.n + 1 %}"
    "{%- if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}{%- else %}"
    "[{{ ns.n }}:{{ m['role'] }}] {{ m['content'] }}{%- endif %}\n{%- endfor %}"
    "{%- if add_generation_prompt %}[assistant]{%- endif %}{{ extra | default('') }}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Wie geht's? 你好 😀"},
     {"role": "assistant", "content": " Gut, danke.  "}, {"role": "user", "content": "  And now?\n"}],
]


def _train(model, normalizer, pre_tokenizer, specials, vocab_size, **trainer_kw) -> HFTokenizer:
    tok = HFTokenizer(model)
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False, **trainer_kw)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _byte_level_split(pattern: str):
    """Split by the model's regex, then map bytes to GPT-2's alphabet (Llama 3's and Qwen2's pre-tokenizer)."""
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), "isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _save(tok: HFTokenizer, directory, config: dict, model_type: str | None = None):
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    added = {str(i): {"content": t.content, "special": t.special, "lstrip": False, "rstrip": False,
                      "normalized": False, "single_word": False} for i, t in tok.get_added_tokens_decoder().items()}
    (directory / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added, **config}))
    if model_type:
        (directory / "config.json").write_text(json.dumps({"model_type": model_type}))
    return directory


def llama3_style(directory, **config):
    """Byte-level BPE with Llama 3's split regex; <|begin_of_text|> comes from a template post-processor."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = _train(BPE(), None, _byte_level_split(LLAMA3_SPLIT), specials, 700,
                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.decoder = decoders.ByteLevel()
    bos = "<|begin_of_text|>"
    add_bos = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                            special_tokens=[(bos, tok.token_to_id(bos))])
    tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), add_bos])
    return _save(tok, directory, {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos,
                                  "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True,
                                  "model_max_length": 131072, "chat_template": LLAMA3_TEMPLATE, **config})


def qwen2_style(directory, **config):
    """Qwen2's byte-level BPE: NFC, its split regex, ChatML special tokens, no bos."""
    tok = _train(BPE(), normalizers.NFC(), _byte_level_split(QWEN2_SPLIT), ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                 650, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return _save(tok, directory, {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
                                  "pad_token": "<|endoftext|>", "unk_token": None, "add_prefix_space": False,
                                  "errors": "replace", "chat_template": CHATML_TEMPLATE, **config})


def sentencepiece_style(directory, model_type: str | None = None, **config):
    """A SentencePiece-converted BPE as in Llama 2 / TinyLlama's tokenizer.json: <unk> <s> </s>, the 256
    byte tokens <0x00>..<0xFF> (byte fallback for unseen characters), the ▁-prepending normalizer,
    and <s> added by the post-processor."""
    tok = _train(BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True), None,
                 pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
                 ["<unk>", "<s>", "</s>"], 420, limit_alphabet=70)
    spec = json.loads(tok.to_str())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    learned = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1]) if t not in vocab]
    vocab.update({t: len(vocab) + i for i, t in enumerate(learned)})
    spec["model"]["vocab"] = vocab
    for token in spec["added_tokens"]:
        token["id"] = vocab[token["content"]]
    spec["pre_tokenizer"] = None
    tok = HFTokenizer.from_str(json.dumps(spec))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return _save(tok, directory, {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                                  "unk_token": "<unk>", "pad_token": "</s>", "add_bos_token": True,
                                  "add_eos_token": False, "legacy": False, "chat_template": MISTRAL_TEMPLATE, **config},
                 model_type)


KINDS = {
    "llama3": llama3_style,
    "qwen2": qwen2_style,
    "qwen2-base": lambda d: qwen2_style(d, eos_token="<|endoftext|>"),
    "sentencepiece": sentencepiece_style,
    "sentencepiece-legacy": lambda d: sentencepiece_style(d, legacy=True),
    "sentencepiece-no-prefix-space": lambda d: sentencepiece_style(d, add_prefix_space=False),
    "sentencepiece-as-written": lambda d: sentencepiece_style(d, tokenizer_class="PreTrainedTokenizerFast"),
    "sentencepiece-mistral-dir": lambda d: sentencepiece_style(d, model_type="mistral"),
    "sentencepiece-add-eos": lambda d: sentencepiece_style(d, add_eos_token=True),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = {}

    def get(kind: str):
        if kind not in cache:
            from transformers import AutoTokenizer

            directory = KINDS[kind](tmp_path_factory.mktemp(kind))
            cache[kind] = directory, Tokenizer.from_pretrained(directory), AutoTokenizer.from_pretrained(str(directory))
        return cache[kind]

    return get


# ---- ids and text equal transformers' ---------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_ids_and_text_equal_transformers(built, kind):
    _, tok, hf = built(kind)
    specials = [t for t in hf.all_special_tokens if t]
    texts = TEXTS + [f"{specials[0]}Hello{specials[-1]} world", f"a {specials[-1]} b\n{specials[0]}"]
    for text in texts:
        assert tok.encode(text) == hf.encode(text), text
        assert tok.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False), text
        assert tok.encode(text, split_special_tokens=True) == hf(text, split_special_tokens=True)["input_ids"], text
        ids = hf.encode(text)
        assert tok.decode(ids) == hf.decode(ids), text
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), text
    assert tok(texts)["input_ids"] == hf(texts)["input_ids"]
    if hf.pad_token is not None:  # transformers refuses to pad without one (lmforge pads with eos)
        batch, hf_batch = tok(texts, padding=True, return_tensors="pt"), hf(texts, padding=True, return_tensors="pt")
        assert torch.equal(batch["input_ids"], hf_batch["input_ids"])
        assert torch.equal(batch["attention_mask"], hf_batch["attention_mask"])
    for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(tok, role) == getattr(hf, role), role
        assert getattr(tok, role + "_id") == getattr(hf, role + "_id"), role
    assert tok.vocab_size == len(hf) and set(hf.all_special_tokens) <= set(tok.special_tokens)
    assert tok.padding_side == hf.padding_side


def test_unseen_characters_fall_back_to_byte_tokens(built):
    _, tok, hf = built("sentencepiece")
    ids = tok.encode("☃", add_special_tokens=False)
    assert [tok.id_to_token(i) for i in ids[-3:]] == ["<0xE2>", "<0x98>", "<0x83>"]  # the UTF-8 bytes of ☃
    assert tok.decode(ids) == hf.decode(ids) == "☃"


def test_bos_comes_from_the_post_processor_or_add_bos_token(built, tmp_path):
    _, llama3, _ = built("llama3")
    assert llama3.encode("Hi")[0] == llama3.bos_token_id == llama3.token_to_id("<|begin_of_text|>")
    assert llama3.bos_token_id not in llama3.encode("Hi", add_special_tokens=False)
    _, qwen2, _ = built("qwen2")
    assert qwen2.bos_token is None and qwen2.encode("Hi") == qwen2.encode("Hi", add_special_tokens=False)
    _, sp_eos, _ = built("sentencepiece-add-eos")  # with a tokenizer.json, transformers 5 ignores add_eos_token
    assert sp_eos.encode("Hi")[-1] != sp_eos.eos_token_id
    # vocab.json + merges.txt alone: add_bos_token / add_eos_token put bos / eos around every text
    from transformers import AutoTokenizer

    Tokenizer.train(" ".join(CORPUS), vocab_size=400, special_tokens=["<|endoftext|>", "<s>"], show_progress=False
                    ).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "special_tokens_map.json").unlink()  # transformers would let it override the config's bos
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(bos_token="<s>", add_bos_token=True, add_eos_token=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok, hf = Tokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    ids = tok.encode("Hello world")
    assert ids == hf.encode("Hello world") and ids[0] == tok.token_to_id("<s>") and ids[-1] == tok.eos_token_id


@pytest.mark.parametrize("kind", ["llama3", "qwen2", "sentencepiece", "sentencepiece-legacy"])
def test_saved_by_lmforge_loads_to_the_same_ids_in_both(built, kind, tmp_path):
    from transformers import AutoTokenizer

    _, tok, hf = built(kind)
    tok.save_pretrained(tmp_path)
    again, hf_again = Tokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    assert again.fingerprint == tok.fingerprint and again.chat_template == tok.chat_template
    for text in TEXTS:
        assert again.encode(text) == hf_again.encode(text) == hf.encode(text), text
    chat = CONVERSATIONS[0]
    assert hf_again.apply_chat_template(chat, tokenize=False) == again.apply_chat_template(chat, tokenize=False)


def test_the_fingerprint_tells_whether_bos_is_added(built, tmp_path):
    directory, tok, _ = built("sentencepiece")
    spec = json.loads((directory / "tokenizer.json").read_text())
    (tmp_path / "tokenizer.json").write_text(json.dumps({**spec, "post_processor": None}))
    (tmp_path / "tokenizer_config.json").write_bytes((directory / "tokenizer_config.json").read_bytes())
    no_bos = Tokenizer.from_pretrained(tmp_path)
    assert no_bos.encode("Hi") == tok.encode("Hi")[1:] and no_bos.fingerprint != tok.fingerprint


# ---- chat templates equal transformers' ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama3", "qwen2", "sentencepiece"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_text_and_ids_equal_transformers(built, kind, add_generation_prompt):
    _, tok, hf = built(kind)
    for chat in CONVERSATIONS:
        if kind == "sentencepiece" and chat[0]["role"] == "system":
            chat = chat[1:]  # Mistral's template has no system role
        kw = dict(add_generation_prompt=add_generation_prompt)
        text = tok.apply_chat_template(chat, tokenize=False, **kw)
        assert text == hf.apply_chat_template(chat, tokenize=False, **kw)
        ids = tok.apply_chat_template(chat, return_dict=False, **kw)
        assert ids == hf.apply_chat_template(chat, return_dict=False, **kw)
        out, hf_out = tok.apply_chat_template(chat, **kw), hf.apply_chat_template(chat, **kw)
        assert out["input_ids"] == hf_out["input_ids"] and out["attention_mask"] == hf_out["attention_mask"]
    both = [CONVERSATIONS[0], CONVERSATIONS[0] + [{"role": "assistant", "content": "Hi"}]]
    assert tok.apply_chat_template(both, tokenize=False) == hf.apply_chat_template(both, tokenize=False)
    assert tok.apply_chat_template(both, return_dict=False) == hf.apply_chat_template(both, return_dict=False)
    if hf.pad_token is not None:
        padded, hf_padded = (t.apply_chat_template(both, padding=True, return_tensors="pt") for t in (tok, hf))
        assert torch.equal(padded["input_ids"], hf_padded["input_ids"])


def test_template_texts_are_as_the_models_write_them(built):
    _, llama3, _ = built("llama3")
    assert llama3.apply_chat_template(CONVERSATIONS[0], tokenize=False, add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    _, qwen2, _ = built("qwen2")
    assert qwen2.apply_chat_template(CONVERSATIONS[0], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_environment_extras_equal_transformers(built):
    _, tok, hf = built("qwen2")
    tools = [{"type": "function", "function": {"name": "météo", "description": "le temps qu'il fait à Zürich ☀"}}]
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "tool_calls": None},
            {"role": "stop", "content": "ignored"}, {"role": "user", "content": "never"}]
    for kw in ({}, {"tools": tools}, {"add_generation_prompt": True, "extra": "!"}):
        text = tok.apply_chat_template(chat, chat_template=TOOLS_TEMPLATE, tokenize=False, **kw)
        assert text == hf.apply_chat_template(chat, chat_template=TOOLS_TEMPLATE, tokenize=False, **kw)
    assert "Zürich ☀" in tok.apply_chat_template(chat, chat_template=TOOLS_TEMPLATE, tokenize=False, tools=tools)
    today = "{{ strftime_now('%Y-%m-%d') }}"
    assert tok.apply_chat_template(chat, chat_template=today, tokenize=False) == hf.apply_chat_template(
        chat, chat_template=today, tokenize=False)
    trailing = "{{ messages[0]['content'] }}\n"  # jinja drops one trailing newline, as transformers has it
    assert tok.apply_chat_template(chat, chat_template=trailing, tokenize=False) == "a"


def test_continue_final_message_equals_transformers(built):
    _, tok, hf = built("qwen2")
    chat = [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "1, 2,"}]
    text = tok.apply_chat_template(chat, tokenize=False, continue_final_message=True)
    assert text == hf.apply_chat_template(chat, tokenize=False, continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\n1, 2,")
    with pytest.raises(ChatTemplateError, match="do not go together"):
        tok.apply_chat_template(chat, continue_final_message=True, add_generation_prompt=True)


def test_raise_exception_in_a_template_is_a_chat_template_error(built):
    _, tok, hf = built("sentencepiece")
    bad = [{"role": "assistant", "content": "I speak first"}]
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate") as info:
        tok.apply_chat_template(bad)
    assert isinstance(info.value, ConfigError)
    with pytest.raises(Exception, match="Conversation roles must alternate"):
        hf.apply_chat_template(bad)
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        tok.apply_chat_template(bad, chat_template="{% for %}")
    with pytest.raises(ChatTemplateError, match="empty conversation"):
        tok.apply_chat_template([])


def test_missing_template_is_a_clear_error_and_the_jinja_file_wins(built, tmp_path):
    assert Tokenizer.byte_level().chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        Tokenizer.byte_level().apply_chat_template(CONVERSATIONS[0])
    assert Tokenizer.byte_level().end_of_turn_ids() == []
    directory, _, _ = built("qwen2")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}\n")
    from transformers import AutoTokenizer

    for tok in (Tokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))):
        assert tok.apply_chat_template(CONVERSATIONS[0], tokenize=False) == "<user>Hello!"


def test_named_templates_pick_default_or_tool_use(built, tmp_path):
    directory, _, _ = built("qwen2")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "D{{ messages | length }}"},
                               {"name": "tool_use", "template": "T{{ tools | tojson }}"}]
    (tmp_path / "tokenizer.json").write_bytes((directory / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.apply_chat_template(CONVERSATIONS[0], tokenize=False) == "D1"
    assert tok.apply_chat_template(CONVERSATIONS[0], tokenize=False, tools=[{"a": 1}]) == 'T[{"a": 1}]'
    assert tok.apply_chat_template(CONVERSATIONS[0], tokenize=False, chat_template="tool_use") == "Tnull"


def test_end_of_turn_ids_are_the_templates(built):
    assert [built("llama3")[1].id_to_token(i) for i in built("llama3")[1].end_of_turn_ids()] == ["<|eot_id|>"]
    assert [built("qwen2")[1].id_to_token(i) for i in built("qwen2")[1].end_of_turn_ids()] == ["<|im_end|>"]
    assert [built("sentencepiece")[1].id_to_token(i) for i in built("sentencepiece")[1].end_of_turn_ids()] == ["</s>"]
    qwen2 = built("qwen2")[1]
    assert qwen2.end_of_turn_ids(ChatTemplate().source) == []  # "\nUser:" ends the default template's turns


def test_render_drops_none_fields_as_transformers(built):
    _, _, hf = built("qwen2")
    chat = [{"role": "user", "content": "x", "name": None}]
    source = "{% for m in messages %}{{ m.name is defined }}{% endfor %}"
    assert render_chat_template(source, chat) == "False"
    assert hf.apply_chat_template(chat, chat_template=source, tokenize=False) == "False"


# ---- serving and generate --chat ----------------------------------------------------------------


@pytest.fixture(scope="module")
def chatml(built):
    """A tiny random GPT over the Qwen2-style tokenizer (which has a ChatML template)."""
    _, tok, _ = built("qwen2")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=tok.vocab_size, n_positions=256,
                          eos_token_id=tok.token_to_id("<|endoftext|>"))).eval()
    return model, tok


def test_chat_template_for_a_tokenizer(chatml):
    _, tok = chatml
    template = ChatTemplate.for_tokenizer(tok)
    assert template.source == tok.chat_template and template.stop == []
    assert template.stop_token_ids == [tok.token_to_id("<|im_end|>")]
    expected = tok.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=True, return_dict=False)
    assert template.encode(tok, CONVERSATIONS[1]) == expected
    plain = ChatTemplate.for_tokenizer(Tokenizer.byte_level())
    assert plain.source == ChatTemplate().source and plain.stop == ["\nUser:"] and plain.stop_token_ids == []
    override = ChatTemplate.for_tokenizer(tok, MISTRAL_TEMPLATE, stop=["###"])
    assert override.stop == ["###"] and override.stop_token_ids == [tok.token_to_id("<|im_end|>")]  # its eos_token


def test_server_chat_renders_the_template_and_stops_at_im_end(chatml):
    from fastapi.testclient import TestClient

    model, tok = chatml
    engine = Engine(model, tok, EngineConfig(max_batch_size=2))
    reply = tok.encode("Paris is.", add_special_tokens=False)
    script = reply + [tok.token_to_id("<|im_end|>")] + tok.encode(" more text", add_special_tokens=False) * 3
    engine._choose = lambda logits, seqs: [script[len(q.output)] for q in seqs]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    with TestClient(create_app(engine, ServerConfig(), model_name="m")) as client:
        out = client.post("/v1/chat/completions", json={"model": "m", "messages": messages, "max_tokens": 20}).json()
        assert out["choices"][0]["message"]["content"] == "Paris is."
        assert out["choices"][0]["finish_reason"] == "stop"
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        assert out["usage"]["prompt_tokens"] == len(prompt)
        assert out["usage"]["completion_tokens"] == len(reply) + 1
    template = ChatTemplate.for_tokenizer(tok, MISTRAL_TEMPLATE)
    with TestClient(create_app(Engine(model, tok, EngineConfig()), ServerConfig(), template, model_name="m")) as client:
        body = {"model": "m", "messages": [{"role": "assistant", "content": "x"}]}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and "Conversation roles must alternate" in r.json()["error"]["message"]


def test_generate_chat_wraps_the_prompt_and_stops_at_the_end_of_turn(built, monkeypatch, capsys):
    from lmforge.cli import main
    from lmforge.model import GPT as Model

    directory, tok, _ = built("qwen2-base")  # eos <|endoftext|>; its turns end at <|im_end|>
    seen = {}
    original = Model.generate

    def spy(self, input_ids, *args, **kwargs):
        seen.update(ids=[list(r) for r in input_ids], eos=kwargs.get("eos_token_id"))
        return original(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(Model, "generate", spy)
    assert main(["generate", "--preset", "tiny", "--tokenizer", str(directory), "--device", "cpu", "--chat",
                 "--prompt", "Hi there", "--max-new-tokens", "2"]) == 0
    chat = [{"role": "user", "content": "Hi there"}]
    assert seen["ids"] == [tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)]
    assert set(seen["eos"]) == {tok.token_to_id("<|im_end|>"), tok.eos_token_id}
    assert "user\nHi there\nassistant\n" in capsys.readouterr().out  # the specials are not printed


def test_encode_pair_starts_from_bos_once_as_the_evaluation_harness(built):
    # lm-evaluation-harness (add_bos_token unset) keeps the tokenizer's bos before the context, and
    # an empty context is the start token alone, the continuation after it without a second bos.
    from lmforge import evaluation

    _, tok, _ = built("llama3")
    bos = tok.bos_token_id
    context, continuation = evaluation.encode_pair(tok, "The capital of France is", " Paris")
    assert context[0] == bos and context.count(bos) == 1
    assert context + continuation == tok.encode("The capital of France is Paris")
    assert evaluation.encode_pair(tok, "", " Paris") == ([bos], tok.encode(" Paris", add_special_tokens=False))
    _, qwen, _ = built("qwen2")  # no bos: eos starts an empty context
    assert evaluation.encode_pair(qwen, "", " Paris") == ([qwen.eos_token_id], qwen.encode(" Paris"))
