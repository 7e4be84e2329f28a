"""`lmforge evaluate perplexity|choice|generate|classify|score`: score a model (or existing outputs).

Every subcommand writes a JSON report (metrics, dataset, model, settings, library versions, time),
the per-example predictions beside it, prints a table, and with --plot writes a PNG. Flags left unset
fall back to the defaults of the functions in lmforge.evaluation / lmforge.metrics.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path
from typing import Any

from lmforge.cli.generate import SAMPLING_FLAGS, add_generation_flags, add_quantize_flag


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="perplexity, multiple choice, generation and classification metrics",
                              description="Evaluate a model (or score existing outputs) and write a JSON report.")
    sub = p.add_subparsers(dest="evaluate_command", metavar="SUBCOMMAND", required=True)

    s = sub.add_parser("perplexity", help="sliding-window perplexity on a text or token file")
    _model_flags(s)
    s.add_argument("--data", required=True, metavar="FILE_OR_DATASET",
                   help="text file, .jsonl/.csv/.tsv (field --text-field, rows joined by blank lines), .npy/.bin tokens, "
                        "or a directory made by `lmforge prepare`")
    s.add_argument("--split", default=None, help="split of a prepared dataset directory (default: val)")
    s.add_argument("--text-field", default=None, help="JSONL field holding the text (default: text)")
    s.add_argument("--max-length", type=int, default=None, help="window length in tokens (default: the model's context)")
    s.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: max-length / 2)")
    s.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the data")
    s.add_argument("--run-dir", default=None, help="also plot this training run's loss curves (REPORT.loss.png)")
    _output_flags(s, "perplexity")
    s.set_defaults(func=run_perplexity)

    s = sub.add_parser("choice", help="zero-shot multiple choice by log-likelihood (acc, acc_norm)")
    _model_flags(s)
    s.add_argument("--data", required=True, metavar="ITEMS.jsonl|.csv|.tsv",
                   help="rows of context, choices (a list; in CSV/TSV a JSON list in the cell), gold (index or text)")
    s.add_argument("--delimiter", default=None, help="text between context and each choice (default: one space)")
    s.add_argument("--limit", type=int, default=None, help="evaluate only the first N items")
    _output_flags(s, "choice")
    s.set_defaults(func=run_choice)

    s = sub.add_parser("generate", help="generate answers for a task, then score them (BLEU/chrF, ROUGE, SQuAD)")
    _model_flags(s)
    s.add_argument("--task", required=True, choices=["translation", "summarization", "qa"])
    s.add_argument("--data", required=True, metavar="FILE.jsonl|.csv|.tsv",
                   help="translation: source/target; summarization: document/summary(ies); qa: context/question/answers")
    s.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows")
    s.add_argument("--template", default=None, help="prompt template with {field} slots (default: the task's)")
    add_generation_flags(s, SAMPLING_FLAGS, max_new_tokens="64 (translation, summarization), 32 (qa)")
    s.add_argument("--use-stemmer", action="store_true", help="ROUGE with Porter stemming (summarization)")
    _output_flags(s, "generate")
    s.set_defaults(func=run_generate)

    s = sub.add_parser("classify", help="accuracy, precision/recall/F1 and confusion matrix of a classifier")
    _model_flags(s)
    s.add_argument("--data", required=True, metavar="VAL.jsonl|.csv|.tsv", help="rows of text and label")
    s.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows")
    _output_flags(s, "classify")
    s.set_defaults(func=run_classify)

    s = sub.add_parser("score", help="score existing predictions against references")
    s.add_argument("--predictions", required=True, metavar="FILE",
                   help=".txt (one per line), .jsonl, .csv or .tsv (field --prediction-field, default: prediction)")
    s.add_argument("--references", default=None, metavar="FILE",
                   help=".txt, .jsonl, .csv or .tsv (lists allowed: several references); default: the predictions "
                        "file's references")
    s.add_argument("--metric", required=True,
                   help="bleu, chrf, chrf++, rouge, squad (exact match + F1) or classification; comma-separated for several")
    s.add_argument("--prediction-field", default=None, help="JSONL field of the predictions")
    s.add_argument("--reference-field", default=None, help="JSONL field of the references")
    s.add_argument("--use-stemmer", action="store_true", help="ROUGE with Porter stemming")
    _output_flags(s, "score")
    s.set_defaults(func=run_score)


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="PATH_OR_NAME", help="checkpoint directory or Hub name")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's directory)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--dtype", default=None, help="run the forward pass in bf16 / fp16 (autocast); default: the model's")
    add_quantize_flag(p)
    p.add_argument("--batch-size", type=int, default=None, help="examples (or windows) per forward pass")


def _output_flags(p: argparse.ArgumentParser, task: str) -> None:
    p.add_argument("--output", default=None, metavar="REPORT.json",
                   help=f"report path; predictions go beside it (default: eval/{task}.json)")
    p.add_argument("--plot", action="store_true", help="also write a PNG plot beside the report")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _set(args: argparse.Namespace, **names: str) -> dict[str, Any]:
    """Options the user gave (flag dest -> function keyword); unset flags keep the function defaults."""
    return {kw: getattr(args, dest) for dest, kw in names.items() if getattr(args, dest) is not None}


def _progress(args: argparse.Namespace) -> bool | None:
    return False if args.no_progress else None  # None: show bars when stderr is a terminal


def _load(args: argparse.Namespace, need_tokenizer: bool = True):
    from lmforge import load_model

    model = load_model(args.model, device=args.device, quantize=args.quantize).optimize_for_decoding()
    if not need_tokenizer:
        return model, None
    from lmforge.tokenizer import Tokenizer

    return model, Tokenizer.from_pretrained(args.tokenizer or getattr(model, "checkpoint_dir", args.model))


def _finish(args: argparse.Namespace, result, dataset: dict | None, model_info: dict | None, started: float,
            run_dir: str | None = None) -> int:
    from lmforge import evaluation

    report = evaluation.build_report(result, dataset=dataset, model=model_info, started=started)
    output = args.output or f"eval/{result.task}.json"
    written = evaluation.write_report(result, report, output, plot=args.plot, run_dir=run_dir)
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        print(evaluation.format_table(result))
        for kind, path in written.items():
            print(f"  {kind}: {path}")
        if args.plot and "plot" not in written and "loss_plot" not in written:
            print("  plot: none for this evaluation (plots exist for perplexity, classification, --run-dir)")
    return 0


def _start(args: argparse.Namespace) -> float:
    """The start time, once the report's files are known to be writable (a bad --output fails before
    any model is loaded or any example is scored)."""
    from lmforge._io import check_writable
    from lmforge.errors import ConfigError
    from lmforge.evaluation import report_paths

    for path in report_paths(args.output or f"eval/{args.evaluate_command}.json").values():
        check_writable(path, ConfigError, "--output")
    return time.time()


def _limit(rows: list, limit: int | None) -> list:
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    return rows[:limit] if limit else rows


def run_perplexity(args: argparse.Namespace) -> int:
    from lmforge import evaluation

    started = _start(args)
    if args.run_dir is not None:
        evaluation.read_run_log(args.run_dir)  # fail before the evaluation, not after it
    data = Path(args.data)
    is_text = not data.is_dir() and data.suffix not in (".npy", ".bin")
    model, tok = _load(args, need_tokenizer=is_text or args.tokenizer is not None)
    ids = evaluation.load_tokens(data, tok, **_set(args, text_field="text_field", max_tokens="max_tokens", split="split"))
    options = _set(args, max_length="max_length", stride="stride", batch_size="batch_size", dtype="dtype")
    _check_window(model, options)
    result = evaluation.evaluate_perplexity(model, ids, progress=_progress(args), **options)
    if data.is_dir():
        dataset = {"path": str(data), "split": args.split or "val", "n_tokens": int(ids.numel())}
    else:
        dataset = evaluation.describe_file(data, n_tokens=int(ids.numel()))
    return _finish(args, result, dataset, evaluation.describe_model(model, args.model), started, args.run_dir)


def _check_window(model, options: dict[str, Any]) -> None:
    from lmforge.errors import ConfigError

    n = model.config.n_positions
    if options.get("max_length", 0) > n:
        raise ConfigError(f"--max-length {options['max_length']} is longer than the model's context "
                          f"(n_positions={n}); use --max-length {n} or less")


CHOICE_FIELDS = ["context", "choices", "gold"]


def run_choice(args: argparse.Namespace) -> int:
    from lmforge import evaluation

    started = _start(args)
    items = _limit(evaluation.read_rows(args.data, columns=CHOICE_FIELDS, json_fields=["choices"]), args.limit)
    model, tok = _load(args)
    result = evaluation.evaluate_choice(model, tok, items, path=args.data, progress=_progress(args),
                                        **_set(args, delimiter="delimiter", batch_size="batch_size", dtype="dtype"))
    dataset = evaluation.describe_file(args.data, n_examples=len(items))
    return _finish(args, result, dataset, evaluation.describe_model(model, args.model), started)


def run_generate(args: argparse.Namespace) -> int:
    from lmforge import evaluation

    started = _start(args)
    rows = _limit(evaluation.read_rows(args.data, json_fields=evaluation.REFERENCE_FIELDS[args.task]), args.limit)
    options = _set(args, **{name: name for name in (*SAMPLING_FLAGS, "do_sample")})
    config = evaluation.generation_config_for(args.task, **options)
    model, tok = _load(args)
    if args.use_stemmer and args.task != "summarization":
        raise ValueError("--use-stemmer applies to --task summarization (ROUGE) only")
    result = evaluation.evaluate_generation(
        model, tok, args.task, rows, generation_config=config, path=args.data, progress=_progress(args),
        score_options={"use_stemmer": True} if args.use_stemmer else None,
        **_set(args, batch_size="batch_size", template="template"),
    )
    dataset = evaluation.describe_file(args.data, n_examples=len(rows))
    return _finish(args, result, dataset, evaluation.describe_model(model, args.model), started)


def run_classify(args: argparse.Namespace) -> int:
    from lmforge import evaluation
    from lmforge.errors import CheckpointError

    started = _start(args)
    rows = _limit(evaluation.read_rows(args.data, columns=["text", "label"]), args.limit)
    try:
        classification = importlib.import_module("lmforge.tasks.classification")
        load_classifier = classification.load_classifier
    except (ImportError, AttributeError):
        raise CheckpointError(
            f"--model {args.model}: lmforge cannot load sequence-classification checkpoints yet; they arrive with "
            f"the fine-tuning feature (lmforge.tasks.classification). To score labels you already have, run "
            f"`lmforge evaluate score --metric classification --predictions P --references R`"
        ) from None
    classifier = load_classifier(args.model, device=args.device)
    if args.quantize is not None:
        classifier.model.quantize(args.quantize)
    result = evaluation.evaluate_classification(classifier.predict, rows, path=args.data, progress=_progress(args),
                                                **_set(args, batch_size="batch_size"))
    dataset = evaluation.describe_file(args.data, n_examples=len(rows))
    return _finish(args, result, dataset, evaluation.describe_model(getattr(classifier, "model", None), args.model),
                   started)


PREDICTION_FIELDS = ("prediction", "text", "output")
REFERENCE_FIELDS = ("references", "reference", "answers", "summaries", "target", "summary", "label")


def run_score(args: argparse.Namespace) -> int:
    from lmforge import evaluation
    from lmforge.errors import DataError

    started = _start(args)
    pred_fields = (args.prediction_field,) if args.prediction_field else PREDICTION_FIELDS
    ref_fields = (args.reference_field,) if args.reference_field else REFERENCE_FIELDS
    predictions = evaluation.read_column(args.predictions, pred_fields, "--predictions")
    if args.references is None:
        if Path(args.predictions).suffix.lower() not in (".jsonl", ".csv", ".tsv"):
            raise DataError(f"--references is required: {args.predictions} is not a .jsonl/.csv/.tsv file that "
                            f"carries them")
        references = evaluation.read_column(args.predictions, ref_fields, "--predictions (references)")
    else:
        references = evaluation.read_column(args.references, ref_fields, "--references")
    if len(predictions) != len(references):
        raise DataError(f"--predictions {args.predictions} has {len(predictions)} rows but --references "
                        f"{args.references or args.predictions} has {len(references)}; they must match line for line")
    options = {"use_stemmer": True} if args.use_stemmer else {}
    if options and args.metric.strip().lower() != "rouge":
        raise ValueError("--use-stemmer applies to --metric rouge only")
    scores = evaluation.score(predictions, references, args.metric, **options)
    result = evaluation.Evaluation("score", scores, {"metric": args.metric, **options},
                                   [{"prediction": p, "references": r} for p, r in zip(predictions, references)])
    if "classification" in scores:
        result.plot_data = {"confusion_matrix": scores["classification"]["confusion_matrix"],
                            "labels": scores["classification"]["labels"]}
    dataset = {"predictions": evaluation.describe_file(args.predictions, n_examples=len(predictions)),
               "references": evaluation.describe_file(args.references) if args.references else None}
    return _finish(args, result, dataset, None, started)
