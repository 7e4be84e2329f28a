"""Atomic file writes: write to a temp file in the same folder, fsync, rename.

A reader therefore sees either the old file or the complete new one, never a half-written file,
even when the writing process is killed. A new file gets the mode the umask gives (as open() would),
a replaced file keeps its mode. Also the one reader of optional JSON side files, and the lock that
keeps two processes from writing one directory (a run, a dataset) at the same time.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

LOCK_FILE = ".lmforge.lock"


def current_umask() -> int:
    """The process umask, read without changing it where the platform allows."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it (briefly)
    os.umask(mask)
    return mask


def file_mode(path: str | os.PathLike) -> int:
    """The mode a rewrite of `path` should have: the existing file's, else what the umask gives."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path` atomically."""
    path = Path(path)
    created = make_dirs(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except BaseException:
        remove_empty_dirs(created)
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            # mkstemp makes 0600, and some writers (safetensors) recreate the file 0600 themselves
            os.fchmod(f.fileno(), file_mode(path))
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        remove_empty_dirs(created)  # a failed write leaves no folders it made
        raise


def check_writable(path: str | os.PathLike, error: type[Exception], what: str = "output") -> Path:
    """Fail with `error` now, before any work, when a file could not be written to `path` later: it
    is a directory, a parent is a file, or the nearest existing folder takes no new file (permissions,
    a read-only filesystem: tried with a probe file, which is removed). Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} {path}: is a directory; give a file path")
    existing = next(p for p in path.absolute().parents if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise error(f"{what} {path}: {existing} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".lmforge-probe.", suffix=".tmp", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise error(f"{what} {path}: cannot write in {existing} ({e.strerror or e})") from None
    return path


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """Call `write(tmp_path)` and move the result to `path` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def fsync_dir(directory: Path) -> None:
    # Make the rename itself durable; not every platform lets a directory be opened.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def make_dirs(path: str | os.PathLike) -> list[Path]:
    """mkdir -p `path`; return the folders it created, outermost first (for remove_empty_dirs)."""
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.exists()][::-1]
    path.mkdir(parents=True, exist_ok=True)
    return missing


def remove_empty_dirs(created: list[Path]) -> None:
    """Undo make_dirs after a failure: remove those folders, innermost first, that are still empty."""
    for p in reversed(created):
        try:
            p.rmdir()
        except OSError:
            return  # not empty (or gone): it and its parents stay


def remove_stale_temps(directory: Path, names: list[str]) -> None:
    """Delete the temp files atomic_path left for `names` in `directory` when a writer was killed.
    Only call it while holding the directory's lock, when no write there can be in flight."""
    for name in names:
        for p in directory.glob(f".{glob.escape(name)}.*.tmp"):
            with contextlib.suppress(OSError):
                p.unlink()


def read_json_object(path: Path, error: type[Exception]) -> dict[str, Any]:
    """The JSON object in `path`, {} when the file does not exist; `error` (naming the file and the
    fix) when it is not valid JSON or not an object."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e}); fix or delete the file") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# ---- one writer per directory --------------------------------------------------------------

_HELD: dict[str, list[int]] = {}  # lock file -> [fd, depth]: a process may take its own lock again


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike, error: type[Exception], what: str = "run") -> Iterator[None]:
    """Hold an exclusive lock on `directory` (which must exist) for the block.

    flock on DIR/.lmforge.lock: the kernel releases it when the process ends, however it ends, so a
    killed run never leaves a stale lock. A second process gets `error` naming the holder's PID.
    Taking it again in the same process nests.
    """
    path = Path(directory) / LOCK_FILE
    key = os.path.realpath(path)
    if key in _HELD:
        _HELD[key][1] += 1
    else:
        _HELD[key] = [_acquire(path, error, what), 1]
    try:
        yield
    finally:
        held = _HELD[key]
        held[1] -= 1
        if held[1] == 0:
            del _HELD[key]
            with contextlib.suppress(OSError):
                path.unlink()  # while still locked, so no one can be waiting on this file
            os.close(held[0])


def _acquire(path: Path, error: type[Exception], what: str) -> int:
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = ""
            with contextlib.suppress(OSError, UnicodeDecodeError):
                holder = path.read_text().strip()
            raise error(f"{path.parent} is in use by another lmforge {what} (PID {holder or 'unknown'}); wait for "
                        f"it to finish, or use another directory") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder removed the file as we opened it: lock the new one
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)
