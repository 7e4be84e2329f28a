"""Two real torchrun processes (gloo, CPU): DDP and FSDP2 give the single-process losses for the same
global batch, and an FSDP run resumes exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import lmforge
from lmforge.training.checkpointing import RunDir

COMMON = ["--model", "tiny", "--block-size", "32", "--lr", "3e-3", "--warmup-steps", "2", "--lr-decay-steps", "8",
          "--log-interval", "1", "--eval-batches", "2", "--eval-interval", "3", "--samples", "0", "--device", "cpu",
          "--dropout", "0", "--seed", "5", "--no-progress"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("dist")
    (root / "corpus.txt").write_text("\n".join(topics[k] for k in sorted(topics))[:30_000], encoding="utf-8")
    tok = lmforge.CharTokenizer.train([root / "corpus.txt"])
    lmforge.prepare(root / "corpus.txt", tok, root / "data", show_progress=False)
    return root / "data"


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "LMFORGE_DEBUG": "1"}


def single(args):
    done = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", *args], env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def torchrun(args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lmforge", "pretrain", *args]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def losses(run: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in RunDir(run).read_metrics() if key in r}


def assert_same(a: dict[int, float], b: dict[int, float], tol: float = 1e-5):
    assert sorted(a) == sorted(b) and a
    worst = max(abs(a[k] - b[k]) for k in a)
    assert worst <= tol, (worst, a, b)


def test_ddp_two_processes_match_one_process_with_the_same_global_batch(dataset, tmp_path):
    single([*COMMON, "--data", str(dataset), "--max-steps", "6", "--batch-size", "8", "--out", str(tmp_path / "one")])
    torchrun([*COMMON, "--data", str(dataset), "--max-steps", "6", "--batch-size", "4", "--out", str(tmp_path / "ddp")])
    assert_same(losses(tmp_path / "one"), losses(tmp_path / "ddp"))
    assert_same(losses(tmp_path / "one", "val_loss"), losses(tmp_path / "ddp", "val_loss"))
    # rank 0 alone wrote the run: one config with world_size 2, one final model
    assert RunDir(tmp_path / "ddp").read_config()["world_size"] == 2
    assert lmforge.load_model(tmp_path / "ddp" / "model", device="cpu").config.n_layer == 2


def test_fsdp_two_processes_match_and_resume_exactly(dataset, tmp_path):
    single([*COMMON, "--data", str(dataset), "--max-steps", "8", "--batch-size", "8", "--grad-accum", "1",
            "--out", str(tmp_path / "one")])
    args = [*COMMON, "--data", str(dataset), "--batch-size", "2", "--grad-accum", "2", "--fsdp", "--save-interval", "4",
            "--out", str(tmp_path / "fsdp")]
    torchrun([*args, "--max-steps", "4"])
    torchrun([*args, "--max-steps", "8", "--resume"])
    assert_same(losses(tmp_path / "one"), losses(tmp_path / "fsdp"))
    # the gathered checkpoint is a normal model directory
    a = lmforge.load_model(tmp_path / "one" / "model", device="cpu")
    b = lmforge.load_model(tmp_path / "fsdp" / "model", device="cpu")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p - q).abs().max() < 1e-4, name
