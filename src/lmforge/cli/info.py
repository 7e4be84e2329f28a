"""`lmforge info PATH_OR_NAME`: architecture, parameter count, dtype, quantization and size of a checkpoint."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="show a checkpoint's architecture, size and dtype",
                              description="Show architecture, parameter count, dtype and size on disk of a "
                                          "checkpoint directory or Hugging Face Hub name.")
    p.add_argument("model", metavar="PATH_OR_NAME", help="checkpoint directory or Hub name (e.g. gpt2)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _quantization(qc: dict | None) -> str:
    """config.json's quantization_config in a few words ("none" for float weights)."""
    if qc is None:
        return "none"
    if not isinstance(qc, dict) or qc.get("quant_method") != "lmforge":
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        return f"{method} (not loadable by lmforge)"
    head = qc.get("lm_head_group_size")
    head = f", LM head per group of {head}" if head else ""
    return (f"{qc.get('weight_dtype')} weight-only, {str(qc.get('granularity')).replace('_', '-')} scales{head} "
            f"(lmforge format {qc.get('format_version')})")


def run(args: argparse.Namespace) -> int:
    from lmforge.checkpoint import checkpoint_info

    info = checkpoint_info(args.model, revision=args.revision)
    c = info.config
    rows = {
        "path": str(info.directory),
        "architecture": f"{c.family} (decoder-only), {c.n_layer} layers x {c.n_head} heads, n_embd {c.n_embd}",
        "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "n_inner": c.inner_dim,
        "n_positions": c.n_positions, "vocab_size": c.vocab_size, "activation": c.activation,
        "tie_word_embeddings": c.tie_word_embeddings,
        "parameters": info.num_parameters,
        "dtype": ", ".join(info.dtypes),
        "quantization": _quantization(info.quantization),
        "weights": info.weights_file,
        "size_on_disk": info.size_on_disk,
    }
    if args.json:
        print(json.dumps(rows))
        return 0
    for key, value in rows.items():
        if key == "parameters":
            value = f"{value:,} ({value / 1e6:.1f}M)"
        elif key == "size_on_disk":
            value = f"{_human_bytes(value)} ({value:,} bytes)"
        print(f"{key:>20}: {value}")
    return 0
