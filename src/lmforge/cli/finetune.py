"""`lmforge finetune classify|sft`: fine-tune a checkpoint on labeled JSONL, CSV or TSV with the shared trainer.

    lmforge finetune classify --model gpt2 --train sst2/train.jsonl --val sst2/validation.jsonl --out runs/sst2
    lmforge finetune sft --model gpt2 --task translation --train multi30k/train.jsonl --val multi30k/validation.jsonl \
        --out runs/mt --lora-rank 8 --lora-alpha 16 --lora-targets c_attn c_proj
    lmforge finetune sft --model LLAMA_DIR --task qa --train qa.jsonl --out runs/qa --lora-rank 8 --lora-targets q_proj v_proj
    lmforge finetune classify --preset tiny --train train.csv --out runs/smoke   # random weights, offline
    lmforge finetune classify --out runs/smoke --resume --max-steps 2000   # the rest from runs/smoke/config.json
    torchrun --nproc_per_node 2 -m lmforge finetune sft ...

Every TrainConfig field is a flag as in `lmforge pretrain` (defaults live in TrainConfig). With
--resume, the options left out (the base model, the data, fields, templates, LoRA) come from the run's
config.json; an option given that differs from the run's is refused when training starts.
"""

from __future__ import annotations

import argparse

from lmforge.cli.pretrain import add_train_flags, train_config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("finetune", help="fine-tune: classification heads, SFT (translation, summarization, QA), LoRA",
                              description="Fine-tune a pretrained model on labeled JSONL, CSV or TSV (a header row "
                                          "of column names: the JSONL keys); the result is a normal model "
                                          "directory (RUN/model, and RUN/best for the best validation score).")
    sub = p.add_subparsers(dest="finetune_command", metavar="SUBCOMMAND", required=True)

    c = sub.add_parser("classify", help="sequence classification (sentiment or any label set)")
    _common(c)
    c.add_argument("--text-field", default=None, help="field (CSV/TSV column) with the text (default: text)")
    c.add_argument("--label-field", default=None,
                   help="field with the label, a string or int; a CSV/TSV column of whole numbers holds class ids "
                        "(default: label)")
    c.add_argument("--class-weights", default=None, metavar="balanced|W1,W2,..",
                   help="weight the loss per class: 'balanced' (n / (k * count)) or one number per label in sorted label order")
    c.add_argument("--eval-limit", type=int, default=None, help="compute accuracy / F1 on the first N val examples only")
    add_train_flags(c)
    c.set_defaults(func=run_classify)

    s = sub.add_parser("sft", help="supervised fine-tuning on prompt/response pairs (loss on the response only)")
    _common(s)
    s.add_argument("--task", default=None, choices=["translation", "summarization", "qa", "chat", "custom"],
                   help="picks the template: translation (source, target), summarization (document, summary), "
                        "qa (context, question, answers), chat (messages, rendered by the tokenizer's chat "
                        "template; loss on the assistant turns; in CSV/TSV the messages cell holds JSON), "
                        "custom (give both templates); required unless --resume")
    s.add_argument("--prompt-template", default=None, help="override the prompt, with {field} slots, e.g. 'Q: {question}\\nA:'")
    s.add_argument("--response-template", default=None, help="override the response, e.g. ' {answer}' (eos is appended)")
    s.add_argument("--document-field", default=None,
                   help="field shortened when an example is too long (default: source / document / context)")
    s.add_argument("--pack", action="store_true", default=None, help="pack several short examples into each row")
    add_train_flags(s)
    s.set_defaults(func=run_sft)


def _common(p: argparse.ArgumentParser) -> None:
    base = p.add_mutually_exclusive_group()
    base.add_argument("--model", metavar="PATH_OR_NAME",
                      help="the pretrained model: a checkpoint directory, else a Hugging Face Hub name (e.g. gpt2); "
                           "this or --preset is required unless --resume")
    base.add_argument("--preset", metavar="NAME",
                      help="start from random weights of a preset instead (e.g. tiny; smoke tests) with the "
                           "byte-level tokenizer unless --tokenizer says otherwise")
    p.add_argument("--train", default=None, metavar="TRAIN.jsonl|.csv|.tsv",
                   help="training rows: JSONL, or CSV/TSV with a header row naming the fields (required unless --resume)")
    p.add_argument("--val", default=None, metavar="VAL.jsonl|.csv|.tsv")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory, Hub name or 'byte' (default: the model's)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per example (default: the model's context)")
    p.add_argument("--lora-rank", type=int, default=None, help="train LoRA adapters of this rank; the base stays frozen")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator: update = alpha / rank * B A (default: 2 x rank)")
    p.add_argument("--lora-targets", nargs="+", default=None, metavar="NAME",
                   help="projections to adapt: GPT-2 c_attn attn.c_proj c_fc mlp.c_proj (default: c_attn); Llama family "
                        "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj (default: q_proj v_proj); or name "
                        "suffixes, re:REGEX")
    p.add_argument("--group-by-length", action="store_true", default=None,
                   help="batch examples of similar length together (less padding; much faster on short texts)")
    p.add_argument("--no-plot", action="store_true", help="skip the loss plot (RUN/loss.png)")
    p.add_argument("--lora-dropout", type=float, default=None, help="dropout on the adapter input (default: 0)")


# Recipe options of each subcommand that --resume takes from RUN/config.json when they are left out.
RESUMED = {
    "classify": ("model", "preset", "train", "val", "tokenizer", "text_field", "label_field", "class_weights",
                 "max_length", "eval_limit", "group_by_length"),
    "sft": ("model", "preset", "train", "val", "tokenizer", "task", "prompt_template", "response_template",
            "document_field", "pack", "max_length", "group_by_length"),
}


def _resolve(args: argparse.Namespace, config, kind: str) -> None:
    """With --resume, fill the options left out from the run's saved recipe (what is left unset keeps
    the API's default); without it, the base model and the training data are required."""
    from lmforge.errors import ConfigError

    if config.resume:
        from lmforge.training.checkpointing import RunDir

        saved = RunDir(config.out_dir).read_config() or {}
        task = str(saved.get("task", ""))
        if saved and (task == "classify") != (kind == "classify"):
            raise ConfigError(f"--resume: {config.out_dir} is a {task or 'pretraining'} run, not a finetune {kind} "
                              f"run; resume it with its own command")
        recipe = saved.get("recipe") or {}
        base_given = args.model is not None or args.preset is not None
        for name in RESUMED[kind]:
            if name in ("model", "preset") and base_given:
                continue
            if getattr(args, name) is None and recipe.get(name) is not None:
                setattr(args, name, recipe[name])
        if args.lora_rank is None and recipe.get("lora"):
            lora = recipe["lora"]
            args.lora_rank, args.lora_targets = lora["rank"], args.lora_targets or lora.get("targets")
            args.lora_alpha = lora["alpha"] if args.lora_alpha is None else args.lora_alpha
            args.lora_dropout = lora.get("dropout") if args.lora_dropout is None else args.lora_dropout
    if args.model is None and args.preset is None:
        raise ConfigError(f"lmforge finetune {kind}: give the base model with --model DIR_OR_HUB_NAME (or --preset "
                          f"NAME for random weights), or --resume with the --out directory of a run")
    if args.train is None:
        raise ConfigError(f"lmforge finetune {kind}: give the training data with --train FILE (.jsonl, .csv or "
                          f".tsv), or --resume with the --out directory of a run")
    if kind == "sft" and args.task is None:
        raise ConfigError("lmforge finetune sft: --task is required (translation, summarization, qa, chat or custom)")


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
    _resolve(args, config, "classify")
    outcome = finetune_classifier(
        config, args.model, args.train, args.val, preset=args.preset,
        **_given(args, "text_field", "label_field", "group_by_length"),
        tokenizer=args.tokenizer, class_weights=args.class_weights, lora=_lora(args), max_length=args.max_length,
        eval_limit=args.eval_limit, plot=not args.no_plot,
    )
    return _report(outcome)


def run_sft(args: argparse.Namespace) -> int:
    from lmforge.tasks.finetune import finetune_sft

    config = train_config_from_args(args)
    _resolve(args, config, "sft")
    outcome = finetune_sft(
        config, args.model, args.train, args.val, preset=args.preset, task=args.task,
        prompt_template=_unescape(args.prompt_template),
        response_template=_unescape(args.response_template), document_field=args.document_field,
        tokenizer=args.tokenizer, lora=_lora(args), max_length=args.max_length, plot=not args.no_plot,
        **_given(args, "pack", "group_by_length"),
    )
    return _report(outcome)


def _given(args: argparse.Namespace, *names: str) -> dict:
    """The options given (or taken from a resumed run); the others keep the API's defaults."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _unescape(text: str | None) -> str | None:
    """Shell users type '\\n' for a newline in a template."""
    return None if text is None else text.replace("\\n", "\n").replace("\\t", "\t")
