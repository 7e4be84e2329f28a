"""The report of an evaluation: versions, model and data descriptions, the JSON file with its
predictions and plots beside it, and the table the CLI prints."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from lmforge._io import atomic_path, write_json_atomic
from lmforge.evaluation.plots import plot_confusion_matrix, plot_perplexity_by_context
from lmforge.evaluation.run import Evaluation
from lmforge.quantize import model_quantization
from lmforge.training.plot import plot_run


def library_versions() -> dict[str, str]:
    """Versions of everything that can change a score."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("lmforge", "torch", "numpy", "tokenizers", "sacrebleu", "rouge-score", "scikit-learn"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def describe_model(model: torch.nn.Module | None, path: str | os.PathLike | None = None) -> dict[str, Any] | None:
    if model is None:
        return {"path": str(path)} if path else None
    c = model.config
    p = next(model.parameters())
    return {"path": str(path or getattr(model, "checkpoint_dir", "")), "n_layer": c.n_layer, "n_head": c.n_head,
            "n_embd": c.n_embd, "n_positions": c.n_positions, "vocab_size": c.vocab_size,
            "parameters": model.num_parameters() if hasattr(model, "num_parameters") else sum(q.numel() for q in model.parameters()),
            "dtype": str(p.dtype).removeprefix("torch."), "device": str(p.device),
            "quantization": model_quantization(model)}


def describe_file(path: str | os.PathLike, **extra: Any) -> dict[str, Any]:
    """Path, size and SHA-256 of a data file, so a report says exactly what was scored."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": digest.hexdigest(), **extra}


def build_report(result: Evaluation, *, dataset: dict[str, Any] | None, model: dict[str, Any] | None,
                 started: float) -> dict[str, Any]:
    """The JSON report: metrics, dataset, model, settings, library versions and time."""
    return {
        "task": result.task, "metrics": _jsonable(result.metrics), "dataset": dataset, "model": model,
        "settings": _jsonable(result.settings), "versions": library_versions(),
        "time": {"started": _dt.datetime.fromtimestamp(started, _dt.timezone.utc).isoformat(timespec="seconds"),
                 "seconds": round(time.time() - started, 3)},
    }


def report_paths(report_path: str | os.PathLike) -> dict[str, Path]:
    """REPORT.json -> the report, REPORT.predictions.jsonl and REPORT.png beside it."""
    path = Path(report_path)
    stem = path.with_suffix("") if path.suffix == ".json" else path
    return {"report": stem.with_suffix(".json"), "predictions": Path(f"{stem}.predictions.jsonl"),
            "plot": stem.with_suffix(".png")}


def write_report(result: Evaluation, report: dict[str, Any], report_path: str | os.PathLike, *,
                 plot: bool = False, run_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write the report (atomically), the predictions beside it, with `plot` the PNG, and with
    `run_dir` that training run's loss curves (REPORT.loss.png). Returns the paths written."""
    paths = report_paths(report_path)
    written = {}
    if result.predictions:
        with atomic_path(paths["predictions"]) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for row in result.predictions:
                f.write(json.dumps(_jsonable(row), ensure_ascii=False) + "\n")
        written["predictions"] = paths["predictions"]
        report = {**report, "predictions_file": paths["predictions"].name}
    if plot:
        if "confusion_matrix" in result.plot_data:
            plot_confusion_matrix(result.plot_data["confusion_matrix"], result.plot_data["labels"], paths["plot"])
            written["plot"] = paths["plot"]
        elif "token_nll" in result.plot_data:
            plot_perplexity_by_context(result.plot_data["context_length"], result.plot_data["token_nll"], paths["plot"])
            written["plot"] = paths["plot"]
    if run_dir is not None:
        loss_png = Path(f"{paths['report'].with_suffix('')}.loss.png")
        plot_run(run_dir, loss_png)
        written["loss_plot"] = loss_png
    if plot or run_dir is not None:
        report = {**report, "plots": [p.name for k, p in written.items() if k.endswith("plot")]}
    write_json_atomic(paths["report"], report)
    written["report"] = paths["report"]
    return written


_NOT_IN_TABLE = ("confusion_matrix", "labels", "per_example", "by_context", "predictions", "predictions_norm",
                 "per_class", "macro", "micro", "weighted", "signature")


def format_table(result: Evaluation) -> str:
    """The headline numbers as aligned `name  value` rows (nested results flattened with dots), then
    sacrebleu signatures, and for classification a per-class report and the confusion matrix."""
    rows = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if k not in _NOT_IN_TABLE:
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, bool):
            rows.append((prefix, str(value)))
        elif isinstance(value, float):
            rows.append((prefix, f"{value:.4f}"))
        elif isinstance(value, (int, str)):
            rows.append((prefix, str(value)))

    walk("", result.metrics)
    rows += [("signature", sig) for sig in _find_key(result.metrics, "signature")]
    width = max((len(name) for name, _ in rows), default=0)
    lines = [result.task] + [f"  {name:<{width}}  {value}" for name, value in rows]
    for report in _find_dicts_with(result.metrics, "confusion_matrix"):
        lines += _classification_lines(report)
    return "\n".join(lines)


def _classification_lines(report: dict[str, Any]) -> list[str]:
    """scikit-learn's classification_report layout, then the confusion matrix."""
    labels = [str(x) for x in report["labels"]]
    w = max([len(x) for x in labels] + [12])
    lines = [f"  {'':>{w}}  {'precision':>9}  {'recall':>9}  {'f1':>9}  {'support':>9}"]
    named = list(zip(labels, report["per_class"].values())) + [
        (f"{avg} avg", report[avg]) for avg in ("macro", "micro", "weighted")]
    for name, m in named:
        lines.append(f"  {name:>{w}}  {m['precision']:9.4f}  {m['recall']:9.4f}  {m['f1']:9.4f}  {m['support']:9d}")
    matrix = report["confusion_matrix"]
    c = max([len(x) for x in labels] + [len(str(v)) for r in matrix for v in r] + [4])
    lines.append("  confusion matrix (rows: reference, columns: prediction)")
    lines.append("  " + " " * c + "  " + "  ".join(f"{x:>{c}}" for x in labels))
    lines += [f"  {label:>{c}}  " + "  ".join(f"{v:>{c}}" for v in r) for label, r in zip(labels, matrix)]
    return lines


def _find_dicts_with(obj: Any, key: str) -> list[dict[str, Any]]:
    if not isinstance(obj, dict):
        return []
    return ([obj] if key in obj else []) + [d for v in obj.values() for d in _find_dicts_with(v, key)]


def _find_key(obj: Any, key: str) -> list[Any]:
    if not isinstance(obj, dict):
        return []
    return ([obj[key]] if key in obj else []) + [x for v in obj.values() for x in _find_key(v, key)]


def _jsonable(obj: Any) -> Any:
    """Plain JSON types: tensors and numpy values become lists/numbers, dict keys strings."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item") and hasattr(obj, "dtype"):  # numpy scalar
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj
