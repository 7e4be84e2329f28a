"""Perplexity throughput: lmforge.metrics.perplexity against Hugging Face's documented sliding-window
loop ("Perplexity of fixed-length models") with transformers.GPT2LMHeadModel, same weights, same run.

    python benchmarks/perplexity.py              # GPT-2 small shape, 4096 tokens, window 1024, stride 512
    python benchmarks/perplexity.py --quick      # a smoke run (small model, short text)

One JSON object per figure: name, value, unit, peer, ratio (> 1 = lmforge better), conditions.
Throughput = scored tokens per second of wall time (median of interleaved repeats). The agreement
figure is the relative difference of the two perplexities (they must agree to 1e-4).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def emit(name, value, unit, peer=None, ratio=None, **conditions) -> None:
    conditions.update(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine())
    print(json.dumps(dict(name=name, value=value, unit=unit, peer=peer, ratio=ratio, conditions=conditions)), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4, help="lmforge windows per forward (HF's loop runs one)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    shape = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257)
    if args.quick:
        shape.update(n_layer=2, n_embd=128, n_head=2)
        args.tokens, args.max_length, args.stride, args.repeats = 600, 256, 128, 1

    import lmforge
    from lmforge import metrics
    from test_metrics import hf_sliding_window_nll  # the documented loop, as the tests use it
    from transformers import GPT2Config, GPT2LMHeadModel

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(**shape)).save_pretrained(tmp)
        hf = GPT2LMHeadModel.from_pretrained(tmp).eval()
        ours = lmforge.load_model(tmp, device="cpu")
    ids = torch.randint(0, shape["vocab_size"], (1, args.tokens), generator=torch.Generator().manual_seed(1))

    def run_ours():
        return metrics.perplexity(ours, ids[0], max_length=args.max_length, stride=args.stride, batch_size=args.batch_size)

    def run_hf():
        return hf_sliding_window_nll(hf, ids, args.max_length, args.stride)

    run_ours(), run_hf()  # warm-up
    t_ours, t_hf = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        got = run_ours()
        t_ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        nll, n = run_hf()
        t_hf.append(time.perf_counter() - start)
    a, b = got.n_tokens / statistics.median(t_ours), n / statistics.median(t_hf)
    cond = dict(shape=f"{shape['n_layer']}x{shape['n_embd']} vocab {shape['vocab_size']}", tokens=args.tokens,
                max_length=args.max_length, stride=args.stride, batch_size=args.batch_size, dtype="fp32",
                repeats=args.repeats, peer_is="transformers GPT2LMHeadModel, HF documented loop (batch 1)")
    emit("perplexity_tokens_per_s", round(a, 1), "scored tokens/s", peer=round(b, 1), ratio=round(a / b, 3), **cond)
    rel = abs(got.perplexity - math.exp(nll)) / math.exp(nll)
    emit("perplexity_relative_difference", rel, "fraction", peer=0.0, ratio=None,
         lmforge=got.perplexity, transformers=math.exp(nll), scored_tokens=[got.n_tokens, n], **cond)


if __name__ == "__main__":
    main()
