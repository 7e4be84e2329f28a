"""Pretraining quality and speed: nanoGPT's CPU "baby GPT" on Tiny Shakespeare (character level), and
the GPT-2 small shape, lmforge against transformers in the same run.

Prints one JSON object per figure: name, value, unit, peer (transformers), ratio, conditions.
`ratio` is lmforge's advantage (> 1 = lmforge better): peer/value for times, value/peer for rates.

    python benchmarks/pretrain_shakespeare.py            # the full 2000-iteration run + speed + GPT-2 shape
    python benchmarks/pretrain_shakespeare.py --quick    # a smoke run (50 iterations, short timings)

Quality: lmforge's Trainer with nanoGPT's published CPU settings and model (erf GELU, no biases; n_layer 4, n_head 4, n_embd 128,
block 64, batch 12, 2000 iterations, lr 1e-3 cosine to 1e-4, warmup 100, beta2 0.99, dropout 0,
weight decay 0.1, clip 1.0), 90/10 character split; final val loss over the whole val split and as
nanoGPT estimates it (mean of 20 random val batches). nanoGPT reports about 1.88.
Speed: the time of one full training iteration (forward, backward, clip, AdamW step) of the same
model shape in lmforge and in transformers.GPT2LMHeadModel, same batches, same optimizer settings,
interleaved blocks of iterations, median per-iteration time. GPT-2 small shape: tokens/s and MFU
(6N + 12 L H Q T flops per token over the measured dense matmul peak), fp32 and bf16 autocast.
Each phase runs in its own process, so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
BABY = dict(n_layer=4, n_head=4, n_embd=128, n_positions=64, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)


def emit(name, value, unit, peer=None, ratio=None, **conditions) -> None:
    conditions.update(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
                      peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    print(json.dumps(dict(name=name, value=value, unit=unit, peer=peer, ratio=ratio, conditions=conditions)), flush=True)


def prepared(workdir: Path) -> Path:
    import lmforge

    out = workdir / "shakespeare_char"
    if not (out / "dataset.json").is_file():
        tok = lmforge.CharTokenizer.train([DATA])
        lmforge.prepare(DATA, tok, out, val_fraction=0.1, show_progress=False)
    return out


# ---- phase: quality ------------------------------------------------------------------------------


def phase_quality(args, workdir: Path) -> None:
    import lmforge

    data = prepared(workdir)
    train, val = lmforge.TokenDataset(data, "train"), lmforge.TokenDataset(data, "val")
    # nanoGPT's model: exact (erf) GELU and no biases (saved as zero biases, which transformers loads);
    # --arch gpt2 keeps GPT-2's tanh GELU and biases.
    arch = dict(activation="gelu", bias=False) if args.arch == "nanogpt" else {}
    conditions = dict(config="nanoGPT baby 4x4x128, block 64, batch 12, char-level", iters=args.iters, dtype="fp32",
                      arch="erf GELU, no biases (as nanoGPT)" if args.arch == "nanogpt" else "GPT-2: tanh GELU, biases",
                      data="tinyshakespeare 90/10")
    seeds = [int(s) for s in args.seeds.split(",")]
    runs, peers = [], []
    for seed in seeds:
        runs.append(_quality_run(train, val, arch, seed, workdir / f"run-{seed}", args.iters))
        peers.append(_plain_loop_run(train, val, args.arch, seed, args.iters) if args.quality_peer else None)
    peer_note = ("; peer = nanoGPT's train.py loop written plainly over transformers' GPT2LMHeadModel "
                 "(same architecture, settings and seed)") if args.quality_peer else "; peer = nanoGPT's published figure"
    for (estimate, full, ms, tokens_per_s), peer, seed in zip(runs, peers, seeds):
        emit("shakespeare_char_val_loss_estimate", round(estimate, 4), "nats/char",
             peer=round(peer[0], 4) if peer else 1.88, seed=seed, published_nanogpt=1.88,
             note="mean of 20 random val batches (nanoGPT's estimate)" + peer_note, **conditions)
        emit("shakespeare_char_val_loss_full", round(full, 4), "nats/char", peer=round(peer[1], 4) if peer else 1.88,
             seed=seed, published_nanogpt=1.88, note="every val character once" + peer_note, **conditions)
        emit("shakespeare_char_ms_per_iter_in_run", round(ms, 2), "ms", seed=seed,
             note="median of logged windows, incl. data", **conditions)
        emit("shakespeare_char_tokens_per_s_in_run", round(tokens_per_s), "tokens/s", seed=seed,
             note="whole run incl. evaluation and checkpoints", **conditions)
    if len(runs) > 1:
        for i, name in enumerate(["shakespeare_char_val_loss_estimate", "shakespeare_char_val_loss_full"]):
            peer = round(statistics.median(p[i] for p in peers), 4) if args.quality_peer else 1.88
            emit(name + "_median", round(statistics.median(r[i] for r in runs), 4), "nats/char", peer=peer,
                 seeds=seeds, published_nanogpt=1.88, note="median over seeds" + peer_note, **conditions)


def _quality_run(train, val, arch: dict, seed: int, out: Path, iters: int) -> tuple[float, float, float, float]:
    """One 2000-iteration run with nanoGPT's settings: (val estimate, full val loss, ms/iter, tokens/s)."""
    import lmforge
    from lmforge.training import RandomBlocks, TrainConfig, Trainer, fixed_blocks

    torch.manual_seed(seed)
    model = lmforge.GPT(lmforge.GPTConfig(vocab_size=train.vocab_size, **BABY, **arch))
    cfg = TrainConfig(out_dir=str(out), max_steps=iters, batch_size=12, block_size=64, lr=1e-3,
                      min_lr=1e-4, warmup_steps=100, lr_decay_steps=iters, beta2=0.99, weight_decay=0.1,
                      grad_clip=1.0, eval_interval=250, eval_batches=20, log_interval=10, save_interval=iters,
                      progress=False, device="cpu", seed=seed)
    trainer = Trainer(model, cfg, RandomBlocks(train, 12, 64, seed=seed), fixed_blocks(val, 12, 64, 20, seed=seed + 1),
                      tokenizer=train.tokenizer, extra_config={"model": model.config.to_dict()})
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    ms = statistics.median(r["ms_per_step"] for r in result.history if "ms_per_step" in r)
    return result.metrics["val_loss"], _full_val_loss(model, val), ms, result.tokens / seconds


def _full_val_loss(model, val) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in val.sequential_batches(64, 64):
            logits = model(x).logits
            total += F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-100, reduction="sum").item()
            count += int((y != -100).sum())
    return total / count


def _plain_loop_run(train, val, arch: str, seed: int, iters: int) -> tuple[float, float]:
    """The peer for quality: nanoGPT's train.py loop (get_batch, get_lr, estimate_loss, AdamW groups by
    dimension, clip 1.0) written out plainly over transformers' GPT2LMHeadModel. For --arch nanogpt the
    model is nanoGPT's: erf GELU, and its biases are zeroed and frozen (= no biases). Returns
    (20-batch val estimate, full val loss)."""
    import math

    import numpy as np
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=train.vocab_size, n_layer=4, n_head=4, n_embd=128, n_positions=64, embd_pdrop=0.0,
                     attn_pdrop=0.0, resid_pdrop=0.0,
                     activation_function="gelu" if arch == "nanogpt" else "gelu_new")
    model = GPT2LMHeadModel(cfg)
    if arch == "nanogpt":
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.data.zero_()
                p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99))
    block, batch, warmup, lr, min_lr = 64, 12, 100, 1e-3, 1e-4
    data = {"train": np.asarray(train.tokens), "val": np.asarray(val.tokens)}

    def get_batch(split):
        d = data[split]
        ix = torch.randint(len(d) - block, (batch,))
        x = torch.stack([torch.from_numpy(d[i:i + block].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(d[i + 1:i + 1 + block].astype(np.int64)) for i in ix])
        return x, y

    def get_lr(it):
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        if it > iters:
            return min_lr
        ratio = (it - warmup) / (iters - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    def loss_of(x, y):
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))

    model.train()
    for it in range(iters):
        for group in opt.param_groups:
            group["lr"] = get_lr(it)
        loss_of(*get_batch("train")).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        estimate = statistics.mean(loss_of(*get_batch("val")).item() for _ in range(20))
    return estimate, _full_val_loss(model, val)


# ---- phase: speed against transformers --------------------------------------------------------


def _hf_model(config):
    """transformers' model of the same architecture (GPT2LMHeadModel, LlamaForCausalLM, ...), no dropout."""
    from transformers import AutoConfig, AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**config.to_hf_dict()))


def _steppers(config, dtype: str, compiled: bool = False):
    """One training-iteration closure per library over identical initial weights and settings; with
    `compiled`, both models run under torch.compile (lmforge's `pretrain --compile`, transformers'
    `TrainingArguments(torch_compile=True)`)."""
    import lmforge
    from lmforge.training import make_optimizer, TrainConfig

    config = config.replace(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    torch.manual_seed(0)
    hf = _hf_model(config).train()
    ours = lmforge.GPT(config).train()
    from lmforge.checkpoint import hf_to_lmforge

    ours.load_state_dict(hf_to_lmforge(hf.state_dict(), ours.config), strict=False)
    cfg = TrainConfig(lr=1e-3, beta2=0.99, weight_decay=0.1)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else None
    opt_ours = make_optimizer(ours, cfg, torch.device("cpu"))
    run_ours, run_hf = (torch.compile(ours), torch.compile(hf)) if compiled else (ours, hf)
    # transformers' Trainer defaults to the fused AdamW (optim="adamw_torch_fused"), as lmforge does.
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, fused=True)

    def ours_step(x, y):
        with amp or _null():
            logits = run_ours(x).logits
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0)
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def hf_step(x, y):
        with amp or _null():
            logits = run_hf(input_ids=x).logits
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    return ours, ours_step, hf_step


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _timed(step, batches) -> list[float]:
    out = []
    for x, y in batches:
        t0 = time.perf_counter()
        step(x, y)
        out.append(time.perf_counter() - t0)
    return out


def phase_speed(args, workdir: Path) -> None:
    import lmforge

    data = prepared(workdir)
    train = lmforge.TokenDataset(data, "train")
    models = {  # figure prefix -> (config, peer)
        "shakespeare_char": (lmforge.GPTConfig(vocab_size=train.vocab_size, **BABY), "GPT2LMHeadModel"),
        "llama_baby": (lmforge.preset("llama-baby", vocab_size=train.vocab_size, n_positions=64), "LlamaForCausalLM"),
    }
    for prefix, (config, peer) in models.items():
        ours, ours_step, hf_step = _steppers(config, "fp32", compiled=args.compile)
        name = prefix + ("_compiled" if args.compile else "")
        g = torch.Generator().manual_seed(0)
        batches = [train.random_batch(12, 64, g) for _ in range(args.speed_block)]
        ours_t, hf_t = [], []
        _timed(ours_step, batches[:5]), _timed(hf_step, batches[:5])  # warm-up
        for _ in range(args.speed_rounds):
            ours_t += _timed(ours_step, batches)
            hf_t += _timed(hf_step, batches)
        a, b = statistics.median(ours_t) * 1000, statistics.median(hf_t) * 1000
        shape = f"{config.n_layer}x{config.n_head}x{config.n_embd}"
        emit(f"{name}_ms_per_iter", round(a, 2), "ms", peer=round(b, 2), ratio=round(b / a, 3),
             config=f"{prefix} {shape}, block 64, batch 12", dtype="fp32", iterations=len(ours_t),
             compiled=args.compile, note=f"forward+backward+clip+AdamW, interleaved blocks, median; peer = "
             f"transformers {peer} (sdpa)" + (", both under torch.compile (default options)" if args.compile else ""))
        emit(f"{name}_tokens_per_s", round(12 * 64 / a * 1000), "tokens/s", peer=round(12 * 64 / b * 1000),
             ratio=round(b / a, 3), config=f"{prefix} {shape}, batch 12 x 64", dtype="fp32")


def phase_gpt2(args, workdir: Path) -> None:
    import lmforge
    from lmforge.training import matmul_peak_flops

    shape = dict(n_layer=12, n_head=12, n_embd=768, n_positions=args.gpt2_block, embd_pdrop=0.0, attn_pdrop=0.0,
                 resid_pdrop=0.0)  # dropout 0 in both, as _hf_model builds the peer
    vocab = 50304
    for dtype in ("fp32", "bf16"):
        ours, ours_step, hf_step = _steppers(lmforge.GPTConfig(vocab_size=vocab, **shape), dtype)
        g = torch.Generator().manual_seed(0)
        batches = [(torch.randint(0, vocab, (args.gpt2_batch, args.gpt2_block), generator=g),) * 2
                   for _ in range(args.gpt2_steps)]
        _timed(ours_step, batches[:1]), _timed(hf_step, batches[:1])
        ours_t, hf_t = [], []
        for x_y in batches:
            ours_t += _timed(ours_step, [x_y])
            hf_t += _timed(hf_step, [x_y])
        a, b = statistics.median(ours_t), statistics.median(hf_t)
        tokens = args.gpt2_batch * args.gpt2_block
        n = sum(p.numel() for p in ours.parameters())
        flops = 6 * n + 12 * 12 * 12 * 64 * args.gpt2_block
        peak = matmul_peak_flops(torch.device("cpu"), torch.bfloat16 if dtype == "bf16" else torch.float32)
        cond = dict(shape="GPT-2 small 12x768, vocab 50304", block=args.gpt2_block, batch=args.gpt2_batch,
                    dtype=dtype if dtype == "fp32" else "bf16 autocast, fp32 weights", iterations=len(ours_t),
                    matmul_peak_gflops=round(peak / 1e9, 1))
        del ours
        emit(f"gpt2_small_tokens_per_s_{dtype}", round(tokens / a, 1), "tokens/s", peer=round(tokens / b, 1),
             ratio=round(b / a, 3), **cond)
        emit(f"gpt2_small_mfu_{dtype}", round(flops * tokens / a / peak, 4), "fraction of measured matmul peak",
             peer=round(flops * tokens / b / peak, 4), ratio=round(b / a, 3), **cond)


def phase_llama(args, workdir: Path) -> None:
    """llama-baby (the Llama block at the baby GPT's 4 x 4 x 128) and nanoGPT's baby GPT trained with the
    same settings and seeds in the same run: full validation loss of each."""
    import lmforge

    data = prepared(workdir)
    train, val = lmforge.TokenDataset(data, "train"), lmforge.TokenDataset(data, "val")
    llama = {k: v for k, v in lmforge.PRESETS["llama-baby"].items() if k not in BABY}
    archs = {"baby_gpt": dict(activation="gelu", bias=False), "llama_baby": llama}
    losses = {name: [] for name in archs}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name, arch in archs.items():
            _, full, ms, _ = _quality_run(train, val, arch, seed, workdir / f"{name}-{seed}", args.iters)
            losses[name].append(full)
            emit(f"{name}_full_val_loss", round(full, 4), "nats/char", seed=seed, iterations=args.iters,
                 ms_per_iter=round(ms, 2), config=f"{name} 4x4x128, block 64, batch 12, nanoGPT's settings")
    a, b = statistics.median(losses["llama_baby"]), statistics.median(losses["baby_gpt"])
    emit("llama_baby_full_val_loss_median", round(a, 4), "nats/char", peer=round(b, 4), ratio=round(b / a, 4),
         note="peer = nanoGPT's baby GPT (erf GELU, no biases), same settings and seeds, same run")


PHASES = {"quality": phase_quality, "speed": phase_speed, "gpt2": phase_gpt2, "llama": phase_llama}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: few iterations, short timings")
    p.add_argument("--phases", default="quality,speed,gpt2",
                   help="comma-separated: quality, speed, gpt2, llama (llama-baby's val loss beside the baby GPT's)")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--arch", choices=["nanogpt", "gpt2"], default="nanogpt",
                   help="quality phase model: nanoGPT's (erf GELU, no biases) or GPT-2's (tanh GELU, biases)")
    p.add_argument("--quality-peer", action="store_true",
                   help="quality phase: also train the plain-loop transformers peer per seed (about 2 min each)")
    p.add_argument("--seeds", default="1337", help="quality phase: comma-separated seeds, one run each (median too)")
    p.add_argument("--speed-block", type=int, default=20, help="iterations per interleaved block")
    p.add_argument("--speed-rounds", type=int, default=5)
    p.add_argument("--compile", action="store_true",
                   help="speed phase: both models under torch.compile (figures named *_compiled; compiling takes minutes)")
    p.add_argument("--gpt2-steps", type=int, default=3)
    p.add_argument("--gpt2-batch", type=int, default=4)
    p.add_argument("--gpt2-block", type=int, default=256)
    args = p.parse_args()
    if args.quick:
        args.iters, args.speed_block, args.speed_rounds, args.gpt2_steps, args.gpt2_batch = 50, 5, 1, 1, 1
    if not DATA.is_file():
        print(json.dumps({"skipped": f"{DATA} not found (../shared/data is absent)"}))
        return
    if args.phase:
        PHASES[args.phase](args, Path(args.workdir))
        return
    with tempfile.TemporaryDirectory() as tmp:
        for phase in args.phases.split(","):
            cmd = [sys.executable, __file__, "--phase", phase, "--workdir", tmp, *sys.argv[1:]]
            subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
