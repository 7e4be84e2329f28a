"""Build and load the compiled kernels once per process, on first use; remember why when that is impossible."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("gemv.cpp")  # the translation unit; it includes the headers beside it
_UNTRIED = object()
_lock = threading.Lock()
_ops: object = _UNTRIED  # the extension module, or None when unavailable
_reason: str | None = "the compiled kernels have not been needed yet"
build_seconds: float | None = None  # how long the first build (or cache load) of this process took


def ops():
    """The compiled extension module, or None (then `reason()` says why). Builds it on the first call."""
    if _ops is _UNTRIED:
        _load()
    return _ops


def reason() -> str | None:
    return _reason


def reset() -> None:
    """Forget the outcome so that the next `ops()` decides again (tests; after changing LMFORGE_KERNELS)."""
    global _ops, _reason
    with _lock:
        _ops, _reason = _UNTRIED, "the compiled kernels have not been needed yet"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _flags() -> tuple[list[str], list[str]]:
    """Compiler and linker flags: native vector width, and OpenMP when torch's at::parallel_for uses it."""
    machine = platform.machine().lower()
    cflags = ["-O2", "-mcpu=native" if machine in ("aarch64", "arm64") else "-march=native"]
    ldflags: list[str] = []
    if "parallel backend: OpenMP" in torch.__config__.parallel_info():
        # at::parallel_for is inline over `#pragma omp parallel`: compile it with OpenMP and link the
        # libgomp torch ships (same soname, so the loader reuses torch's copy: one thread pool, not two).
        cflags.append("-fopenmp")
        bundled = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
        ldflags += [str(bundled[0]), f"-Wl,-rpath,{bundled[0].parent}"] if bundled else ["-fopenmp"]
    return cflags, ldflags


def _cache_dir(key: str) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "lmforge" / "kernels" / key


def _ninja_path() -> str | None:
    if shutil.which("ninja"):
        return None
    try:
        import ninja  # the PyPI wheel: its binary may sit in a venv bin/ that is not on PATH
    except ImportError:
        return ""
    return str(getattr(ninja, "BIN_DIR", ""))


def _why_not() -> str | None:
    if os.environ.get("LMFORGE_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return "disabled by the environment variable LMFORGE_KERNELS=0"
    if sys.platform == "win32":
        return "the compiled kernels are built with gcc/clang; on Windows the torch path is used"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler found ({compiler!r} is not on PATH; install g++ or clang, or set CXX)"
    if _ninja_path() == "":
        return "ninja is not installed (pip install ninja)"
    return None


def _import_built(name: str, build_dir: Path):
    """The module built earlier into this cache folder (its name hashes the source, torch, Python, CPU and
    flags, so it cannot be stale), imported directly: ninja and cpp_extension cost about a second."""
    path = build_dir / f"{name}.so"  # the name torch.utils.cpp_extension gives it
    if not path.is_file():
        return None
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (ImportError, OSError):
        return None  # a half-written file from an interrupted build: build again
    return module


def _load() -> None:
    global _ops, _reason, build_seconds
    with _lock:
        if _ops is not _UNTRIED:
            return
        why = _why_not()
        if why is not None:
            _ops, _reason = None, why
            return
        start = time.perf_counter()
        source = SOURCE.read_bytes() + b"".join(h.read_bytes() for h in sorted(SOURCE.parent.glob("*.h")))
        cflags, ldflags = _flags()
        ident = "\n".join([torch.__version__, sys.version, _cpu_flags(), " ".join(cflags + ldflags)])
        key = hashlib.sha256(source + ident.encode()).hexdigest()[:16]
        name, build_dir = f"lmforge_gemv_{key}", _cache_dir(key)
        ninja_dir, old_path = _ninja_path(), os.environ.get("PATH", "")
        try:
            module = _import_built(name, build_dir)
            if module is None:
                from torch.utils import cpp_extension

                build_dir.mkdir(parents=True, exist_ok=True)
                if ninja_dir:
                    os.environ["PATH"] = ninja_dir + os.pathsep + old_path
                module = cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=cflags,
                                            extra_ldflags=ldflags, build_directory=str(build_dir), verbose=False)
        except Exception as e:  # any build or load failure means "use torch", with the reason kept
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            errors = [line for line in lines if "error:" in line] or lines[-2:]  # the compiler's diagnostics
            _ops, _reason = None, (f"building the CPU kernels in {build_dir} failed ({type(e).__name__}: "
                                   f"{' | '.join(errors[:3])[:400]}); using torch instead")
            return
        finally:
            if ninja_dir:
                os.environ["PATH"] = old_path
        build_seconds = time.perf_counter() - start
        _ops, _reason = module, None
