"""A tiny Llama (grouped-query attention, RoPE, RMSNorm, SwiGLU) under two real torchrun processes
(gloo, CPU): DDP and FSDP2 give the single-process losses for the same global batch, as the GPT-2
runs of test_distributed.py do (whose helpers and dataset this reuses). Validation batches are
per-rank batch_size, so only the DDP run (4 x 2 ranks = 8) scores the single process's val set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lmforge
from lmforge.data import TokenDataset
from lmforge.training.checkpointing import RunDir

from test_distributed import COMMON, assert_same, dataset, losses, single, torchrun  # noqa: F401 (dataset: fixture)

STEPS = ["--max-steps", "6", "--eval-interval", "3"]


@pytest.fixture(scope="module")
def llama_config(dataset, tmp_path_factory) -> Path:  # noqa: F811
    """An lmforge config .json (what `--model` takes besides presets): llama-baby cut to 2 layers of
    width 64, 4 query heads sharing 2 key/value heads, over the data's vocabulary."""
    config = lmforge.preset("llama-baby", n_layer=2, n_embd=64, n_head=4, n_kv_head=2, n_inner=128, n_positions=64,
                            vocab_size=TokenDataset(dataset, "train").vocab_size)
    path = tmp_path_factory.mktemp("llama-config") / "tiny-llama.json"
    path.write_text(json.dumps(config.to_dict()))
    return path


@pytest.fixture(scope="module")
def one_process(dataset, llama_config, tmp_path_factory) -> Path:  # noqa: F811
    """The reference: one process, global batch 8."""
    out = tmp_path_factory.mktemp("llama-one") / "run"
    single([*COMMON, "--model", str(llama_config), "--data", str(dataset), *STEPS, "--batch-size", "8", "--out", str(out)])
    return out


def test_ddp_two_processes_match_one_process(dataset, llama_config, one_process, tmp_path):  # noqa: F811
    torchrun([*COMMON, "--model", str(llama_config), "--data", str(dataset), *STEPS, "--batch-size", "4",
              "--out", str(tmp_path / "ddp")])
    assert_same(losses(one_process), losses(tmp_path / "ddp"))
    assert_same(losses(one_process, "val_loss"), losses(tmp_path / "ddp", "val_loss"))
    assert RunDir(tmp_path / "ddp").read_config()["world_size"] == 2
    model = lmforge.load_model(tmp_path / "ddp" / "model", device="cpu")
    assert (model.config.family, model.config.n_kv_heads, model.config.positions) == ("llama", 2, "rope")


def test_fsdp_two_processes_with_accumulation_match_one_process(dataset, llama_config, one_process, tmp_path):  # noqa: F811
    torchrun([*COMMON, "--model", str(llama_config), "--data", str(dataset), *STEPS, "--batch-size", "2",
              "--grad-accum", "2", "--fsdp", "--out", str(tmp_path / "fsdp")])
    assert_same(losses(one_process), losses(tmp_path / "fsdp"))
    a = lmforge.load_model(one_process / "model", device="cpu")
    b = lmforge.load_model(tmp_path / "fsdp" / "model", device="cpu")  # the gathered checkpoint, a normal directory
    assert a.state_dict().keys() == b.state_dict().keys()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p - q).abs().max() < 1e-4, name
