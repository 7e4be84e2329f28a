"""Run a model over a dataset, score it with lmforge.metrics, and write the report, predictions and plots.

Each `evaluate_*` function (run.py) returns an `Evaluation` (metrics, settings, per-example
predictions); `write_report` (report.py) saves it as `REPORT.json` (atomic) with the predictions
beside it in `REPORT.predictions.jsonl` and, on request, a PNG plot in `REPORT.png` (plots.py).
The CLI (`lmforge evaluate ...`) is a thin layer over these functions.

Data files (data.py) are JSONL (one object per line), or CSV/TSV with a header row whose column
names are those fields (a list, such as `choices`, as JSON in its cell), with the fields of ../shared/data:
translation `source`/`target`, summarization `document`/`summary` (+ `summaries`, all references),
QA `context`/`question`/`answers`, classification `text`/`label`, multiple choice
`context`/`choices`/`gold`.
"""

from lmforge.evaluation.data import load_tokens, read_column, read_jsonl, read_rows, require_fields
from lmforge.evaluation.plots import plot_confusion_matrix, plot_perplexity_by_context
from lmforge.evaluation.report import (
    build_report, describe_file, describe_model, format_table, library_versions, report_paths, write_report,
)
from lmforge.evaluation.run import (
    MAX_NEW_TOKENS, PROMPT_TEMPLATES, REFERENCE_FIELDS, SCORERS, TASK_METRICS, Evaluation, build_prompt,
    encode_pair, evaluate_choice, evaluate_classification, evaluate_generation, evaluate_perplexity, first_line,
    generate_texts, generation_config_for, perplexity_by_context, prompt_template, score, task_references,
)
# A training run's loss curves: the one loss plot lives with the training run it reads.
from lmforge.training.plot import plot_run as plot_loss_curves
from lmforge.training.plot import read_run_log

__all__ = [
    "Evaluation", "MAX_NEW_TOKENS", "PROMPT_TEMPLATES", "REFERENCE_FIELDS", "SCORERS", "TASK_METRICS",
    "build_prompt", "build_report", "describe_file", "describe_model", "encode_pair", "evaluate_choice",
    "evaluate_classification", "evaluate_generation", "evaluate_perplexity", "first_line", "format_table",
    "generate_texts", "generation_config_for", "library_versions", "load_tokens", "perplexity_by_context",
    "plot_confusion_matrix", "plot_loss_curves", "plot_perplexity_by_context", "prompt_template", "read_column",
    "read_jsonl", "read_rows", "read_run_log", "report_paths", "require_fields", "score", "task_references", "write_report",
]
