"""The run directory: resolved config, metrics log, and atomic checkpoints that a killed run resumes from.

    RUN_DIR/config.json                 the resolved configuration (train, model, data, ...)
    RUN_DIR/metrics.jsonl               one JSON object per log or evaluation event
    RUN_DIR/checkpoints/step_000500/    model/ (an HF-loadable model directory) + trainer.pt
    RUN_DIR/latest.json                 which checkpoint to resume from (written last)
    RUN_DIR/model/, RUN_DIR/best/       the final model and the best one by the chosen metric

A checkpoint is written into a hidden temporary folder and renamed into place only when complete,
and latest.json moves after that, so a process killed mid-write (or a full disk) leaves the
previous checkpoint as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from lmforge._io import directory_lock, remove_stale_temps, write_json_atomic, write_text_atomic
from lmforge.errors import LmforgeError, TrainingError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
LATEST_FILE = "latest.json"
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer.pt"
MODEL_DIR = "model"
_TMP_PREFIX = ".tmp-"


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def write_dir_atomic(target: Path, fill: Callable[[Path], None]) -> None:
    """Build a directory in a temporary sibling with `fill(tmp)`, then swap it in for `target`.

    On any failure (a full disk, an exception in `fill`) the temporary folder is removed, `target`
    is untouched, and a TrainingError says what happened.
    """
    target = Path(target)
    tmp = target.parent / f"{_TMP_PREFIX}{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        _fsync_tree(tmp)
        if target.exists():
            old = target.parent / f"{_TMP_PREFIX}old-{target.name}-{os.getpid()}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and not isinstance(e, LmforgeError):
            # A full disk reaches us as OSError, or as torch.save's RuntimeError or safetensors' own
            # error type: whichever writer failed, the folder was not replaced.
            raise TrainingError(f"could not write {target}: {_reason(e)}; the previous checkpoint is intact "
                                f"(free disk space, then resume with --resume)") from e
        raise


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


class RunDir:
    """Paths and files of one training run."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def model_dir(self) -> Path:
        return self.path / MODEL_DIR

    @property
    def best_dir(self) -> Path:
        return self.path / "best"

    # ---- config ------------------------------------------------------------------------------

    def read_config(self) -> dict[str, Any] | None:
        path = self.path / CONFIG_FILE
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TrainingError(f"{path} is not valid JSON ({e}); it is not an lmforge run directory") from None

    def write_config(self, config: dict[str, Any]) -> None:
        try:
            write_json_atomic(self.path / CONFIG_FILE, config)
        except OSError as e:
            raise TrainingError(f"could not write {self.path / CONFIG_FILE}: {_reason(e)}") from e

    def lock(self):
        """Hold the run directory (which must exist) for this process: a second run there refuses,
        naming this one's PID. Nests within one process; released when the process dies."""
        return directory_lock(self.path, TrainingError, "training run")

    # ---- metrics -----------------------------------------------------------------------------

    def log(self, row: dict[str, Any]) -> None:
        try:
            with open(self.metrics_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            raise TrainingError(f"could not append to {self.metrics_file}: {_reason(e)}; the last checkpoint is "
                                f"intact (free disk space, then resume with --resume)") from e

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_file.is_file():
            return []
        rows = []
        for line in self.metrics_file.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
        return rows

    def truncate_metrics(self, step: int) -> None:
        """Drop rows logged after `step` (a resumed run logs those steps again)."""
        rows = [r for r in self.read_metrics() if r.get("step", 0) <= step]
        try:
            write_text_atomic(self.metrics_file, "".join(json.dumps(r) + "\n" for r in rows))
        except OSError as e:
            raise TrainingError(f"could not rewrite {self.metrics_file}: {_reason(e)}") from e

    # ---- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self, step: int, save_model: Callable[[Path], None], state: dict[str, Any], keep_last: int) -> Path:
        """Write checkpoints/step_N (model/ + trainer.pt) atomically, point latest.json at it, prune."""
        target = self.checkpoints / checkpoint_name(step)

        def fill(tmp: Path) -> None:
            save_model(tmp / MODEL_DIR)
            torch.save(state, tmp / STATE_FILE)

        write_dir_atomic(target, fill)
        try:
            write_json_atomic(self.path / LATEST_FILE, {"step": step, "checkpoint": f"{CHECKPOINTS}/{target.name}"})
        except OSError as e:
            raise TrainingError(f"could not write {self.path / LATEST_FILE}: {e}; free disk space, then resume") from e
        self._prune(keep_last, keep=target)
        return target

    def _prune(self, keep_last: int, keep: Path) -> None:
        done = self.complete_checkpoints()
        for old in done[:-keep_last]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    def complete_checkpoints(self) -> list[Path]:
        """Finished checkpoints, oldest first (unfinished ones are hidden temporary folders)."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.iterdir()
                 if p.is_dir() and p.name.startswith("step_") and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest_checkpoint(self) -> Path | None:
        pointer = self.path / LATEST_FILE
        if pointer.is_file():
            try:
                path = self.path / json.loads(pointer.read_text(encoding="utf-8"))["checkpoint"]
                if (path / STATE_FILE).is_file():
                    return path
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                pass  # fall back to the newest complete checkpoint on disk
        done = self.complete_checkpoints()
        return done[-1] if done else None

    def remove_partial_writes(self) -> None:
        """Delete temporary folders and files a killed run left behind (call it holding the lock)."""
        for parent in (self.checkpoints, self.path):
            if parent.is_dir():
                for p in parent.iterdir():
                    if p.name.startswith(_TMP_PREFIX):
                        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        if self.path.is_dir():
            remove_stale_temps(self.path, [CONFIG_FILE, METRICS_FILE, LATEST_FILE])

    @staticmethod
    def load_state(checkpoint: Path) -> dict[str, Any]:
        try:
            return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a corrupt file
            raise TrainingError(f"{checkpoint / STATE_FILE} cannot be read ({type(e).__name__}: {e}); "
                                f"delete {checkpoint} to resume from the one before") from None
