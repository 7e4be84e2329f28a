"""Fine-tuning reuses the trainer's DDP, mixed precision and accumulation: two real torchrun processes
(gloo, CPU) give the single-process losses for the same global batch, bf16 autocast trains and saves
fp32 weights, and grad_accum x batch equals the large batch, for `finetune classify` and `finetune sft`."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.training.checkpointing import RunDir

# No dropout anywhere: each rank seeds its own RNG, so dropout masks could never match one process.
# Validation goes through in global batches (batch_size x ranks), so --eval-batches N scores the same
# examples on any number of ranks; 8 covers every val example here, the classify test also checks 2.
FLAGS = ["--lr", "3e-3", "--warmup-steps", "2", "--log-interval", "1", "--eval-batches", "8", "--seed", "3",
         "--no-progress", "--device", "cpu", "--no-plot"]
WORDS = {"positive": ["good", "great", "nice", "lovely"], "negative": ["bad", "awful", "dull", "poor"]}
FILLER = ["the", "film", "was", "really", "quite", "a", "plot", "and", "cast"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A dropout-free tiny byte-level base model and JSONL sets of odd sizes (27, 21 rows: never a
    multiple of the global batch, so epochs end mid-batch) and of uneven lengths (padding, masking)."""
    from lmforge.config import GPTConfig
    from lmforge.model import GPT
    from lmforge.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("ft-dist")
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=257, n_positions=64, n_embd=32, n_layer=2, n_head=4, embd_pdrop=0.0, attn_pdrop=0.0,
                  resid_pdrop=0.0)).save_pretrained(root / "base", tokenizer=Tokenizer.byte_level())
    rng = random.Random(0)

    def review() -> dict:
        label = rng.choice(sorted(WORDS))
        filler = " ".join(rng.choice(FILLER) for _ in range(rng.randint(0, 6)))
        return {"text": f"{filler} {rng.choice(WORDS[label])}".strip(), "label": label}

    def pair() -> dict:
        n = rng.randint(1, 999)
        return {"source": f"{n} " + "x" * rng.randint(0, 12), "target": f"N{n}"}

    return {"base": root / "base",
            "cls_train": write_jsonl(root / "cls_train.jsonl", [review() for _ in range(27)]),
            "cls_val": write_jsonl(root / "cls_val.jsonl", [review() for _ in range(9)]),
            "sft_train": write_jsonl(root / "sft_train.jsonl", [pair() for _ in range(21)]),
            # 5 rows: under 2 ranks x 1 the last global batch has one row, so rank 1 scores an empty slice
            "sft_val": write_jsonl(root / "sft_val.jsonl", [pair() for _ in range(5)])}


def classify_args(data, out: Path, *extra: str) -> list[str]:
    return ["finetune", "classify", "--model", str(data["base"]), "--train", str(data["cls_train"]),
            "--val", str(data["cls_val"]), "--out", str(out), *FLAGS, *extra]


def sft_args(data, out: Path, *extra: str) -> list[str]:
    return ["finetune", "sft", "--model", str(data["base"]), "--task", "translation", "--train", str(data["sft_train"]),
            "--val", str(data["sft_val"]), "--out", str(out), *FLAGS, *extra]


def torchrun(args: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMFORGE_DEBUG": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lmforge", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def metric(run: Path, key: str) -> dict[int, float]:
    """{step: value} of the rows that carry `key`; a step logged twice (two ranks writing) fails."""
    rows = [r for r in RunDir(run).read_metrics() if key in r and "event" not in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"{run}: steps logged more than once: {steps}"
    return {r["step"]: r[key] for r in rows}


def assert_same(a: dict[int, float], b: dict[int, float], tol: float = 1e-5) -> None:
    assert sorted(a) == sorted(b) and a
    worst = max(abs(a[k] - b[k]) for k in a)
    assert worst <= tol, (worst, a, b)


def tree(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*"))


def events(run: Path, name: str) -> list[dict]:
    return [r for r in RunDir(run).read_metrics() if r.get("event") == name]


def fp32_weights(model_dir: Path) -> set[torch.dtype]:
    from safetensors.torch import load_file

    return {t.dtype for t in load_file(model_dir / "model.safetensors").values()}


# ---- the data source: the same global batches whatever the number of ranks -----------------------


@pytest.mark.parametrize("grouped", [False, True])
def test_shuffled_source_gives_the_same_global_batches_on_any_number_of_ranks(grouped):
    """4 ranks x 2 == 2 ranks x 4 == 1 x 8 for 3 epochs of 27 examples (odd: epochs end mid-batch)."""
    from lmforge.tasks.data import ShuffledSource

    examples = list(range(27))
    lengths = [(7 * i) % 11 for i in examples] if grouped else None
    collate = lambda xs: {"input_ids": torch.tensor(xs)}  # noqa: E731

    def global_batches(world_size: int) -> list[list[int]]:
        ranks = [ShuffledSource(examples, 8 // world_size, collate, seed=4, rank=r, world_size=world_size,
                                lengths=lengths) for r in range(world_size)]
        return [sum((src.next_batch()["input_ids"].tolist() for src in ranks), []) for _ in range(10)]

    one = global_batches(1)
    assert global_batches(2) == one and global_batches(4) == one
    assert sorted(sum(one, [])[:27]) == examples  # every example once per epoch, none dropped
    if grouped:  # each rank's rows are of similar length
        spread = sum(max(lengths[i] for i in b[:4]) - min(lengths[i] for i in b[:4]) for b in one[:3])
        assert spread < sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in one[:3])


def test_validation_batches_split_global_batches_across_ranks():
    """Every example scored once over the ranks; a rank with an empty slice gets a batch that counts nothing."""
    from lmforge.tasks.data import val_batches

    collate = lambda xs: {"input_ids": torch.tensor(xs), "labels": torch.tensor(xs)}  # noqa: E731
    examples = list(range(5))
    per_rank = [list(val_batches(examples, 2, collate, rank=r, world_size=2)()) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 2  # the same number of forward passes (FSDP)
    scored = sorted(x for batches in per_rank for b in batches for x in b["labels"].tolist() if x != -100)
    assert scored == examples
    assert per_rank[1][-1]["labels"].tolist() == [-100]
    assert [b["input_ids"].tolist() for b in val_batches(examples, 2, collate)()] == [[0, 1], [2, 3], [4]]


# ---- two torchrun processes ---------------------------------------------------------------------


def test_classify_two_processes_match_one_process_with_the_same_global_batch(data, tmp_path):
    """2 ranks x batch 2 against 1 x batch 4 over 8 steps: 27 examples, so step 7 spans two epochs."""
    one, ddp = tmp_path / "one", tmp_path / "ddp"
    # --eval-batches 2: 8 of the 9 val examples, the same 8 in both runs (2 global batches of 4)
    assert main(classify_args(data, one, "--batch-size", "4", "--max-steps", "8", "--eval-interval", "4",
                              "--eval-batches", "2")) == 0
    stdout = torchrun(classify_args(data, ddp, "--batch-size", "2", "--max-steps", "8", "--eval-interval", "4",
                                    "--eval-batches", "2"))
    assert_same(metric(one, "loss"), metric(ddp, "loss"))
    assert len(metric(ddp, "loss")) == 8
    assert_same(metric(one, "val_loss"), metric(ddp, "val_loss"))
    assert metric(one, "accuracy") == metric(ddp, "accuracy") and sorted(metric(ddp, "accuracy")) == [4, 8]
    # rank 0 alone wrote the run (no file rank 1 made, one end event) and reported it
    assert tree(ddp) == tree(one) and len(events(ddp, "end")) == 1
    assert stdout.count("trained 8 steps") == 1
    assert RunDir(ddp).read_config()["world_size"] == 2
    from lmforge.tasks.classification import load_classifier

    clf = load_classifier(ddp / "model", device="cpu")
    assert clf.model.labels == ["negative", "positive"]
    assert set(clf.predict(["it was great", "it was awful"])) <= {"negative", "positive"}
    a, b = load_classifier(one / "model", device="cpu").model, clf.model
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p - q).abs().max() < 1e-4, name


def test_sft_two_processes_with_accumulation_match_one_process(data, tmp_path):
    """2 ranks x batch 1 x grad_accum 2 against 1 x batch 4: response-token counts differ per rank and
    per micro-batch, so the loss is only equal if the masked-token count is taken over the whole step."""
    import lmforge

    one, ddp = tmp_path / "one", tmp_path / "ddp"
    assert main(sft_args(data, one, "--batch-size", "4", "--max-steps", "8", "--eval-interval", "8")) == 0
    torchrun(sft_args(data, ddp, "--batch-size", "1", "--grad-accum", "2", "--max-steps", "8", "--eval-interval", "8"))
    assert_same(metric(one, "loss"), metric(ddp, "loss"))
    assert_same(metric(one, "val_loss"), metric(ddp, "val_loss"))
    assert tree(ddp) == tree(one) and len(events(ddp, "end")) == 1
    model = lmforge.load_model(ddp / "model", device="cpu")
    assert model.config.extra["lmforge_sft"]["task"] == "translation"
    assert fp32_weights(ddp / "model") == {torch.float32}


# ---- bf16 autocast and gradient accumulation, one process ---------------------------------------


def run_bf16(make_args, data, tmp_path: Path, steps: int, falls_to: float) -> dict[int, float]:
    """A --dtype bf16 run after a 1-step fp32 run on the same weights and batch: autocast is really on
    (the first loss differs, a little), the loss falls below `falls_to` of its start, weights stay fp32."""
    common = ["--batch-size", "8", "--eval-interval", str(steps), "--lr", "1e-2"]
    assert main(make_args(data, tmp_path / "fp32", *common, "--max-steps", "1")) == 0
    assert main(make_args(data, tmp_path / "bf16", *common, "--max-steps", str(steps), "--dtype", "bf16")) == 0
    losses = metric(tmp_path / "bf16", "loss")
    assert all(math.isfinite(v) for v in losses.values())
    assert 1e-5 < abs(losses[1] - metric(tmp_path / "fp32", "loss")[1]) < 0.05
    assert sum(list(losses.values())[-4:]) / 4 < falls_to * sum(list(losses.values())[:4]) / 4
    val = metric(tmp_path / "bf16", "val_loss")
    assert list(val) == [steps] and math.isfinite(val[steps])
    assert fp32_weights(tmp_path / "bf16" / "model") == {torch.float32}
    return losses


def test_classify_bf16_trains_and_saves_fp32_weights(data, tmp_path):
    from lmforge.tasks.classification import load_classifier

    run_bf16(classify_args, data, tmp_path, steps=20, falls_to=0.25)
    (accuracy,) = metric(tmp_path / "bf16", "accuracy").values()
    assert accuracy >= 0.7
    clf = load_classifier(tmp_path / "bf16" / "model", device="cpu")
    assert clf.model.score.weight.dtype == torch.float32


def test_sft_bf16_trains_and_saves_fp32_weights(data, tmp_path):
    import lmforge

    run_bf16(sft_args, data, tmp_path, steps=25, falls_to=0.5)
    model = lmforge.load_model(tmp_path / "bf16" / "model", device="cpu")
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("task", ["classify", "sft"])
def test_grad_accum_equals_the_large_batch(data, tmp_path, task):
    """grad_accum 2 x batch 2 == batch 4 in fp32, across an epoch boundary (27 / 21 examples); classify
    with balanced class weights, sft with a different response-token count in every micro-batch."""
    make, extra = (classify_args, ["--class-weights", "balanced"]) if task == "classify" else (sft_args, [])
    common = [*extra, "--max-steps", "7", "--eval-interval", "7"]
    assert main(make(data, tmp_path / "big", *common, "--batch-size", "4")) == 0
    assert main(make(data, tmp_path / "acc", *common, "--batch-size", "2", "--grad-accum", "2")) == 0
    big, acc = metric(tmp_path / "big", "loss"), metric(tmp_path / "acc", "loss")
    assert_same(big, acc)
    assert len(set(big.values())) == 7  # the loss moves: the runs really trained
    assert_same(metric(tmp_path / "big", "val_loss"), metric(tmp_path / "acc", "val_loss"))
