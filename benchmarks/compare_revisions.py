"""This checkout's lmforge against an earlier git revision of it, in one process, on the same weights.

Whole benchmark runs on a shared host swing by 10% or more between minutes, which hides a few
percent of regression. Here both versions step the same model alternately (the earlier revision is
extracted with `git archive` and imported as `lmforge_before`), so both see the same host state:
GPT-2-small-shaped greedy decode steps (fp32/bf16/int8, batch 1 and 8, after optimize_for_decoding) and
nanoGPT baby training iterations (forward, backward, AdamW). One JSON line per figure; value = this
checkout's median time, peer = the revision's, ratio = peer / value (above 1: this checkout is faster).

    python benchmarks/compare_revisions.py --before 398d08a [--quick] [--batches 1,8,64] [--dtypes fp32] [--no-train]
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def import_revision(rev: str, into: Path):
    """lmforge as of `rev`, importable as lmforge_before (its own imports rewritten to that name)."""
    data = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src/lmforge"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    package = into / "lmforge_before"
    (into / "src" / "lmforge").rename(package)
    for path in package.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        path.write_text(re.sub(r"\blmforge(?=[ .\n])", "lmforge_before", text), encoding="utf-8")
    sys.path.insert(0, str(into))
    return importlib.import_module("lmforge_before")


def forward_class(package: str):
    """generation's Forward, wherever the revision keeps it."""
    for module in (f"{package}.generation.forward", f"{package}.generation.decode"):
        try:
            return importlib.import_module(module).Forward
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"{package} has no generation Forward")


def alternate(step: dict, blocks: int, per_block: int) -> tuple[float, float]:
    """Median ms per call of step['after'] and step['before'], run in alternating blocks."""
    times = {"after": [], "before": []}
    for i in range(blocks):
        for name in (("before", "after") if i % 2 else ("after", "before")):
            start = time.perf_counter()
            for _ in range(per_block):
                step[name]()
            times[name].append((time.perf_counter() - start) / per_block * 1e3)
    return statistics.median(times["after"]), statistics.median(times["before"])


def emit(name: str, ms_after: float, ms_before: float, **conditions) -> None:
    print(json.dumps({"name": name, "value": round(ms_after, 3), "unit": "ms", "peer": round(ms_before, 3),
                      "ratio": round(ms_before / ms_after, 3), "conditions": conditions}), flush=True)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16}


def dtype_list(text: str) -> list[str]:
    names = text.split(",")
    unknown = [d for d in names if d not in DTYPES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown dtype {unknown[0]!r}; choose from {', '.join(DTYPES)}")
    return names


def models(after, before, config: dict, dtype: str = "fp32"):
    """Both revisions' GPT with the same weights; dtype "int8" is bf16 with int8 weight-only linears."""
    torch.manual_seed(0)
    new = after.GPT(after.GPTConfig(**config))
    old = before.GPT(before.GPTConfig(**config))
    old.load_state_dict(new.state_dict())
    new, old = new.to(DTYPES[dtype]), old.to(DTYPES[dtype])
    return (new.quantize("int8"), old.quantize("int8")) if dtype == "int8" else (new, old)


def decode(after, before, args, common: dict) -> None:
    config = dict(n_layer=4, n_embd=256, n_head=4) if args.quick else {}
    forwards = {"after": forward_class("lmforge"), "before": forward_class("lmforge_before")}
    for dtype in args.dtypes:
        new, old = models(after, before, config, dtype)
        nets = {"after": new.eval().optimize_for_decoding(), "before": old.eval().optimize_for_decoding()}
        for batch in args.batches:
            ids = torch.randint(0, new.config.vocab_size, (batch, 32), generator=torch.Generator().manual_seed(0))
            token = torch.full((batch,), 5)
            with torch.inference_mode():
                states = {k: forwards[k](nets[k], batch, nets[k].config.n_positions, None) for k in nets}
                for state in states.values():
                    state.prefill(ids, None)
                step = {k: (lambda s=state: s.step(token)) for k, state in states.items()}
                ms_after, ms_before = alternate(step, args.blocks, 5)
            emit("decode_step_ms", ms_after, ms_before, dtype=dtype, batch=batch,
                 model=config or "gpt2 small shape", **common)


def train(after, before, args, common: dict) -> None:
    for dropout in (0.0, 0.2):
        config = dict(n_layer=4, n_head=4, n_embd=128, n_positions=256, vocab_size=65,
                      embd_pdrop=dropout, attn_pdrop=dropout, resid_pdrop=dropout)
        new, old = models(after, before, config)
        nets = {"after": new.train(), "before": old.train()}
        optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in nets.items()}
        batch = torch.randint(0, 65, (12, 65), generator=torch.Generator().manual_seed(0))

        def iteration(k: str) -> None:
            nets[k](batch[:, :-1], batch[:, 1:]).loss.backward()
            optimizers[k].step()
            optimizers[k].zero_grad(set_to_none=True)

        ms_after, ms_before = alternate({k: (lambda k=k: iteration(k)) for k in nets}, args.blocks, 5)
        emit("train_iteration_ms", ms_after, ms_before, model="nanoGPT baby 4x4x128, batch 12 x 64",
             dropout=dropout, **common)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="the git revision to compare with (e.g. a commit or tag)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--blocks", type=int, default=40, help="alternating blocks per figure (5 calls each)")
    p.add_argument("--quick", action="store_true", help="smoke run: a small model, 4 blocks")
    p.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8],
                   help="decode batch sizes (default: 1,8)")
    p.add_argument("--dtypes", type=dtype_list, default=["fp32", "bf16"],
                   help="decode dtypes: fp32, bf16, int8 (bf16 activations) (default: fp32,bf16)")
    p.add_argument("--no-train", action="store_true", help="decode steps only")
    args = p.parse_args()
    if args.quick:
        args.blocks = 4
    torch.set_num_threads(args.threads)
    import lmforge

    with tempfile.TemporaryDirectory() as tmp:
        before = import_revision(args.before, Path(tmp))
        common = dict(before=args.before, threads=args.threads, torch=torch.__version__, blocks=args.blocks)
        decode(lmforge, before, args, common)
        if not args.no_train:
            train(lmforge, before, args, common)


if __name__ == "__main__":
    main()
