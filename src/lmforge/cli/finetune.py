"""`lmforge finetune classify|sft`: fine-tune a GPT-2 checkpoint on labeled JSONL with the shared trainer.

    lmforge finetune classify --model gpt2 --train sst2/train.jsonl --val sst2/validation.jsonl --out runs/sst2
    lmforge finetune sft --model gpt2 --task translation --train multi30k/train.jsonl --val multi30k/validation.jsonl \
        --out runs/mt --lora-rank 8 --lora-alpha 16 --lora-targets c_attn c_proj
    lmforge finetune sft --model LLAMA_DIR --task qa --train qa.jsonl --out runs/qa --lora-rank 8 --lora-targets q_proj v_proj
    lmforge finetune classify --preset tiny --train train.jsonl --out runs/smoke   # random weights, offline
    torchrun --nproc_per_node 2 -m lmforge finetune sft ...

Every TrainConfig field is a flag as in `lmforge pretrain` (defaults live in TrainConfig).
"""

from __future__ import annotations

import argparse

from lmforge.cli.pretrain import add_train_flags, train_config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("finetune", help="fine-tune: classification heads, SFT (translation, summarization, QA), LoRA",
                              description="Fine-tune a pretrained model on labeled JSONL; the result is a normal model "
                                          "directory (RUN/model, and RUN/best for the best validation score).")
    sub = p.add_subparsers(dest="finetune_command", metavar="SUBCOMMAND", required=True)

    c = sub.add_parser("classify", help="sequence classification (sentiment or any label set)")
    _common(c)
    c.add_argument("--text-field", default="text", help="JSONL field with the text (default: text)")
    c.add_argument("--label-field", default="label", help="JSONL field with the label, a string or int (default: label)")
    c.add_argument("--class-weights", default=None, metavar="balanced|W1,W2,..",
                   help="weight the loss per class: 'balanced' (n / (k * count)) or one number per label in sorted label order")
    c.add_argument("--eval-limit", type=int, default=None, help="compute accuracy / F1 on the first N val examples only")
    add_train_flags(c)
    c.set_defaults(func=run_classify)

    s = sub.add_parser("sft", help="supervised fine-tuning on prompt/response pairs (loss on the response only)")
    _common(s)
    s.add_argument("--task", required=True, choices=["translation", "summarization", "qa", "chat", "custom"],
                   help="picks the template: translation (source, target), summarization (document, summary), "
                        "qa (context, question, answers), chat (messages, rendered by the tokenizer's chat "
                        "template; loss on the assistant turns), custom (give both templates)")
    s.add_argument("--prompt-template", default=None, help="override the prompt, with {field} slots, e.g. 'Q: {question}\\nA:'")
    s.add_argument("--response-template", default=None, help="override the response, e.g. ' {answer}' (eos is appended)")
    s.add_argument("--document-field", default=None,
                   help="field shortened when an example is too long (default: source / document / context)")
    s.add_argument("--pack", action="store_true", help="pack several short examples into each row")
    add_train_flags(s)
    s.set_defaults(func=run_sft)


def _common(p: argparse.ArgumentParser) -> None:
    base = p.add_mutually_exclusive_group(required=True)
    base.add_argument("--model", metavar="PATH_OR_NAME",
                      help="the pretrained model: a checkpoint directory, else a Hugging Face Hub name (e.g. gpt2)")
    base.add_argument("--preset", metavar="NAME",
                      help="start from random weights of a preset instead (e.g. tiny; smoke tests) with the "
                           "byte-level tokenizer unless --tokenizer says otherwise")
    p.add_argument("--train", required=True, metavar="TRAIN.jsonl")
    p.add_argument("--val", default=None, metavar="VAL.jsonl")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory, Hub name or 'byte' (default: the model's)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per example (default: the model's context)")
    p.add_argument("--lora-rank", type=int, default=None, help="train LoRA adapters of this rank; the base stays frozen")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator: update = alpha / rank * B A (default: 2 x rank)")
    p.add_argument("--lora-targets", nargs="+", default=None, metavar="NAME",
                   help="projections to adapt: GPT-2 c_attn attn.c_proj c_fc mlp.c_proj (default: c_attn); Llama family "
                        "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj (default: q_proj v_proj); or name "
                        "suffixes, re:REGEX")
    p.add_argument("--group-by-length", action="store_true",
                   help="batch examples of similar length together (less padding; much faster on short texts)")
    p.add_argument("--no-plot", action="store_true", help="skip the loss plot (RUN/loss.png)")
    p.add_argument("--lora-dropout", type=float, default=None, help="dropout on the adapter input (default: 0)")


def _lora(args: argparse.Namespace):
    from lmforge.errors import ConfigError
    from lmforge.tasks.finetune import LoRASettings

    if args.lora_rank is None:
        if args.lora_alpha is not None or args.lora_targets or args.lora_dropout is not None:
            raise ConfigError("--lora-alpha / --lora-targets / --lora-dropout need --lora-rank")
        return None
    return LoRASettings(rank=args.lora_rank, alpha=args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank,
                        targets=args.lora_targets, dropout=args.lora_dropout or 0.0)


def _report(outcome) -> int:
    r = outcome.result
    if r is None or not outcome.is_main:
        return 0
    shown = ", ".join(f"{k} {v:.4f}" for k, v in r.metrics.items() if k not in ("step", "tokens"))
    print(f"trained {r.step} steps, {r.tokens:,} tokens in {r.elapsed:.1f} s (stopped by {r.stopped_by}); {shown}")
    print(f"model: {r.model_dir}")
    if r.best_dir:
        print(f"best: {r.best_dir}")
    return 0


def run_classify(args: argparse.Namespace) -> int:
    from lmforge.tasks.finetune import finetune_classifier

    config = train_config_from_args(args)
    outcome = finetune_classifier(
        config, args.model, args.train, args.val, preset=args.preset, text_field=args.text_field,
        label_field=args.label_field,
        tokenizer=args.tokenizer, class_weights=args.class_weights, lora=_lora(args), max_length=args.max_length,
        eval_limit=args.eval_limit, group_by_length=args.group_by_length, plot=not args.no_plot,
    )
    return _report(outcome)


def run_sft(args: argparse.Namespace) -> int:
    from lmforge.tasks.finetune import finetune_sft

    config = train_config_from_args(args)
    outcome = finetune_sft(
        config, args.model, args.train, args.val, preset=args.preset, task=args.task,
        prompt_template=_unescape(args.prompt_template),
        response_template=_unescape(args.response_template), document_field=args.document_field,
        tokenizer=args.tokenizer, pack=args.pack, lora=_lora(args), max_length=args.max_length,
        group_by_length=args.group_by_length, plot=not args.no_plot,
    )
    return _report(outcome)


def _unescape(text: str | None) -> str | None:
    """Shell users type '\\n' for a newline in a template."""
    return None if text is None else text.replace("\\n", "\n").replace("\\t", "\t")
