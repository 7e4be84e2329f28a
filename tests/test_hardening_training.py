"""Hardening of runs, datasets and files (issue 18): --resume compares what the data is, not where it
lay; one run per directory (lock); a resume with nothing left to do; --resume without retyping;
metric typos before training; prepare builds beside and swaps; no empty folders after a failure;
file modes; a full disk is one line; shard indexes cannot point outside their folder; FSDP samples."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge._io import write_json_atomic, write_text_atomic
from lmforge.errors import CheckpointError, ConfigError, DataError, TrainingError
from lmforge.training import TrainConfig
from lmforge.training.checkpointing import RunDir
from lmforge.training.pretrain import pretrain

SMALL = dict(max_steps=4, batch_size=4, block_size=32, lr=3e-3, warmup_steps=1, eval_interval=2, eval_batches=1,
             log_interval=1, save_interval=2, progress=False, device="cpu", seed=3)
CLI_SMALL = ["--model", "tiny", "--block-size", "32", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "1",
             "--log-interval", "1", "--eval-batches", "1", "--eval-interval", "2", "--samples", "0", "--device", "cpu",
             "--seed", "3", "--no-progress"]


def _text(start: int, n: int = 12_000) -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))[start:start + n]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    """Two different text files and a prepared dataset of each (char-level)."""
    root = tmp_path_factory.mktemp("hard")
    out = {}
    for name, start in (("a", 0), ("b", 50_000)):
        (root / f"{name}.txt").write_text(_text(start), encoding="utf-8")
        tok = lmforge.CharTokenizer.train([root / f"{name}.txt"])
        lmforge.prepare(root / f"{name}.txt", tok, root / f"data_{name}", show_progress=False)
        out[name], out[f"data_{name}"] = root / f"{name}.txt", root / f"data_{name}"
    return out


def run(out: Path, data, **over):
    return pretrain(TrainConfig(out_dir=str(out), **{**SMALL, **over}), data=data, model="tiny", num_samples=0,
                    plot=False)


def _env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env.pop("LMFORGE_DEBUG", None)  # the CLI's one-line errors
    return env


def cli(*args, **popen):
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, env=_env(),
                          timeout=300, **popen)



def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in RunDir(run_dir).read_metrics() if "loss" in r}


# ---- --resume: what the data is, not where it was ------------------------------------------------------


def test_resume_refuses_other_data_and_follows_the_same_data_anywhere(corpora, tmp_path):
    run(tmp_path / "run", str(corpora["data_a"]), max_steps=2)
    saved = RunDir(tmp_path / "run").read_config()["data"]
    assert len(saved["fingerprint"]) == 16
    # a different prepared dataset: refused, naming both
    with pytest.raises(TrainingError, match="other data") as e:
        run(tmp_path / "run", str(corpora["data_b"]), resume=True)
    assert str(corpora["data_a"]) in str(e.value) and str(corpora["data_b"]) in str(e.value)
    # the same dataset copied elsewhere, and the run directory renamed: resumes
    shutil.copytree(corpora["data_a"], tmp_path / "copy_of_a")
    os.rename(tmp_path / "run", tmp_path / "moved")
    result = run(tmp_path / "moved", str(tmp_path / "copy_of_a"), resume=True).result
    assert (result.resumed_from, result.step) == (2, 4)


def test_resume_on_raw_text_checks_the_text_and_survives_a_move(corpora, tmp_path):
    run(tmp_path / "run", [str(corpora["a"])], max_steps=2)
    with pytest.raises(DataError, match="different text") as e:  # used to train on the old data silently
        run(tmp_path / "run", [str(corpora["b"])], resume=True)
    assert str(corpora["a"]) in str(e.value) and str(corpora["b"]) in str(e.value)
    os.rename(tmp_path / "run", tmp_path / "moved")  # used to say "data.directory differs"
    moved_text = tmp_path / "elsewhere.txt"
    shutil.copy(corpora["a"], moved_text)
    result = run(tmp_path / "moved", [str(moved_text)], resume=True, max_steps=3).result
    assert (result.resumed_from, result.step) == (2, 3)
    result = run(tmp_path / "moved", None, resume=True).result  # no --data: the run's own
    assert (result.resumed_from, result.step) == (3, 4)


def test_data_fingerprint_is_content_not_place(corpora, tmp_path):
    from lmforge.data import dataset_fingerprint, read_header

    fa, fb = (dataset_fingerprint(read_header(corpora[k])) for k in ("data_a", "data_b"))
    shutil.copy(corpora["a"], tmp_path / "renamed.txt")
    lmforge.prepare(tmp_path / "renamed.txt", lmforge.CharTokenizer.train([corpora["a"]]), tmp_path / "again",
                    show_progress=False)
    assert fa != fb and dataset_fingerprint(read_header(tmp_path / "again")) == fa


# ---- one run per directory ---------------------------------------------------------------------------


def test_second_run_on_the_same_directory_refuses_with_the_first_pid_and_a_kill_releases_it(corpora, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from lmforge.training.checkpointing import RunDir\n"
         "with RunDir(sys.argv[1]).lock():\n    print('locked', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TrainingError, match=rf"in use by another lmforge training run \(PID {holder.pid}\)"):
            run(out, str(corpora["data_a"]), max_steps=2)
        assert not (out / "config.json").exists() and not (out / "metrics.jsonl").exists()
        holder.send_signal(signal.SIGKILL)  # the kernel drops a dead process's lock
    finally:
        holder.kill()
        holder.wait()
    assert run(out, str(corpora["data_a"]), max_steps=2).result.step == 2
    assert not (out / ".lmforge.lock").exists()


def test_two_cli_runs_on_one_out_the_second_refuses(corpora, tmp_path, main):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "lmforge", "pretrain", *CLI_SMALL, "--data", str(corpora["data_a"]),
                              "--max-steps", "100000", "--save-interval", "1000", "--out", str(out)],
                             env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import time

        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert (out / "metrics.jsonl").exists()
        code, _, err = main("pretrain", *CLI_SMALL, "--data", corpora["data_a"], "--max-steps", "4", "--out", out,
                            "--resume")
    finally:
        first.kill()
        first.wait()
    assert code == 2
    assert f"(PID {first.pid})" in err and len(err.strip().splitlines()) == 1
    assert all(r.get("event") != "resume" for r in RunDir(out).read_metrics())  # the second never wrote


# ---- resume: nothing to do, settings from the run, typos ------------------------------------------------


def test_resume_at_max_steps_has_nothing_to_do(corpora, tmp_path, capsys):
    """max_steps a multiple of eval_interval: used to raise IndexError."""
    run(tmp_path / "run", str(corpora["data_a"]), max_steps=4)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    shutil.rmtree(tmp_path / "run" / "model")  # as if killed after the last checkpoint, before model/
    capsys.readouterr()
    outcome = run(tmp_path / "run", None, max_steps=4, resume=True)
    err = capsys.readouterr().err
    assert "resumed from step 4" in err and "already at max_steps 4; nothing to do" in err
    r = outcome.result
    assert r.nothing_to_do and r.step == 4 and "val_loss" in r.metrics
    assert lmforge.load_model(tmp_path / "run" / "model", device="cpu").config.n_layer == 2
    after = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert after.startswith(before) and json.loads(after.splitlines()[-1])["event"] == "resume"


def test_cli_resume_takes_the_run_settings_and_refuses_a_changed_one(corpora, tmp_path, main):
    out = tmp_path / "run"
    code, _, err = main("pretrain", *CLI_SMALL, "--data", corpora["a"], "--lr", "2e-3", "--beta2", "0.99",
                        "--max-steps", "4", "--out", out)
    assert code == 0, err
    code, stdout, err = main("pretrain", "--out", out, "--resume")  # nothing retyped
    assert code == 0, err
    assert "resumed from step 4" in err and "already at max_steps 4; nothing to do" in err
    assert "sample" not in stdout
    code, stdout, err = main("pretrain", "--out", out, "--resume", "--max-steps", "6", "--samples", "0")
    assert code == 0, err
    assert "resumed from step 4" in err and "trained 6 steps" in stdout
    saved = RunDir(out).read_config()["train"]
    assert (saved["lr"], saved["beta2"], saved["max_steps"], saved["progress"]) == (2e-3, 0.99, 6, False)
    code, _, err = main("pretrain", "--out", out, "--resume", "--lr", "1e-2", "--max-steps", "8")
    assert code == 2 and "train.lr: 0.002 -> 0.01" in err and "max_steps" in err
    assert len(err.strip().splitlines()) == 1


def test_best_metric_typo_is_refused_before_anything_happens(corpora, tmp_path, main):
    code, _, err = main("pretrain", *CLI_SMALL, "--data", corpora["a"], "--best-metric", "val_los",
                        "--out", tmp_path / "run")
    assert code == 2 and "did you mean 'val_loss'" in err
    assert not (tmp_path / "run").exists()  # not even the data was prepared
    with pytest.raises(ConfigError, match="no validation metrics"):
        run(tmp_path / "run2", str(corpora["data_a"]), best_metric="val_loss", eval_batches=0)
    # the Trainer checks too, and accepts the names an eval_fn declares
    train = lmforge.TokenDataset(corpora["data_a"], "train")
    model = lmforge.GPT(lmforge.GPTConfig(vocab_size=train.vocab_size, n_layer=1, n_head=2, n_embd=16, n_positions=32))
    source = lmforge.training.RandomBlocks(train, 2, 16)
    cfg = TrainConfig(out_dir=str(tmp_path / "t"), best_metric="acuracy", device="cpu", progress=False)
    with pytest.raises(ConfigError, match="did you mean 'accuracy'"):
        lmforge.training.Trainer(model, cfg, source, eval_fn=lambda m: {"accuracy": 1.0}, eval_metrics=["accuracy"])


# ---- prepare: build beside, swap at the end --------------------------------------------------------------


def _dataset_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_failed_prepare_keeps_the_old_dataset_and_leftovers_are_cleaned(corpora, tmp_path):
    out = tmp_path / "data"
    tok = lmforge.CharTokenizer.train([corpora["a"]])
    (out).mkdir()
    (out / "input.txt").write_text(_text(0), encoding="utf-8")  # nanoGPT's layout: the text beside the tokens
    lmforge.prepare(out / "input.txt", tok, out, show_progress=False)
    before = _dataset_bytes(out)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text\n" * 1000 + b"\xff\xfe broken")
    with pytest.raises(DataError, match="invalid UTF-8"):
        lmforge.prepare([out / "input.txt", bad], tok, out, show_progress=False)
    assert _dataset_bytes(out) == before  # dataset.json too: the old dataset is still readable
    assert len(lmforge.TokenDataset(out, "train")) > 0
    assert sorted(p.name for p in out.iterdir()) == sorted([*before, "tokenizer"])  # no temp files
    # what a killed prepare (this version or an earlier one) left is removed by the next one
    (out / ".tmp-prepare-999999").mkdir()
    (out / ".tmp-prepare-999999" / "train.bin").write_bytes(b"\0" * 4096)
    (out / ".train.bin.k3j2h1.tmp").write_bytes(b"\0" * 4096)
    header = lmforge.prepare(out / "input.txt", tok, out, show_progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted([*before, "tokenizer"])
    assert header["inputs"][0]["sha256"] and (out / "input.txt").is_file()


def test_failed_prepare_and_pretrain_leave_no_folders(corpora, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(DataError):
        lmforge.prepare(bad, lmforge.Tokenizer.byte_level(), tmp_path / "a" / "b" / "data", show_progress=False)
    assert not (tmp_path / "a").exists()
    with pytest.raises(DataError):
        run(tmp_path / "runs" / "x", [str(bad)])
    assert not (tmp_path / "runs").exists()
    with pytest.raises(DataError, match="block_size"):  # after the data was prepared into RUN/data
        run(tmp_path / "runs" / "y", [str(corpora["a"])], block_size=20_000)
    assert not (tmp_path / "runs").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(DataError, match="block_size"):  # a folder that existed keeps what was there, loses what the run made
        run(tmp_path / "mine", [str(corpora["a"])], block_size=20_000)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


# ---- file modes -------------------------------------------------------------------------------------------


def test_written_files_follow_the_umask_and_keep_an_existing_mode(corpora, tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "new.json", {"a": 1})
        assert stat.S_IMODE(os.stat(tmp_path / "new.json").st_mode) == 0o644
        (tmp_path / "shared.jsonl").write_text("x\n")
        os.chmod(tmp_path / "shared.jsonl", 0o664)
        write_text_atomic(tmp_path / "shared.jsonl", "y\n")  # e.g. an input reused as `run --output`
        assert stat.S_IMODE(os.stat(tmp_path / "shared.jsonl").st_mode) == 0o664
        os.umask(0o027)
        run(tmp_path / "run", [str(corpora["a"])], max_steps=2)
        files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
        modes = {p.relative_to(tmp_path / "run").as_posix(): stat.S_IMODE(p.stat().st_mode) for p in files}
        assert {"config.json", "model/model.safetensors", "data/train.bin", "data/dataset.json"} <= set(modes)
        assert set(modes.values()) == {0o640}, modes
    finally:
        os.umask(old)


# ---- a full disk is one line ------------------------------------------------------------------------------


def test_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_old_one(corpora, tmp_path, monkeypatch, main):
    import lmforge.training.checkpointing as ck

    out = str(tmp_path / "run")
    assert main("pretrain", *CLI_SMALL, "--data", corpora["data_a"], "--max-steps", "2", "--out", out)[0] == 0
    real_save = ck.torch.save

    def full_disk(obj, path, *a, **k):
        if "step_000004" in str(path) or "step_000004" in str(Path(path).parent):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ck.torch, "save", full_disk)
    code, _, err = main("pretrain", *CLI_SMALL, "--data", corpora["data_a"], "--max-steps", "4", "--out", out, "--resume")
    assert code == 2
    err = err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("resumed from step 2"), err  # no traceback
    assert "No space left on device" in err[1] and "previous checkpoint is intact" in err[1]
    assert RunDir(out).latest_checkpoint().name == "step_000002"


def test_real_writer_failures_are_one_line_too(corpora, tmp_path, main):
    """A real file-size limit makes safetensors and torch.save fail with their own error types
    (not OSError), as a full disk does: still one line, and the previous checkpoint stays."""
    out = str(tmp_path / "run")
    args = ["pretrain", *CLI_SMALL, "--data", str(corpora["data_a"]), "--out", out]
    assert main(*args, "--max-steps", "2")[0] == 0

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))  # > metrics and config, < the weights

    done = cli(*args, "--max-steps", "4", "--resume", preexec_fn=limit)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr and "previous checkpoint is intact" in lines[-1], done.stderr
    assert RunDir(out).latest_checkpoint().name == "step_000002"
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


# ---- shard indexes ----------------------------------------------------------------------------------------


def test_shard_index_entries_outside_the_folder_are_refused(tmp_path):
    model = lmforge.GPT(lmforge.GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, n_positions=32))
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt, max_shard_size=20_000)
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first_key, first_shard = next(iter(index["weight_map"].items()))
    assert lmforge.load_model(ckpt, device="cpu").config.n_layer == 2
    outside = tmp_path / "x.safetensors"
    shutil.copy(ckpt / first_shard, outside)
    for bad in ("../x.safetensors", str(outside), "/etc/passwd", "sub/../../x.safetensors"):
        tampered = {**index, "weight_map": {**index["weight_map"], first_key: bad}}
        index_path.write_text(json.dumps(tampered))
        with pytest.raises(CheckpointError, match=rf"weight_map entry '{first_key}'"):
            lmforge.load_model(ckpt, device="cpu")
    index_path.write_text(json.dumps(index))
    os.replace(ckpt / first_shard, tmp_path / "elsewhere.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", ckpt / first_shard)  # a symlink leading out
    with pytest.raises(CheckpointError, match="leads outside"):
        lmforge.load_model(ckpt, device="cpu")
    # a Hub cache snapshot's symlinks into its own blobs/ are fine
    repo = tmp_path / "models--me--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    shutil.copytree(ckpt, snap, symlinks=True)
    (snap / first_shard).unlink()
    os.replace(tmp_path / "elsewhere.safetensors", repo / "blobs" / "f00d")
    os.symlink(Path("..", "..", "blobs", "f00d"), snap / first_shard)
    reloaded = lmforge.load_model(snap, device="cpu")
    for p, q in zip(model.parameters(), reloaded.parameters()):
        assert torch.equal(p, q)


# ---- FSDP: the default samples -----------------------------------------------------------------------------


def test_fsdp_run_prints_the_default_samples(corpora, tmp_path):
    """Used to crash after training: the samples were drawn from the sharded (DTensor) model."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lmforge",
           "pretrain", *[a for a in CLI_SMALL if a not in ("--samples", "0")], "--data", str(corpora["data_a"]),
           "--max-steps", "2", "--fsdp", "--sample-length", "40", "--out", str(tmp_path / "run")]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("---------- sample") == 2  # the default: two samples, printed once (rank 0)
    assert "trained 2 steps" in done.stdout
