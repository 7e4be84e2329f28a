"""The README cannot drift from the code: its Quickstart runs here, shrunk to tiny models, and every other
`lmforge ...` line and Python block in README.md and docs/ is checked against the real CLI and API.

The Quickstart runs as written, in a temporary folder, offline (HF_HUB_OFFLINE=1), with only the
substitutions in SUBSTITUTIONS below. Hub names are not substituted: the test puts a tiny checkpoint in a
folder of the same name (`gpt2`, `HuggingFaceTB/SmolLM2-135M-Instruct`), and the rule "an existing folder
wins over a Hub name" makes every command load it, exactly as the README's text says.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))

# Quickstart text -> what runs here. Each is applied to every Quickstart block before it runs.
SUBSTITUTIONS = [
    ("--max-steps 100", "--max-steps 3"),     # a few optimizer steps of a tiny model, not a real fine-tune
    ("--port 8000", "--port 0"),              # the server takes a free port; 8000 below becomes that port
]
# Lines not run here, and why. Anything else in the Quickstart runs.
NOT_RUN = {
    "python -m pip install -e .": "the package is installed already (the test suite runs inside that install)",
}
# Hub names in the Quickstart -> the tiny stand-in put in a folder of that name.
HUB_STAND_INS = {"gpt2": "tiny GPT-2, byte-level tokenizer", "HuggingFaceTB/SmolLM2-135M-Instruct": "tiny Llama, ChatML"}


# ---- reading the Markdown --------------------------------------------------------------------------


@dataclass
class Block:
    lang: str
    code: str
    line: int      # 1-based line of the opening fence
    section: str   # the "## " heading above it

    def where(self, path: Path = README) -> str:
        return f"{path.name}:{self.line} ({self.section})"


def fenced_blocks(text: str) -> list[Block]:
    """Every fenced code block, indented ones (inside list items) included, with its language."""
    blocks, section, lines, i = [], "", text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        fence = re.match(r"^(\s*)```(\w*)\s*$", line)
        if fence:
            indent, lang, start, body = len(fence.group(1)), fence.group(2), i + 1, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i][indent:] if lines[i].startswith(" " * indent) else lines[i].lstrip())
                i += 1
            blocks.append(Block(lang, "\n".join(body) + "\n", start, section))
        i += 1
    return blocks


def section_blocks(title: str) -> list[Block]:
    return [b for b in fenced_blocks(README.read_text()) if b.section == title]


def shell_lines(code: str) -> list[str]:
    """A bash block's commands: continuation lines joined, blank and comment-only lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def bash_argv(line: str, cwd: Path) -> list[str]:
    """The arguments bash itself gives `lmforge` on this line (quotes, $'...' and all), without running it."""
    script = 'lmforge() { printf "%s\\0" "$@"; }\n' + line
    out = subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, check=True, timeout=30).stdout
    return out.decode().split("\0")[:-1]


# ---- the Quickstart, run -----------------------------------------------------------------------------


def make_stand_ins(root: Path) -> None:
    """Tiny checkpoints in folders named like the Hub models the Quickstart uses."""
    from test_llama_tokenizer import qwen2_style

    from lmforge import GPT, GPTConfig, Tokenizer, preset

    tok = Tokenizer.byte_level()
    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=tok.vocab_size, n_positions=128,
                  bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(root / "gpt2", tokenizer=tok)
    chat = root / "HuggingFaceTB" / "SmolLM2-135M-Instruct"
    qwen2_style(chat)
    tok = Tokenizer.from_pretrained(chat)
    GPT(preset("llama-baby", n_layer=2, n_embd=32, n_head=2, n_kv_head=1, vocab_size=tok.vocab_size, bos_token_id=None,
               eos_token_id=tok.token_to_id("<|im_end|>"))).save_pretrained(chat, tokenizer=tok)
    assert set(HUB_STAND_INS) == {"gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct"}


class Server:
    """`lmforge serve` started from a Quickstart line, on a free port; always stopped."""

    def __init__(self, argv: list[str], cwd: Path):
        self.proc = subprocess.Popen([sys.executable, "-m", "lmforge", *argv, "--device", "cpu"], cwd=cwd,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert match, f"lmforge serve did not say where it listens: {line!r}"
        self.port = int(match.group(1))
        import httpx

        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None and time.monotonic() < deadline, "lmforge serve did not come up"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stderr.close()


def substitute(code: str, port: int | None) -> str:
    for old, new in SUBSTITUTIONS:
        code = code.replace(old, new)
    if port is not None:
        code = code.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    return code


def test_quickstart_runs_as_written(tmp_path, monkeypatch, capsys):
    from lmforge.cli import main

    blocks = section_blocks("Quickstart")
    assert len(blocks) >= 8, "the Quickstart lost its blocks (or its heading)"
    for old, _ in SUBSTITUTIONS:  # a substitution that matches nothing means the README changed under the test
        assert any(old in b.code for b in blocks), f"{old!r} no longer in the Quickstart: update SUBSTITUTIONS"
    monkeypatch.chdir(tmp_path)
    make_stand_ins(tmp_path)
    server, skipped, outputs, namespaces = None, [], [], []
    try:
        for block in blocks:
            code = substitute(block.code, server.port if server else None)
            if block.lang == "python":
                namespace: dict = {"__name__": "__readme__"}
                exec(compile(code, block.where(), "exec"), namespace)  # noqa: S102 - the README's own code
                namespaces.append(namespace)
                continue
            assert block.lang == "bash", f"{block.where()}: a Quickstart block needs a language (bash or python)"
            for line in shell_lines(code):
                if any(line.startswith(prefix) for prefix in NOT_RUN):
                    skipped.append(line)
                elif line.startswith("lmforge serve "):
                    assert server is None, "one server in the Quickstart"
                    server = Server(bash_argv(line, tmp_path), tmp_path)
                elif line.startswith("lmforge "):
                    argv = bash_argv(line, tmp_path)
                    capsys.readouterr()  # what earlier blocks printed
                    rc = main(argv)
                    captured = capsys.readouterr()
                    assert rc == 0, f"{block.where()}: `{line}` exited {rc}:\n{captured.err[-2000:]}"
                    outputs.append((argv, captured.out))
                else:
                    r = subprocess.run(["bash", "-c", line], cwd=tmp_path, capture_output=True, text=True, timeout=60)
                    assert r.returncode == 0, f"{block.where()}: `{line}` failed:\n{r.stderr[-2000:]}"
                    outputs.append((shlex.split(line)[:1], r.stdout))
    finally:
        if server is not None:
            server.stop()

    assert [s.split("#")[0].strip() for s in skipped] == list(NOT_RUN)
    # What the Quickstart promises, checked on what it left behind.
    first = namespaces[0]
    assert first["ids"].shape[1] > first["batch"]["input_ids"].shape[1]  # generated something after the prompt
    out = dict((" ".join(argv[:3]), text) for argv, text in outputs)
    assert out["generate --model gpt2"].count("Once upon a time") == 1  # printed with its continuation
    assert "assistant" in out["generate --model runs/chat/model"]  # the prompt went through the chat template
    for run in ("runs/reviews/best", "runs/reviews/model", "runs/qa/best", "runs/chat/model"):
        assert (tmp_path / run / "config.json").is_file(), f"{run} missing"
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert [r["text"] for r in scored] == ["a gorgeous, witty film", "dull and far too long"]
    assert all(r["predicted_label"] in ("positive", "negative") for r in scored)
    pipes = next(n for n in namespaces if "classify" in n)
    assert pipes["classify"]("a witty film")[0]["label"] in ("positive", "negative")
    assert set(pipes["answer"](question="Who went home?", context="Bob went home.")) >= {"answer", "score"}
    completion = json.loads(next(text for argv, text in outputs if argv == ["curl"]))
    assert completion["object"] == "text_completion" and completion["model"] == "gpt2"
    assert completion["usage"]["completion_tokens"] >= 1
    reply = namespaces[-1]["reply"]
    assert reply.object == "chat.completion" and reply.model == "gpt2" and reply.usage.completion_tokens >= 1
    assert server.proc.returncode == 0  # SIGTERM: a clean stop


def test_the_two_setup_commands_are_the_ci_and_the_main_job():
    """The set-up section keeps exactly the two commands `.ci/run` and newcomers rely on."""
    blocks = section_blocks("Set-up on a fresh machine")
    commands = [shell_lines(b.code) for b in blocks if b.lang == "bash"]
    assert commands[1] == ['python -m pip install -e ".[dev]" && python -m pytest -q']
    assert 'python -m pip install -q -e ".[dev]" && python -m pytest -q' in (ROOT / ".ci" / "run").read_text()
    install, job = commands[0][0].split(" && ")
    assert install == "python -m pip install -e ."
    assert job.startswith("lmforge pretrain ") and "--data" not in job  # the offline main job: the embedded corpus


def test_the_main_job_runs_in_small_form(tmp_path, monkeypatch, capsys):
    """The first command a newcomer runs: the README's own flags, 3 steps instead of 2000."""
    from lmforge.cli import main

    line = shell_lines(section_blocks("Set-up on a fresh machine")[0].code)[0].split(" && ")[1]
    assert "--max-steps 2000" in line
    monkeypatch.chdir(tmp_path)
    argv = bash_argv(line.replace("--max-steps 2000", "--max-steps 3") + " --eval-batches 2 --samples 1 "
                     "--sample-length 20", tmp_path)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "trained 3 steps" in out and "---------- sample 1 ----------" in out and "loss plot: " in out
    assert (tmp_path / "runs" / "demo" / "model" / "config.json").is_file()


# ---- every other block: checked against the real CLI and API -----------------------------------------


def all_blocks() -> list[tuple[Path, Block]]:
    return [(path, b) for path in (README, *DOCS) for b in fenced_blocks(path.read_text())]


def lmforge_invocations(code: str) -> list[list[str]]:
    """The argument lists of every `lmforge ...` (or `torchrun ... -m lmforge ...`) command in a bash block."""
    found = []
    for line in shell_lines(code):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)  # quotes as bash; | && ; as separators
        words, commands = [], []
        for word in lexer:
            if word in ("|", "||", "&&", ";", "&"):
                commands.append(words)
                words = []
            else:
                words.append(word)
        for words in (*commands, words):
            if words[:1] == ["lmforge"]:
                found.append(words[1:])
            elif words[:1] == ["torchrun"] and "lmforge" in words:
                found.append(words[words.index("lmforge") + 1:])
    return found


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_lmforge_command_in_the_docs_names_a_real_command_and_real_flags():
    """`lmforge --help` and `lmforge CMD --help` as data: each documented subcommand and flag must exist."""
    from lmforge.cli import build_parser

    commands = subcommands(build_parser())
    checked, problems = 0, []
    for path, block in all_blocks():
        if block.lang not in ("bash", "sh", "shell"):
            continue
        for words in lmforge_invocations(block.code):
            if not words or words[0].startswith("-"):
                continue  # `lmforge --help`
            parser = commands.get(words[0])
            if parser is None:
                problems.append(f"{block.where(path)}: no command `lmforge {words[0]}`")
                continue
            rest, command = words[1:], words[0]
            nested = subcommands(parser)
            if nested:
                name = next((w for w in rest if not w.startswith("-") and w != "..."), None)
                if name not in nested:
                    problems.append(f"{block.where(path)}: no command `lmforge {words[0]} {name}`")
                    continue
                parser, command = nested[name], f"{command} {name}"
            options = {s for action in parser._actions for s in action.option_strings}
            for word in rest:
                flag = word.split("=")[0]
                if flag.startswith("--") and flag != "--" and flag not in options:
                    problems.append(f"{block.where(path)}: `lmforge {command}` has no flag {flag}")
            checked += 1
    assert not problems, "\n".join(problems)
    assert checked >= 40  # the docs' command lines were found at all


def resolve(dotted: list[str]):
    """lmforge.a.b.c as the package has it (importing submodules on the way)."""
    obj = importlib.import_module("lmforge")
    for i, name in enumerate(dotted[1:], 1):
        if not hasattr(obj, name) and hasattr(obj, "__path__"):
            importlib.import_module(".".join(dotted[: i + 1]))
        obj = getattr(obj, name)
    return obj


def dotted_names(tree: ast.AST) -> list[list[str]]:
    """Every lmforge.x.y chain in a block, longest form only."""
    chains = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            parts, inner = [node.attr], node.value
            while isinstance(inner, ast.Attribute):
                parts.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id == "lmforge":
                chains.append(["lmforge", *reversed(parts)])
    return [c for c in chains if not any(len(o) > len(c) and o[: len(c)] == c for o in chains)]


def test_every_python_block_parses_imports_lmforge_and_names_real_api():
    problems = []
    blocks = [(p, b) for p, b in all_blocks() if b.lang == "python"]
    for path, block in blocks:
        try:
            tree = ast.parse(block.code)
        except SyntaxError as e:
            problems.append(f"{block.where(path)}: does not parse: {e}")
            continue
        imported = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        if dotted_names(tree) and "lmforge" not in imported:
            problems.append(f"{block.where(path)}: uses lmforge.* without `import lmforge`")
        for chain in dotted_names(tree):
            try:
                resolve(chain)
            except (AttributeError, ImportError) as e:
                problems.append(f"{block.where(path)}: {'.'.join(chain)} does not exist ({e})")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "lmforge":
                module = importlib.import_module(node.module)
                problems += [f"{block.where(path)}: `from {node.module} import {a.name}`: no such name"
                             for a in node.names if not hasattr(module, a.name)]
    assert not problems, "\n".join(problems)
    assert len(blocks) >= 12


def github_anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_links_between_the_readme_and_docs_resolve():
    problems = []
    for path in (README, *DOCS):
        text = path.read_text()
        anchors = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith("http"):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.is_file():
                problems.append(f"{path.name}: link to missing {file}")
                continue
            targets = anchors if not file else {github_anchor(h) for h in re.findall(r"^#+ (.+)$", linked.read_text(), re.M)}
            if anchor and anchor not in targets:
                problems.append(f"{path.name}: link to missing section {target}")
    assert not problems, "\n".join(problems)
    assert DOCS, "docs/ holds the benchmark figures and internals the README links to"


def test_quickstart_comes_first_and_each_task_has_a_section():
    text = README.read_text()
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings[:3] == ["Set-up on a fresh machine", "Quickstart", "Contents"]
    for title in ("The model", "Hugging Face checkpoints", "Tokenizers", "Token datasets: `lmforge prepare`",
                  "Pretraining: `lmforge pretrain`", "Generation", "Serving: `lmforge serve`",
                  "Fine-tuning, LoRA and pipelines", "Evaluation", "The command line", "How to add a model family"):
        assert title in headings, title
    quickstart = text.index("## Quickstart")
    assert text.index('lmforge.load_model("gpt2")') > quickstart
    assert text.index('lmforge.load_model("gpt2")') < text.index("## Contents")
