"""`lmforge run TASK`: apply a pipeline to a JSONL, CSV or TSV file, with progress, writing the results atomically.

    lmforge run sentiment-analysis --model runs/sst2/best --input reviews.jsonl --output scored.jsonl
    lmforge run translation --model runs/mt/best --input en.jsonl --output de.jsonl --max-new-tokens 40
    lmforge run question-answering --model runs/qa/best --input squad.jsonl --output answers.jsonl
    lmforge run sentiment-analysis --model runs/sst2/best --input reviews.csv --output scored.csv
"""

from __future__ import annotations

import argparse

from lmforge.cli.generate import SAMPLING_FLAGS, add_generation_flags, add_quantize_flag

TASKS = "text-generation, sentiment-analysis (= text-classification), translation, summarization, question-answering"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run", help="apply a pipeline (generation, classification, translation, summarization, QA) to a JSONL, CSV "
                    "or TSV file",
        description="Read one JSON object per line (or, from a .csv / .tsv file, one row per record under a header "
                    "row of field names), apply the task's pipeline, write each row plus the result "
                    "fields (generated_text, label+score, translation_text, summary_text, answer+score+start+end) "
                    "as one JSON line. Input fields: 'text' (or --field) for every task but question-answering, "
                    "which reads 'question' and 'context'. A result field the row already has (e.g. a gold "
                    "'label') is written as predicted_NAME. The output is JSONL, or CSV/TSV when its name ends in "
                    ".csv / .tsv; it appears only when every row is done.")
    p.add_argument("task", metavar="TASK", help=TASKS)
    p.add_argument("--model", required=True, help="model directory or Hub name (a classifier for sentiment-analysis)")
    p.add_argument("--input", required=True, metavar="FILE.jsonl|.csv|.tsv")
    p.add_argument("--output", required=True, metavar="FILE.jsonl|.csv|.tsv")
    p.add_argument("--field", default=None, help="input field holding the text (default: text; not for question-answering)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default: 8)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
    add_quantize_flag(p)
    g = p.add_argument_group("generation (text-generation, translation, summarization, question-answering)")
    add_generation_flags(g, SAMPLING_FLAGS, max_new_tokens="50 (text-generation), 64 (translation, summarization), "
                                                           "32 (question-answering)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmforge.tasks.batch_run import run_file

    summary = run_file(
        args.task, args.model, args.input, args.output, field=args.field, batch_size=args.batch_size,
        device=args.device, dtype=args.dtype, quantize=args.quantize, tokenizer=args.tokenizer,
        progress=False if args.no_progress else None,
        **{name: getattr(args, name) for name in (*SAMPLING_FLAGS, "do_sample")},
    )
    print(f"{summary.task}: {summary.rows} rows in {summary.seconds:.1f} s -> {summary.output}")
    return 0
