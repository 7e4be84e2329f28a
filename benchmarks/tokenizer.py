"""Tokenizer and prepare throughput; one JSON object per figure.

    python benchmarks/tokenizer.py [--size-mb 100] [--repeats 5] [--vocab-size 8192]

Figures (medians of interleaved repeats, lmforge and its peer measured in the same process run):
- encode_mb_per_s: Tokenizer.encode over tinyshakespeare (one string) vs the raw `tokenizers`
  Tokenizer loaded from the same tokenizer.json (target: lmforge within 10%, ratio >= 0.9).
- encode_batch_mb_per_s: per line through encode_batch, vs the identical raw call (encode_batch_fast):
  the pure cost of lmforge's wrapper.
- prepare_mb_per_s: `prepare` on a synthetic corpus of --size-mb (text read from disk, encoded,
  written) vs raw encode_batch of the same text already in memory.
- prepare_peak_rss_mb: peak RSS of a fresh process running prepare on --size-mb, vs one running it
  on a tenth of that (target: ratio ~1, memory independent of corpus size).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

# Peak RSS from VmHWM: getrusage's ru_maxrss survives fork + exec on Linux, so a child would
# report the benchmark parent's high-water mark instead of its own.
_CHILD = """
import json, sys, time
from lmforge import Tokenizer, prepare
def hwm_kb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
tok = Tokenizer.from_pretrained(sys.argv[1])
base = hwm_kb()
t0 = time.perf_counter()
prepare(sys.argv[2], tok, sys.argv[3], show_progress=False)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_rss_kb": hwm_kb(), "base_rss_kb": base}))
"""


def emit(name, value, unit, peer_name, peer_value, conditions, higher_is_better=True):
    ratio = value / peer_value if peer_value else None
    print(json.dumps({
        "name": name, "value": round(value, 3), "unit": unit, "peer": peer_name, "peer_value": round(peer_value, 3),
        "ratio": round(ratio, 4) if ratio is not None else None, "higher_is_better": higher_is_better,
        "conditions": conditions,
    }), flush=True)


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, alternating which runs first."""
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for k in (names if r % 2 == 0 else names[::-1]):
            times[k].append(timed(fns[k]))
    return {k: statistics.median(v) for k, v in times.items()}


def synthetic_corpus(path: Path, size_bytes: int, lines: list[str], seed: int = 0) -> None:
    """Shuffled Shakespeare lines with some random words until size_bytes: realistic token stats."""
    rng = random.Random(seed)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_bytes:
            block = rng.sample(lines, min(len(lines), 2000))
            block += [" ".join(rng.choice(lines).split()[::-1]) for _ in range(200)]
            chunk = "\n".join(block) + "\n"
            f.write(chunk)
            written += len(chunk.encode("utf-8"))


def encode_figures(tok, raw, text, lines, mb, conditions, repeats):
    """encode (one string, vs the raw call a user would write) and encode_batch (vs the identical raw call)."""
    t = interleaved({"lmforge": lambda: tok.encode(text),
                     "raw": lambda: raw.encode(text, add_special_tokens=False).ids}, repeats)
    emit("encode_mb_per_s", mb / t["lmforge"], "MB/s", "tokenizers.Tokenizer.encode", mb / t["raw"],
         {**conditions, "mode": "one string"})
    raw_batch = getattr(raw, "encode_batch_fast", raw.encode_batch)  # the same call lmforge makes: pure wrapper cost
    t = interleaved({"lmforge": lambda: tok.encode_batch(lines),
                     "raw": lambda: [e.ids for e in raw_batch(lines, add_special_tokens=False)]}, repeats)
    emit("encode_batch_mb_per_s", mb / t["lmforge"], "MB/s", f"tokenizers.Tokenizer.{raw_batch.__name__}", mb / t["raw"],
         {**conditions, "mode": f"batch of {len(lines)} lines"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=100.0, help="synthetic corpus size for prepare")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--only", choices=["encode", "prepare"], default=None, help="run one group of figures")
    args = parser.parse_args()
    if not SHAKESPEARE.is_file():
        print(json.dumps({"name": "tokenizer", "skipped": f"{SHAKESPEARE} not found"}))
        return 0

    import numpy as np
    import tokenizers
    import torch

    from lmforge import Tokenizer
    from lmforge.corpus import PIECE_CHARS

    text = SHAKESPEARE.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    mb = len(text.encode("utf-8")) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = Tokenizer.train(SHAKESPEARE, vocab_size=args.vocab_size, show_progress=False)
        tok.save_pretrained(tmp / "tok")
        raw = tokenizers.Tokenizer.from_file(str(tmp / "tok" / "tokenizer.json"))
        assert tok.encode(text) == raw.encode(text, add_special_tokens=False).ids
        conditions = {
            "text": "tinyshakespeare/input.txt", "text_mb": round(mb, 3), "vocab_size": tok.vocab_size,
            "cpus": os.cpu_count(), "rayon_threads": os.environ.get("RAYON_NUM_THREADS", "all"),
            "repeats": args.repeats, "tokenizers": tokenizers.__version__, "torch": torch.__version__,
            "python": sys.version.split()[0],
        }

        conditions["lmforge_path"] = "encode_batch_fast (ids only, no offsets)" if hasattr(raw, "encode_batch_fast") else "encode_batch"
        raw_batch = getattr(raw, "encode_batch_fast", raw.encode_batch)  # the call lmforge makes
        if args.only != "prepare":
            encode_figures(tok, raw, text, lines, mb, conditions, args.repeats)
        if args.only == "encode":
            return 0

        # prepare: throughput and peak memory, each run in a fresh process
        big, small = tmp / "big.txt", tmp / "small.txt"
        synthetic_corpus(big, int(args.size_mb * 1e6), lines)
        synthetic_corpus(small, int(args.size_mb * 1e5), lines, seed=1)
        big_mb, small_mb = big.stat().st_size / 1e6, small.stat().st_size / 1e6
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}

        def child(corpus: Path) -> dict:
            out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp / "tok"), str(corpus), str(tmp / "ds")],
                                 capture_output=True, text=True, env=env, check=True)
            return json.loads(out.stdout.strip().splitlines()[-1])

        piece = PIECE_CHARS
        batch_chars = piece * max(16, 2 * (os.cpu_count() or 1))  # prepare's default
        prepare_runs, rss_big, rss_small, raw_runs, base_rss = [], [], [], [], []
        repeats = max(1, min(args.repeats, 3))
        for r in range(repeats):
            order = ["big", "small", "raw"] if r % 2 == 0 else ["raw", "small", "big"]
            for which in order:
                if which == "big":
                    res = child(big)
                    prepare_runs.append(res["seconds"])
                    rss_big.append(res["peak_rss_kb"] / 1024)
                    base_rss.append(res["base_rss_kb"] / 1024)
                elif which == "small":
                    rss_small.append(child(small)["peak_rss_kb"] / 1024)
                else:  # the peer: the bare minimum, raw encode_batch of naive 64K-character chunks
                    def encode_only():
                        with open(big, encoding="utf-8") as f:
                            while block := f.read(batch_chars):
                                chunks = [block[i:i + piece] for i in range(0, len(block), piece)]
                                [np.array(e.ids, dtype=np.uint16) for e in raw_batch(chunks, add_special_tokens=False)]
                    raw_runs.append(timed(encode_only))
        pconds = {**conditions, "corpus_mb": round(big_mb, 1), "corpus": "synthetic shuffled Shakespeare, one text file",
                  "prepare_repeats": repeats}
        emit("prepare_mb_per_s", big_mb / statistics.median(prepare_runs), "MB/s",
             f"tokenizers.{raw_batch.__name__} of the same text in 64K-char chunks (no cutting, no writing)", big_mb / statistics.median(raw_runs), pconds)
        emit("prepare_peak_rss_mb", statistics.median(rss_big), "MB", f"prepare_peak_rss_mb at {small_mb:.1f} MB corpus",
             statistics.median(rss_small), {**pconds, "small_corpus_mb": round(small_mb, 1),
                                            "rss_before_prepare_mb": round(statistics.median(base_rss), 1)},
             higher_is_better=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
