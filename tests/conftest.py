"""Shared fixtures: tiny random GPT-2 models and checkpoints made on the spot (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests never touch the network: hub names must resolve from the (empty) cache or fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def hf_gpt2(seed: int = 0, **config_kwargs):
    """A randomly initialised transformers GPT2LMHeadModel (the oracle) in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    defaults = dict(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                    bos_token_id=0, eos_token_id=0)
    defaults.update(config_kwargs)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**defaults)).eval()


@pytest.fixture
def tiny_hf_dir(tmp_path):
    """A directory holding a tiny GPT-2 checkpoint written by transformers' save_pretrained."""
    model = hf_gpt2()
    directory = tmp_path / "tiny-gpt2"
    model.save_pretrained(directory)
    return directory


@pytest.fixture
def shared_data() -> Path:
    """../shared/data, or skip the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (its small form runs by default)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
