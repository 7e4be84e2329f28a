"""Shared fixtures: tiny random GPT-2 models and checkpoints made on the spot (no downloads)."""

from __future__ import annotations

import collections
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


class KernelSpy:
    """The compiled kernels module with a count of calls per entry point, so that a test knows which path
    ran (`counts["gemv"]`, `counts["causal"]`, ...); everything else is the module's own."""

    def __init__(self, real):
        self.real, self.counts = real, collections.Counter()

    def __getattr__(self, name):
        entry = getattr(self.real, name)
        if not callable(entry):
            return entry

        def counted(*args):
            self.counts[name] += 1
            return entry(*args)

        return counted


@pytest.fixture
def compiled(monkeypatch):
    """The compiled CPU kernels, counted (skips where they cannot be built)."""
    from lmforge import kernels
    from lmforge.kernels import _build

    if not kernels.available():
        pytest.skip(kernels.why_unavailable())
    spy = KernelSpy(_build.ops())
    monkeypatch.setattr(_build, "_ops", spy)
    return spy


@pytest.fixture
def tiny_hf_dir(tmp_path):
    """A directory holding a tiny GPT-2 checkpoint written by transformers' save_pretrained."""
    model = hf_gpt2()
    directory = tmp_path / "tiny-gpt2"
    model.save_pretrained(directory)
    return directory


def byte_level_lm(directory: Path, n_positions: int = 64) -> Path:
    """A tiny random GPT-2-shaped lmforge model with the 257-id byte tokenizer, saved to `directory`."""
    from lmforge.config import GPTConfig
    from lmforge.model import GPT
    from lmforge.tokenizer import Tokenizer

    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=257, n_positions=n_positions, n_embd=32, n_layer=2, n_head=4)).save_pretrained(
        directory, tokenizer=Tokenizer.byte_level())
    return directory


@pytest.fixture
def main(monkeypatch, capsys):
    """The lmforge CLI in this process (no interpreter start-up): main(*args) -> (exit code, stdout, stderr)."""
    from lmforge.cli import main as cli_main

    monkeypatch.delenv("LMFORGE_DEBUG", raising=False)

    def call(*args):
        capsys.readouterr()
        code = cli_main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err
    return call


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
