"""`lmforge merge-lora`: fold LoRA adapters into their base weights and write a plain model directory.

    lmforge merge-lora --adapter runs/mt/model --out exported/            # base from lora_config.json
    lmforge merge-lora --adapter ADAPTER_DIR --base gpt2 --out merged/
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("merge-lora", help="fold LoRA adapters into the base weights (export a plain model)",
                              description="Load the base model, put the adapters of --adapter on it, merge "
                                          "W + alpha/r B A, and save a normal model directory.")
    p.add_argument("--adapter", required=True, metavar="DIR", help="directory with lora_adapter.safetensors + lora_config.json")
    p.add_argument("--base", default=None, metavar="PATH_OR_NAME",
                   help="the base model the adapters were trained on (default: base_model in lora_config.json)")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the merged model")
    p.add_argument("--tokenizer", default=None, help="tokenizer to copy beside it (default: the adapter's or base's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lmforge._io import check_writable
    from lmforge.errors import ConfigError
    from lmforge.tasks.lora import count_parameters, merge_lora_dir

    check_writable(Path(args.out) / "config.json", ConfigError, "--out")  # before the models are loaded
    merged = merge_lora_dir(args.adapter, args.out, base=args.base, tokenizer=args.tokenizer)
    n = count_parameters(merged)[1]
    print(f"merged adapters of {args.adapter} into {n:,} parameters: {args.out}")
    return 0
