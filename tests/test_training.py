"""The trainer: exact gradient accumulation, schedules, weight-decay groups, exact resume after a real
kill, atomic checkpoints (killed mid-write, full disk), NaN stop, config mismatch, bf16, plots."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.errors import ConfigError, TrainingError
from lmforge.training import (RandomBlocks, TrainConfig, Trainer, causal_lm_loss, fixed_blocks, learning_rate,
                              param_groups)
from lmforge.training.checkpointing import RunDir

TEXT_CHARS = 40_000


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A small char-level dataset from the Python help topics (shipped with every Python)."""
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("ds")
    text = "\n".join(topics[k] for k in sorted(topics))[:TEXT_CHARS]
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    tok = lmforge.CharTokenizer.train([root / "corpus.txt"])
    lmforge.prepare(root / "corpus.txt", tok, root / "data", show_progress=False)
    return root / "data"


def tiny_model(vocab: int, seed: int = 0, **over) -> lmforge.GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, n_positions=64, embd_pdrop=0.0, attn_pdrop=0.0,
               resid_pdrop=0.0)
    cfg.update(over)
    return lmforge.GPT(lmforge.GPTConfig(**cfg))


def make_trainer(dataset: Path, out: Path, *, model=None, **cfg_over) -> Trainer:
    train = lmforge.TokenDataset(dataset, "train")
    val = lmforge.TokenDataset(dataset, "val")
    cfg = dict(out_dir=str(out), max_steps=12, batch_size=4, block_size=32, lr=3e-3, warmup_steps=2, eval_interval=6,
               eval_batches=2, log_interval=1, save_interval=4, progress=False, device="cpu", seed=7)
    cfg.update(cfg_over)
    config = TrainConfig(**cfg)
    model = model or tiny_model(train.vocab_size)
    return Trainer(model, config, RandomBlocks(train, config.batch_size, config.block_size, seed=config.seed),
                   fixed_blocks(val, config.batch_size, config.block_size, config.eval_batches, seed=1),
                   tokenizer=train.tokenizer, extra_config={"model": model.config.to_dict()})


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in RunDir(run_dir).read_metrics() if "loss" in r}


# ---- exact gradient accumulation -------------------------------------------------------------------


def test_accumulated_gradient_equals_full_batch_gradient(dataset, tmp_path):
    """4 micro-batches of 2 rows with uneven masking == one batch of 8 rows (fp32, 1e-6 relative)."""
    torch.manual_seed(0)
    x = torch.randint(0, 50, (8, 32))
    y = torch.randint(0, 50, (8, 32))
    y[0, :30] = -100  # rows with very different numbers of targets: a per-micro-batch mean would be wrong
    y[3, 5:] = -100
    y[6, ::2] = -100
    model = tiny_model(60, seed=3)
    loss_sum, count = causal_lm_loss(model, {"input_ids": x, "labels": y})
    (loss_sum / count).backward()
    full = [p.grad.clone() for p in model.parameters()]

    trainer = make_trainer(dataset, tmp_path / "run", model=tiny_model(60, seed=3), grad_accum=4, batch_size=2)
    trainer.optimizer.zero_grad(set_to_none=True)
    loss, tokens = trainer.accumulate_gradients([{"input_ids": x[i:i + 2], "labels": y[i:i + 2]} for i in range(0, 8, 2)])
    assert tokens == 8 * 32
    assert loss == pytest.approx((loss_sum / count).item(), rel=1e-6)
    for g_full, p in zip(full, trainer.raw_model.parameters()):
        rel = (p.grad - g_full).norm() / g_full.norm().clamp_min(1e-12)
        assert rel < 1e-6


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randint(0, 50, (2, 16))
    grads = []
    for ckpt in (False, True):
        model = tiny_model(50, seed=1).train()
        model.gradient_checkpointing = ckpt
        loss_sum, n = causal_lm_loss(model, {"input_ids": x, "labels": x})
        (loss_sum / n).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ---- schedule and optimizer groups ---------------------------------------------------------------


def test_learning_rate_warmup_then_cosine_to_min_lr():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert learning_rate(0, cfg) == pytest.approx(1e-4)
    assert learning_rate(9, cfg) == pytest.approx(1e-3)
    assert learning_rate(10, cfg) == pytest.approx(1e-3)
    assert learning_rate(60, cfg) == pytest.approx(0.5 * (1e-3 + 1e-4))
    assert learning_rate(110, cfg) == pytest.approx(1e-4)
    assert learning_rate(500, cfg) == pytest.approx(1e-4)
    lrs = [learning_rate(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    lin = cfg.replace(schedule="linear")
    assert learning_rate(60, lin) == pytest.approx(0.5 * (1e-3 + 1e-4))
    assert learning_rate(50, cfg.replace(schedule="constant")) == 1e-3


def test_weight_decay_groups_skip_biases_layernorm_frozen_and_count_tied_once():
    model = tiny_model(50)
    model.transformer.h[0].mlp.c_fc.weight.requires_grad_(False)
    decay, no_decay = param_groups(model, 0.1)
    ids = lambda ps: {id(p) for p in ps["params"]}  # noqa: E731
    assert id(model.transformer.h[0].attn.c_attn.weight) in ids(decay)
    assert id(model.transformer.wte.weight) in ids(decay)
    assert id(model.transformer.h[0].attn.c_attn.bias) in ids(no_decay)
    assert id(model.transformer.ln_f.weight) in ids(no_decay)
    assert id(model.transformer.h[0].mlp.c_fc.weight) not in ids(decay) | ids(no_decay)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert ids(decay) | ids(no_decay) == trainable
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable)  # tied wte/lm_head once
    decay2, _ = param_groups(model, 0.1, decay_embeddings=False)
    assert id(model.transformer.wte.weight) not in ids(decay2)


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(lr=0), dict(dtype="fp8"), dict(schedule="step"),
                                 dict(min_lr=1.0, lr=0.1), dict(grad_accum=0), dict(best_mode="up")])
def test_bad_train_config_is_a_config_error(bad):
    with pytest.raises(ConfigError):
        TrainConfig(**bad)


def test_unknown_config_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="did you mean 'grad_accum'"):
        TrainConfig.from_dict({"grad_acum": 2})


# ---- training, checkpoints, resume ---------------------------------------------------------------


def test_training_lowers_the_loss_and_writes_the_run_directory(dataset, tmp_path):
    result = make_trainer(dataset, tmp_path / "run", max_steps=40, eval_interval=20, save_interval=20).train()
    losses = train_losses(tmp_path / "run")
    assert result.step == 40 and result.stopped_by == "max_steps"
    assert sum(list(losses.values())[-5:]) / 5 < sum(list(losses.values())[:5]) / 5 - 0.3
    run = RunDir(tmp_path / "run")
    assert [p.name for p in run.complete_checkpoints()] == ["step_000020", "step_000040"]
    assert json.loads((run.path / "latest.json").read_text())["step"] == 40
    assert "val_loss" in result.metrics and result.metrics["val_ppl"] == pytest.approx(math.exp(result.metrics["val_loss"]))
    saved = json.loads((run.path / "config.json").read_text())
    assert saved["train"]["max_steps"] == 40 and saved["model"]["n_embd"] == 32
    # the final model is a normal checkpoint, with its tokenizer
    loaded = lmforge.load_model(run.model_dir, device="cpu")
    last = lmforge.load_model(run.path / "checkpoints" / "step_000040" / "model", device="cpu")
    torch.testing.assert_close(loaded.transformer.wte.weight, last.transformer.wte.weight, rtol=0, atol=0)
    assert lmforge.Tokenizer.from_pretrained(run.model_dir).vocab_size == loaded.config.vocab_size


def test_keep_last_prunes_old_checkpoints(dataset, tmp_path):
    make_trainer(dataset, tmp_path / "run", max_steps=12, save_interval=2, keep_last=2).train()
    assert [p.name for p in RunDir(tmp_path / "run").complete_checkpoints()] == ["step_000010", "step_000012"]


def test_resume_in_process_reproduces_the_uninterrupted_losses(dataset, tmp_path):
    full = make_trainer(dataset, tmp_path / "full", max_steps=12, lr_decay_steps=12).train()
    make_trainer(dataset, tmp_path / "cut", max_steps=8, lr_decay_steps=12).train()
    resumed = make_trainer(dataset, tmp_path / "cut", max_steps=12, lr_decay_steps=12, resume=True).train()
    a, b = train_losses(tmp_path / "full"), train_losses(tmp_path / "cut")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
    assert resumed.metrics["val_loss"] == pytest.approx(full.metrics["val_loss"], abs=1e-6)


PRETRAIN = [sys.executable, "-m", "lmforge", "pretrain", "--model", "tiny", "--block-size", "32", "--batch-size", "4",
            "--lr", "3e-3", "--warmup-steps", "2", "--log-interval", "1", "--eval-batches", "1", "--samples", "0",
            "--device", "cpu", "--seed", "3"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "LMFORGE_DEBUG": "1"}


def _wait_for(predicate, proc, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    return False


def test_killed_run_resumes_with_the_same_loss_sequence(dataset, tmp_path):
    """SIGKILL a real `lmforge pretrain` process mid-run; --resume reaches the uninterrupted losses."""
    args = [*PRETRAIN, "--data", str(dataset), "--max-steps", "120", "--save-interval", "10", "--eval-interval", "60"]
    subprocess.run([*args, "--out", str(tmp_path / "full")], check=True, env=_env(), capture_output=True)
    proc = subprocess.Popen([*args, "--out", str(tmp_path / "cut")], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        killed = _wait_for(lambda: len(train_losses(tmp_path / "cut")) >= 25, proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert killed, "the run finished before it could be killed"
    cut_at = max(train_losses(tmp_path / "cut"))
    assert cut_at < 120
    done = subprocess.run([*args, "--out", str(tmp_path / "cut"), "--resume"], env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    a, b = train_losses(tmp_path / "full"), train_losses(tmp_path / "cut")
    assert sorted(b) == list(range(1, 121))
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-6
    events = [r for r in RunDir(tmp_path / "cut").read_metrics() if r.get("event") == "resume"]
    assert events and events[0]["step"] % 10 == 0


def test_kill_during_checkpoint_write_keeps_the_previous_checkpoint(dataset, tmp_path):
    """SIGKILL while a checkpoint is being written: latest.json still names a complete checkpoint."""
    run_dir = tmp_path / "run"
    args = [*PRETRAIN, "--data", str(dataset), "--max-steps", "400", "--save-interval", "1", "--eval-interval", "1000",
            "--keep-last", "3", "--out", str(run_dir)]
    caught_mid_write = False
    for _attempt in range(3):
        proc = subprocess.Popen([*args, *(["--resume"] if (run_dir / "config.json").exists() else [])], env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ckpts = run_dir / "checkpoints"

        def writing():
            return ckpts.is_dir() and len(RunDir(run_dir).complete_checkpoints()) >= 2 and any(
                p.name.startswith(".tmp-") for p in ckpts.iterdir())
        try:
            seen = _wait_for(writing, proc)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait()
        if seen and any(p.name.startswith(".tmp-") for p in ckpts.iterdir()):
            caught_mid_write = True
            break
    assert caught_mid_write, "never caught the process inside a checkpoint write"
    run = RunDir(run_dir)
    latest = run.latest_checkpoint()
    assert latest is not None and (latest / "trainer.pt").is_file()
    model = lmforge.load_model(latest / "model", device="cpu")  # complete and loadable
    assert model.config.n_layer == 2
    done = subprocess.run([*args, "--max-steps", str(int(latest.name[5:]) + 2), "--resume"], env=_env(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not any(p.name.startswith(".tmp-") for p in (run_dir / "checkpoints").iterdir())


def test_full_disk_during_checkpoint_keeps_the_old_one(dataset, tmp_path, monkeypatch):
    trainer = make_trainer(dataset, tmp_path / "run", max_steps=8, save_interval=4)
    import lmforge.training.checkpointing as ck

    real_save, calls = ck.torch.save, []

    def failing_save(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ck.torch, "save", failing_save)
    with pytest.raises(TrainingError, match="previous checkpoint is intact"):
        trainer.train()
    run = RunDir(tmp_path / "run")
    assert [p.name for p in run.complete_checkpoints()] == ["step_000004"]
    assert run.latest_checkpoint().name == "step_000004"
    assert not [p for p in run.checkpoints.iterdir() if p.name.startswith(".tmp-")]


def test_nan_loss_stops_and_names_the_last_good_checkpoint(dataset, tmp_path):
    trainer = make_trainer(dataset, tmp_path / "run", max_steps=12, save_interval=3)
    calls = {"n": 0}

    def exploding_loss(model, batch):
        calls["n"] += 1
        loss, n = causal_lm_loss(model, batch)
        return (loss * float("nan") if calls["n"] > 5 else loss), n

    trainer.loss_fn = exploding_loss
    before = None
    with pytest.raises(TrainingError, match=r"loss became nan at step 6.*step_000003"):
        trainer.train()
    before = lmforge.load_model(tmp_path / "run" / "checkpoints" / "step_000003" / "model", device="cpu")
    assert all(torch.isfinite(p).all() for p in before.parameters())


def test_a_run_recorded_before_a_config_key_existed_still_resumes(dataset, tmp_path):
    """model.family came with the families refactor: a run directory written before it resumes."""
    make_trainer(dataset, tmp_path / "run", max_steps=4).train()
    path = tmp_path / "run" / "config.json"
    saved = json.loads(path.read_text())
    assert saved["model"].pop("family") == "gpt2"
    path.write_text(json.dumps(saved))
    result = make_trainer(dataset, tmp_path / "run", max_steps=8, resume=True).train()
    assert result.step == 8
    with pytest.raises(TrainingError, match=r"different configuration.*train.lr"):  # a real change still refuses
        make_trainer(dataset, tmp_path / "run", max_steps=12, lr=1e-2, resume=True).train()


def test_resume_with_a_different_config_is_refused(dataset, tmp_path):
    make_trainer(dataset, tmp_path / "run", max_steps=4).train()
    with pytest.raises(TrainingError, match=r"different configuration.*train.lr: 0.003 -> 0.01"):
        make_trainer(dataset, tmp_path / "run", max_steps=8, lr=1e-2, resume=True).train()
    with pytest.raises(TrainingError, match="pass --resume"):
        make_trainer(dataset, tmp_path / "run", max_steps=8).train()
    with pytest.raises(TrainingError, match="not a run directory"):
        make_trainer(dataset, tmp_path / "empty", max_steps=8, resume=True).train()


def test_bf16_autocast_trains_with_fp32_master_weights(dataset, tmp_path):
    trainer = make_trainer(dataset, tmp_path / "run", max_steps=20, dtype="bf16", eval_interval=20, save_interval=20)
    result = trainer.train()
    assert all(p.dtype == torch.float32 for p in trainer.raw_model.parameters())
    losses = list(train_losses(tmp_path / "run").values())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert math.isfinite(result.metrics["val_loss"])


def test_fp16_without_cuda_is_refused(dataset, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    with pytest.raises(TrainingError, match="fp16 needs a CUDA device"):
        make_trainer(dataset, tmp_path / "run", dtype="fp16")


def test_max_tokens_and_max_time_stop_the_run(dataset, tmp_path):
    r = make_trainer(dataset, tmp_path / "a", max_steps=1000, max_tokens=4 * 32 * 5).train()
    assert (r.step, r.stopped_by) == (5, "max_tokens")
    r = make_trainer(dataset, tmp_path / "b", max_steps=100_000, max_time=1.0, save_interval=100_000).train()
    assert r.stopped_by == "max_time" and 0 < r.step < 100_000


def test_best_checkpoint_follows_the_metric(dataset, tmp_path):
    r = make_trainer(dataset, tmp_path / "run", max_steps=12, eval_interval=3, best_metric="val_loss").train()
    assert r.best_dir == tmp_path / "run" / "best"
    bests = [e for e in RunDir(tmp_path / "run").read_metrics() if e.get("event") == "best"]
    assert bests and all(b["val_loss"] > a["val_loss"] for b, a in zip(bests, bests[1:]))
    with pytest.raises(ConfigError, match="best_metric='accuracy'"):  # before training, not at the first evaluation
        make_trainer(dataset, tmp_path / "other", max_steps=3, eval_interval=3, best_metric="accuracy")
    assert not (tmp_path / "other").exists()


# ---- the CLI ---------------------------------------------------------------------------------------


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, env=_env(), cwd=cwd)


def test_main_job_short_form_pretrains_on_the_embedded_corpus_and_prints_samples(tmp_path):
    """The README's main job (same flags, fewer steps): no data, offline, samples + loss plot."""
    done = _cli("pretrain", "--out", str(tmp_path / "demo"), "--block-size", "64", "--batch-size", "12", "--lr", "1e-3",
                "--max-steps", "30", "--eval-interval", "15", "--max-time", "120", "--sample-length", "80")
    assert done.returncode == 0, done.stderr
    assert "---------- sample 2 ----------" in done.stdout
    assert f"loss plot: {tmp_path / 'demo' / 'loss.png'}" in done.stdout
    png = (tmp_path / "demo" / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    header = json.loads((tmp_path / "demo" / "data" / "dataset.json").read_text())
    assert header["tokens"] > 400_000 and header["tokenizer"]["vocab_size"] < 200  # char-level pydoc topics
    saved = json.loads((tmp_path / "demo" / "config.json").read_text())
    assert saved["model"]["n_positions"] == 64 and saved["train"]["lr"] == 1e-3


def test_config_file_sets_options_and_flags_win(dataset, tmp_path):
    (tmp_path / "run.yaml").write_text(f"data: {dataset}\nmodel: tiny\nmax-steps: 6\nlr: 0.002\nbatch_size: 3\n"
                                       f"block_size: 16\neval_interval: 3\nsamples: 0\ndevice: cpu\n")
    done = _cli("pretrain", "--config", str(tmp_path / "run.yaml"), "--lr", "0.004", "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert (saved["max_steps"], saved["lr"], saved["batch_size"], saved["block_size"]) == (6, 0.004, 3, 16)
    plot = _cli("plot", str(tmp_path / "run"), "--output", str(tmp_path / "x.png"))
    assert plot.returncode == 0 and (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("content, message", [
    ("max_stepz: 3\n", "did you mean 'max_steps'"),
    ("lr: [1\n", "does not parse as YAML"),
    ("- 1\n- 2\n", "must hold a mapping"),
])
def test_bad_config_file_is_one_line_and_exit_2(tmp_path, content, message):
    (tmp_path / "bad.yaml").write_text(content)
    done = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", "--config", str(tmp_path / "bad.yaml"),
                           "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_too_small_data_and_empty_val_split_are_clear_errors(tmp_path):
    (tmp_path / "small.txt").write_text("hello world\n")
    common = ["pretrain", "--model", "tiny", "--max-steps", "2", "--samples", "0", "--device", "cpu"]
    done = subprocess.run([sys.executable, "-m", "lmforge", *common, "--data", str(tmp_path / "small.txt"),
                           "--block-size", "64", "--out", str(tmp_path / "a")], capture_output=True, text=True)
    assert done.returncode == 2 and "fewer than block_size + 1 = 65" in done.stderr
    (tmp_path / "big.txt").write_text("some text to learn from. " * 400)
    done = subprocess.run([sys.executable, "-m", "lmforge", *common, "--data", str(tmp_path / "big.txt"),
                           "--val-fraction", "0", "--block-size", "16", "--out", str(tmp_path / "b")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "validation split is empty" in done.stderr and "--eval-batches 0" in done.stderr
    done = subprocess.run([sys.executable, "-m", "lmforge", *common, "--data", str(tmp_path / "big.txt"),
                           "--val-fraction", "0", "--eval-batches", "0", "--block-size", "16", "--out", str(tmp_path / "c")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-m", "lmforge", "plot", str(tmp_path / "nothing")], capture_output=True, text=True)
    assert done.returncode == 2 and "not a directory" in done.stderr


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")])
def test_out_of_memory_suggests_a_smaller_batch_with_accumulation(dataset, tmp_path, error):
    trainer = make_trainer(dataset, tmp_path / "run", max_steps=3)

    def too_big(model, batch):
        raise error

    trainer.loss_fn = too_big
    with pytest.raises(TrainingError, match=r"out of memory at batch_size=4.*--grad-accum"):
        trainer.train()
    trainer = make_trainer(dataset, tmp_path / "other", max_steps=3)
    trainer.loss_fn = lambda model, batch: (_ for _ in ()).throw(RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):  # other errors are not dressed up as OOM
        trainer.train()


def test_a_bias_free_model_trains_and_resumes_from_its_checkpoints(dataset, tmp_path):
    """nanoGPT's bias=False: checkpoints carry zero biases for transformers and resume into the same model."""
    vocab = lmforge.TokenDataset(dataset, "train").vocab_size
    model = tiny_model(vocab, bias=False)
    make_trainer(dataset, tmp_path / "run", model=model, max_steps=4).train()
    again = lmforge.load_model(tmp_path / "run" / "model", device="cpu")
    assert again.config.bias is False
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    resumed = make_trainer(dataset, tmp_path / "run", model=tiny_model(vocab, seed=1, bias=False), max_steps=6,
                           resume=True)
    assert resumed.train().step == 6
