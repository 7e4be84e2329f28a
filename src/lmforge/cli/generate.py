"""`lmforge generate`: continue prompts from a checkpoint (or a random preset) and print them numbered.

    lmforge generate --model gpt2 --prompt "Once upon a time" --max-length 50 --num-return-sequences 5 --do-sample
    echo "Hello" | lmforge generate --preset tiny --prompt - --stream --seed 0
    lmforge generate --model ./qwen2.5-0.5b-instruct --chat --prompt "Name three colours." --max-new-tokens 40

Generation flags default to unset, so GenerationConfig's defaults apply (they live only there).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from lmforge.errors import DataError

RULE = 100 * "-"

# Flags that map one-to-one onto GenerationConfig fields (the name with _ for -): type, help.
_OPTION_FLAGS: dict[str, tuple[type, str]] = {
    "max_length": (int, "total length, prompt included"),
    "max_new_tokens": (int, "tokens to generate after the prompt"),
    "min_new_tokens": (int, "do not stop at eos before this many new tokens"),
    "temperature": (float, "sampling temperature, > 0"),
    "top_k": (int, "sample from the k most likely tokens (0: all)"),
    "top_p": (float, "sample from the smallest set of tokens with this much probability, in (0, 1]"),
    "repetition_penalty": (float, "> 1 discourages tokens already present"),
    "no_repeat_ngram_size": (int, "never repeat an n-gram of this size (0: off)"),
    "num_return_sequences": (int, "generations per prompt; more than one without --num-beams implies --do-sample"),
    "num_beams": (int, "beam search with this many beams (1: off)"),
    "length_penalty": (float, "beam search: score / length ** this"),
    "seed": (int, "seed for sampling"),
}
# The flags `evaluate generate` and `run` share with `generate` (with --do-sample).
SAMPLING_FLAGS = ("max_new_tokens", "num_beams", "temperature", "top_k", "top_p", "seed")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="generate text from a prompt (greedy, sampling, beam search, streaming)",
        description="Continue a prompt with a checkpoint (directory or Hub name) or a randomly initialised "
                    "preset, and print the numbered generations.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="PATH_OR_NAME", help="checkpoint directory or Hub name (e.g. gpt2)")
    source.add_argument("--preset", metavar="NAME",
                        help="a randomly initialised preset (e.g. tiny; seeded by --seed) with the byte-level "
                             "tokenizer: works offline")
    p.add_argument("--tokenizer", metavar="PATH", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument("--prompt", required=True, help='the prompt text, or "-" to read prompts from stdin, one per line')
    p.add_argument("--chat", action="store_true",
                   help="send each prompt as a user message through the model's chat template (default template: "
                        "User:/Assistant:) and stop at the end of the assistant's turn")
    add_generation_flags(p)
    p.add_argument("--early-stopping", choices=["true", "false", "never"], default=None,
                   help="beam search: stop when num_beams hypotheses are finished (default: false)")
    p.add_argument("--eos-token-id", type=int, action="append", default=None,
                   help="stop at this token id (repeatable; default: the model's eos)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--truncate-prompt", action="store_true", default=None,
                   help="keep only the last prompt tokens when prompt + new tokens exceed the context")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
    add_quantize_flag(p)
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.set_defaults(func=run)


def add_quantize_flag(p: argparse._ActionsContainer) -> None:
    """--quantize, for every command that loads a model to run it (generate, serve, evaluate, run)."""
    from lmforge.quantize import MODES

    p.add_argument("--quantize", choices=MODES, default=None,
                   help="weight-only quantization after loading: int8 (per-output-channel scales; activations "
                        "stay in --dtype). Default: none (a checkpoint saved quantized loads quantized)")


def add_generation_flags(p: argparse._ActionsContainer, names: tuple[str, ...] = tuple(_OPTION_FLAGS),
                         max_new_tokens: str = "20 when --max-length is not given either; wins over it") -> None:
    """A flag per GenerationConfig field in `names`, and --do-sample; each help names the dataclass
    default (`max_new_tokens` describes the caller's own). Unset flags stay None."""
    from lmforge.generation import GenerationConfig

    defaults = {f.name: f.default for f in dataclasses.fields(GenerationConfig)}
    for name in names:
        kind, text = _OPTION_FLAGS[name]
        default = max_new_tokens if name == "max_new_tokens" else "unset" if defaults[name] is None else defaults[name]
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=f"{text} (default: {default})")
    p.add_argument("--do-sample", action="store_true", default=None, help="sample instead of greedy/beam search")


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    """The GenerationConfig options the user actually gave (None means "use the dataclass default")."""
    options = {name: getattr(args, name) for name in _OPTION_FLAGS if getattr(args, name) is not None}
    if args.do_sample:
        options["do_sample"] = True
    if options.get("num_return_sequences", 1) > 1 and options.get("num_beams", 1) == 1:
        options["do_sample"] = True  # several greedy sequences would be identical (as the classic GPT-2 example)
    if args.early_stopping is not None:
        options["early_stopping"] = {"true": True, "false": False}.get(args.early_stopping, args.early_stopping)
    if args.eos_token_id:
        options["eos_token_id"] = args.eos_token_id
    if args.stop:
        for text in args.stop:
            check_text(text, "--stop")
        options["stop_strings"] = args.stop
    if args.truncate_prompt:
        options["truncate_prompt"] = True
    return options


def load(args: argparse.Namespace):
    """(model, tokenizer) from --model/--tokenizer, or a seeded random --preset with the byte-level tokenizer."""
    import torch

    from lmforge.tokenizer import Tokenizer

    if args.preset is not None:
        from lmforge.config import preset
        from lmforge.device import resolve_device, resolve_dtype
        from lmforge.model import GPT

        from lmforge.config import SEED_RANGE
        from lmforge.errors import ConfigError

        if args.seed is not None and args.seed not in SEED_RANGE:
            raise ConfigError(f"--seed {args.seed} is out of range: use 0..{SEED_RANGE.stop - 1}")
        tokenizer = Tokenizer.from_pretrained(args.tokenizer) if args.tokenizer else Tokenizer.byte_level()
        config = preset(args.preset, vocab_size=tokenizer.vocab_size,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0 if args.seed is None else args.seed)
        model = GPT(config).eval().to(device=resolve_device(args.device))
        dtype = resolve_dtype(args.dtype)
        model = model if dtype is None else model.to(dtype)
        if args.quantize is not None:
            model.quantize(args.quantize)
        return model.optimize_for_decoding(), tokenizer

    from lmforge import load_model

    model = load_model(args.model, dtype=args.dtype, device=args.device, revision=args.revision,
                       quantize=args.quantize)
    model.optimize_for_decoding()  # this model only generates (here and in `lmforge serve`)
    tokenizer = Tokenizer.from_pretrained(args.tokenizer or getattr(model, "checkpoint_dir", None) or args.model)
    return model, tokenizer


def read_prompts(prompt: str) -> list[str]:
    """--prompt TEXT, or with "-" one prompt per line of stdin; text that is not UTF-8 fails naming
    where it is."""
    if prompt != "-":
        check_text(prompt, "--prompt")
        return [prompt]
    stdin = getattr(sys.stdin, "buffer", None)
    prompts = []
    for n, line in enumerate(stdin if stdin is not None else sys.stdin, 1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"--prompt -: line {n} of stdin is not UTF-8 text (byte 0x{line[e.start]:02x} at "
                                f"offset {e.start}); convert it to UTF-8 first (e.g. iconv -t UTF-8)") from None
        check_text(line, f"--prompt -: line {n} of stdin")
        prompts.append(line.rstrip("\r\n"))
    if not prompts:
        raise ValueError("--prompt -: no prompts on stdin (expected one per line)")
    return prompts


def check_text(text: str, what: str) -> None:
    """DataError naming `what` for text that is not valid Unicode: Python turns a non-UTF-8 byte of a
    command-line argument into a lone surrogate (U+DC80..U+DCFF), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        what_char = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        raise DataError(f"{what} is not UTF-8 text ({what_char} at character {e.start}); give UTF-8 text") from None


def run(args: argparse.Namespace) -> int:
    from lmforge.generation import GenerationConfig, resolve_config

    prompts = read_prompts(args.prompt)
    options = generation_options(args)
    config = GenerationConfig(**options)  # bad options fail here, before a model is loaded
    if args.stream and config.is_beam_search:
        raise ValueError("--stream works with greedy and sampling decoding, not --num-beams > 1")
    model, tokenizer = load(args)
    resolve_config(model, None, **options)  # eos/pad ids checked against the model before any output
    template = None
    if args.chat:
        template, options = chat_options(model, tokenizer, options)
    for prompt in prompts:
        if template is None:
            ids = tokenizer.encode(prompt)
        else:
            ids = template.encode(tokenizer, [{"role": "user", "content": prompt}])
        if args.stream:
            print("Output:\n" + RULE)
            _stream(model, tokenizer, ids, options)
        else:
            out = model.generate([ids], None, tokenizer=tokenizer, **options)
            print("Output:\n" + RULE)
            for i, row in enumerate(out.tolist()):
                print(f"{i}: {_text(tokenizer, row)}")
    return 0


def chat_options(model: Any, tokenizer: Any, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The tokenizer's chat template, and `options` that also stop where it ends the assistant's turn:
    its end-of-turn token ids beside the model's eos, and its stop strings."""
    from lmforge.generation import resolve_config
    from lmforge.serve.chat import ChatTemplate

    template = ChatTemplate.for_tokenizer(tokenizer)
    eos = list(resolve_config(model, None, **options).eos_token_id or [])
    options = {**options, "eos_token_id": eos + [t for t in template.stop_token_ids if t not in eos]}
    if template.stop:
        options["stop_strings"] = list(options.get("stop_strings") or []) + template.stop
    return template, options


def _text(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def _stream(model: Any, tokenizer: Any, ids: list[int], options: dict[str, Any]) -> None:
    """Print sequence 0 live; sequences that run ahead of the one on screen are held and printed in
    order. The tokens are exactly those of the non-streaming run with the same seed."""
    from lmforge.generation import IncrementalDecoder, stream

    n = options.get("num_return_sequences", 1)
    prompt_text = _text(tokenizer, ids)
    decoders = [IncrementalDecoder(tokenizer, skip_special_tokens=True) for _ in range(n)]
    held = [""] * n
    done = [False] * n
    shown = 0  # the row being printed live
    print(f"0: {prompt_text}", end="", flush=True)
    for step in stream(model, [ids], None, tokenizer=tokenizer, **options):
        for row, token in enumerate(step.tokens.tolist()):
            if not done[row]:
                held[row] += decoders[row].push(token)
                done[row] = bool(step.finished[row])
                if done[row]:
                    held[row] += decoders[row].flush()
        while shown < n:
            print(held[shown], end="", flush=True)
            held[shown] = ""
            if not done[shown]:
                break
            shown += 1
            print()
            if shown < n:
                print(f"{shown}: {prompt_text}", end="", flush=True)
