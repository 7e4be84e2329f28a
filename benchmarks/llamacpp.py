"""llama.cpp as an optional peer for benchmarks/generate.py: build it, convert weights, run llama-bench.

Nothing here is part of lmforge and lmforge itself downloads nothing: this set-up is run by hand.

    python benchmarks/llamacpp.py build [--dir DIR]   # pip download the llama-cpp-python sdist (it vendors
                                                     # llama.cpp), build llama-bench with cmake (native, Release)
    python benchmarks/llamacpp.py where               # print what find() sees

The default directory is ~/.cache/lmforge-bench/llama.cpp (or $LMFORGE_LLAMACPP_DIR). The build step
also pip-installs the converter's few Python dependencies (the vendored gguf-py is used from the
source tree, so the converter and its gguf library always match). generate.py calls find(); where it
gives None the llama.cpp rows are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

DEFAULT_DIR = Path(os.environ.get("LMFORGE_LLAMACPP_DIR", Path.home() / ".cache" / "lmforge-bench" / "llama.cpp"))
OUTTYPES = {"fp32": "f32", "bf16": "bf16", "int8": "q8_0", "f32": "f32", "q8_0": "q8_0"}
# gguf-py's own dependencies and what convert_hf_to_gguf.py imports for the byte-level BPE models used here
CONVERTER_DEPS = ["numpy", "tqdm", "pyyaml", "requests", "sentencepiece", "safetensors"]
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
               "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DBUILD_SHARED_LIBS=OFF"]


def _source_dir(directory: Path) -> Path | None:
    found = sorted(directory.glob("llama_cpp_python-*/vendor/llama.cpp"))
    return found[-1] if found else None


def find(directory: Path | str | None = None) -> dict | None:
    """The built llama-bench, the vendored converter and gguf-py, and the sdist version; None when absent."""
    directory = Path(directory) if directory else DEFAULT_DIR
    src = _source_dir(directory) if directory.is_dir() else None
    if src is None:
        return None
    bench = directory / "build" / "bin" / "llama-bench"
    convert = src / "convert_hf_to_gguf.py"
    if not (bench.is_file() and os.access(bench, os.X_OK) and convert.is_file()):
        return None
    info_file = directory / "build-info.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    return dict(bench=str(bench), convert=str(convert), gguf_py=str(src / "gguf-py"),
                version=src.parent.parent.name.removeprefix("llama_cpp_python-"), **info)


def build(directory: Path | str | None = None, jobs: int = 2) -> dict:
    """Fetch the llama-cpp-python sdist with pip (reusing one already in `directory`), build llama-bench
    from its vendored llama.cpp, install the converter's Python dependencies. Returns find()'s dict."""
    directory = Path(directory) if directory else DEFAULT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sdists = sorted(directory.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "llama-cpp-python", "-d", str(directory)], check=True)
        sdists = sorted(directory.glob("llama_cpp_python-*.tar.gz"))
    if _source_dir(directory) is None:
        with tarfile.open(sdists[-1]) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(directory, filter="data")
            else:  # Python < 3.10.12 / 3.11.4
                tar.extractall(directory)
    src = _source_dir(directory)
    downloaded = time.perf_counter()
    build_dir = directory / "build"
    subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir), *CMAKE_FLAGS], check=True)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", "llama-bench", "-j", str(jobs)], check=True)
    built = time.perf_counter()
    missing = [d for d in CONVERTER_DEPS if not _importable({"pyyaml": "yaml"}.get(d, d))]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", *missing], check=True)
    info = dict(fetch_s=round(downloaded - start, 1), build_s=round(built - downloaded, 1),
                cmake_flags=CMAKE_FLAGS, built_at=time.strftime("%Y-%m-%d %H:%M:%S"))
    (directory / "build-info.json").write_text(json.dumps(info, indent=1) + "\n")
    found = find(directory)
    if found is None:
        raise RuntimeError(f"llama-bench was not produced under {build_dir / 'bin'}")
    return found


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# Vocabularies llama.cpp ships (models/ggml-vocab-*.gguf) for checkpoints without tokenizer files, as the
# random-weight ones generate.py builds: same vocab size as the model, so the token table matches.
VOCAB_FOR = {"gpt2": "gpt-2", "llama": "starcoder", "qwen2": "qwen2"}
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def convert(hf_dir: Path | str, outtype: str, out_dir: Path | str | None = None,
            llama: dict | None = None) -> Path:
    """A GGUF of a Hugging Face checkpoint folder made by the vendored convert_hf_to_gguf.py.

    outtype: fp32/f32, bf16 or int8/q8_0. The folder is staged in a temp copy (symlinks to the weights)
    with `n_ctx` added to a GPT-2 config.json: transformers 5 no longer writes it and the GPT-2
    converter reads it. A folder without tokenizer files (random weights) gets the vocabulary of the
    llama.cpp test vocab of the same size (models/ggml-vocab-*.gguf): the tokenizer does not change
    the arithmetic llama-bench times, only the token table has to have the model's size.
    """
    llama = llama or find()
    if llama is None:
        raise RuntimeError("llama.cpp is not built: python benchmarks/llamacpp.py build")
    hf_dir = Path(hf_dir)
    gguf_type = OUTTYPES[outtype]
    out_dir = Path(out_dir) if out_dir else hf_dir.parent
    out = out_dir / f"{hf_dir.name}-{gguf_type}.gguf"
    if out.is_file():
        return out
    config = json.loads((hf_dir / "config.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / hf_dir.name
        staged.mkdir()
        for item in hf_dir.iterdir():
            if item.name != "config.json":
                (staged / item.name).symlink_to(item.resolve())
        if config.get("model_type") == "gpt2" and "n_ctx" not in config:
            config["n_ctx"] = config.get("n_positions", 1024)
        (staged / "config.json").write_text(json.dumps(config, indent=1))
        cmd = [sys.executable, __file__, "_convert", llama["convert"], str(staged), "--outtype", gguf_type,
               "--outfile", str(out)]
        if not any((hf_dir / name).is_file() for name in TOKENIZER_FILES):
            cmd[3:3] = ["--vocab", str(_vocab_gguf(Path(llama["convert"]).parent, config))]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([llama["gguf_py"], os.environ.get("PYTHONPATH", "")]))
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if result.returncode != 0 or not out.is_file():
            out.unlink(missing_ok=True)
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
            raise RuntimeError(f"convert_hf_to_gguf.py --outtype {gguf_type} failed on {hf_dir}:\n{tail}")
    return out


def _vocab_gguf(llama_src: Path, config: dict) -> Path:
    """llama.cpp's test vocabulary for this config's model type, checked to have its vocab size."""
    name = VOCAB_FOR.get(config.get("model_type"))
    path = llama_src / "models" / f"ggml-vocab-{name}.gguf"
    if name is None or not path.is_file():
        raise RuntimeError(f"no llama.cpp test vocabulary for model_type {config.get('model_type')!r} "
                           f"(known: {sorted(VOCAB_FOR)}); save a tokenizer beside the weights")
    return path


def _convert_with_vocab(convert_py: str, vocab: str | None, argv: list[str]) -> None:
    """Run convert_hf_to_gguf.py's main in this process; with `vocab`, the model's vocabulary (tokens,
    types, merges, special ids, pre-tokenizer name) is copied from that GGUF instead of tokenizer files."""
    sys.path.insert(0, str(Path(convert_py).parent))
    import convert_hf_to_gguf as converter

    if vocab is not None:
        cache = Path(vocab + ".tokenizer.json")  # GGUFReader takes ~20 s over 50k tokens: read it once
        if cache.is_file():
            fields = json.loads(cache.read_text())
        else:
            import gguf

            reader = gguf.GGUFReader(vocab)
            fields = {name: field.contents() for name, field in reader.fields.items() if name.startswith("tokenizer.")}
            cache.write_text(json.dumps(fields))
        n_vocab = len(fields["tokenizer.ggml.tokens"])

        def set_vocab(self) -> None:
            if self.hparams.get("vocab_size", n_vocab) != n_vocab:
                raise ValueError(f"{vocab} has {n_vocab} tokens, the model {self.hparams['vocab_size']}")
            w = self.gguf_writer
            w.add_tokenizer_model(fields["tokenizer.ggml.model"])
            w.add_tokenizer_pre(fields["tokenizer.ggml.pre"])
            w.add_token_list(fields["tokenizer.ggml.tokens"])
            w.add_token_types(fields["tokenizer.ggml.token_type"])
            if "tokenizer.ggml.merges" in fields:
                w.add_token_merges(fields["tokenizer.ggml.merges"])
            for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id),
                             ("unknown", w.add_unk_token_id), ("padding", w.add_pad_token_id)):
                if f"tokenizer.ggml.{key}_token_id" in fields:
                    add(int(fields[f"tokenizer.ggml.{key}_token_id"]))

        original = converter.get_model_class

        def get_model_class(*args, **kwargs):
            cls = original(*args, **kwargs)
            return type(cls.__name__, (cls,), {"set_vocab": set_vocab, "model_arch": cls.model_arch})

        converter.get_model_class = get_model_class
    sys.argv = [convert_py, *argv]
    converter.main()


def parse_bench_json(text: str) -> dict:
    """llama-bench -o json -> {"tg": tokens/s, "pp": tokens/s, ...} keyed by test kind ("tg" for n_gen
    runs, "pp" for n_prompt runs), with the raw per-test records under "records"."""
    records = json.loads(text)
    out: dict = {"records": records}
    for r in records:
        n_prompt, n_gen = int(r.get("n_prompt", 0)), int(r.get("n_gen", 0))
        kind = "tg" if n_gen > 0 and n_prompt == 0 else "pp" if n_prompt > 0 and n_gen == 0 else "pg"
        out[kind] = float(r["avg_ts"])
        out[kind + "_stddev"] = float(r.get("stddev_ts", 0.0))
        out.setdefault("build_commit", r.get("build_commit"))
        out.setdefault("cpu_info", r.get("cpu_info"))
        out.setdefault("type", r.get("model_type"))
    return out


def bench(gguf: Path | str, threads: int, n_gen: int = 64, n_prompt: int = 512, repetitions: int = 5,
          llama: dict | None = None, timeout: float = 1800) -> dict:
    """llama-bench on one GGUF: batch-1 decode ("tg", tokens/s over n_gen tokens) and prefill ("pp",
    tokens/s over an n_prompt-token prompt); either is skipped when its count is 0."""
    llama = llama or find()
    if llama is None:
        raise RuntimeError("llama.cpp is not built: python benchmarks/llamacpp.py build")
    cmd = [llama["bench"], "-m", str(gguf), "-t", str(threads), "-n", str(n_gen), "-p", str(n_prompt),
           "-r", str(repetitions), "-o", "json"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{tail}")
    return parse_bench_json(result.stdout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="download the llama-cpp-python sdist and build llama-bench")
    b.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    b.add_argument("--jobs", type=int, default=2)
    w = sub.add_parser("where", help="print the paths find() gives")
    w.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    c = sub.add_parser("_convert")  # convert()'s child process: the converter with a vocabulary from a GGUF
    c.add_argument("convert_py")
    c.add_argument("--vocab")
    args, rest = p.parse_known_args(argv)
    if args.command == "_convert":
        _convert_with_vocab(args.convert_py, args.vocab, rest)
        return 0
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "build":
        if shutil.which("cmake") is None:
            print("cmake is not installed (pip install cmake, or your system's package)", file=sys.stderr)
            return 2
        print(json.dumps(build(args.dir, args.jobs), indent=1))
    else:
        found = find(args.dir)
        print(json.dumps(found, indent=1) if found else f"no llama.cpp build under {args.dir}")
        return 0 if found else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
