"""The `lmforge` command line: help, info, and one-line errors with a non-zero exit."""

import json
import subprocess
import sys

import pytest

from lmforge.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "info" in result.stdout


def test_info_prints_architecture_parameters_dtype_and_size(tiny_hf_dir, capsys):
    assert main(["info", str(tiny_hf_dir)]) == 0
    out = capsys.readouterr().out
    assert "2 layers x 4 heads, n_embd 32" in out and "float32" in out and "model.safetensors" in out
    assert main(["info", str(tiny_hf_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    from transformers import GPT2LMHeadModel

    assert info["parameters"] == GPT2LMHeadModel.from_pretrained(tiny_hf_dir).num_parameters()
    assert info["size_on_disk"] == (tiny_hf_dir / "model.safetensors").stat().st_size
    assert info["dtype"] == "float32" and info["n_positions"] == 64


@pytest.mark.parametrize("breakage", ["missing-config", "truncated", "no-such-dir", "bert"])
def test_bad_checkpoints_give_one_line_and_exit_2(tiny_hf_dir, breakage):
    target = str(tiny_hf_dir)
    if breakage == "missing-config":
        (tiny_hf_dir / "config.json").unlink()
    elif breakage == "truncated":
        path = tiny_hf_dir / "model.safetensors"
        path.write_bytes(path.read_bytes()[:7])
    elif breakage == "no-such-dir":
        target = str(tiny_hf_dir / "missing" / "dir")
    else:
        cfg = json.loads((tiny_hf_dir / "config.json").read_text())
        (tiny_hf_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    result = run_cli("info", target)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmforge info: error:")
    assert "Traceback" not in result.stderr
