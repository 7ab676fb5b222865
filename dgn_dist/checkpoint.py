"""Atomic checkpoints that load with ``torch.load(..., weights_only=True)``.

A run directory holds ``checkpoints/step-<N>.pt`` files and a ``checkpoints/latest`` text
file naming the newest one. Every file is written to a temporary name in the same folder and
moved into place with :func:`os.replace`, so a crash or Ctrl-C during a write never damages
the last good checkpoint. Checkpoints hold only tensors and plain Python values (RNG states
are converted to tensors and lists), never pickled objects.
"""

from __future__ import annotations

import collections
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest"
_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unreadable; the message says which file and what to do."""


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Call ``write(file_object)`` on a temporary file next to ``path``, then rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors and plain values only) to ``path`` atomically."""
    atomic_write_bytes(Path(path), lambda handle: torch.save(state, handle))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU with ``weights_only=True`` (no arbitrary pickles)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file or a non-weights-only pickle
        raise CheckpointError(f"cannot read checkpoint '{path}': {err}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint '{path}' does not hold a dict")
    return state


# --- RNG states as tensors / lists -------------------------------------------------------

def capture_rng_state() -> dict[str, Any]:
    """The states of torch (CPU and every CUDA device), numpy and python ``random``."""
    np_state: Any = np.random.get_state(legacy=True)
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np_state
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                  "cached_gaussian": float(np_gauss)},
        "python": {"version": int(py_version), "state": list(py_state), "gauss": py_gauss},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))


def scheduler_state(scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    """``scheduler.state_dict()`` with ``collections.Counter`` made a plain dict."""
    state = dict(scheduler.state_dict())
    for key, value in state.items():
        if isinstance(value, collections.Counter):
            state[key] = dict(value)
    return state


def load_scheduler_state(scheduler: torch.optim.lr_scheduler.LRScheduler,
                         state: dict[str, Any]) -> None:
    """Inverse of :func:`scheduler_state` (MultiStepLR keeps its milestones in a Counter)."""
    state = dict(state)
    if isinstance(getattr(scheduler, "milestones", None), collections.Counter):
        state["milestones"] = collections.Counter(state["milestones"])
    scheduler.load_state_dict(state)


# --- the checkpoint folder of a run ------------------------------------------------------

def step_of(path: Path) -> int:
    match = _STEP_FILE.match(path.name)
    if match is None:
        raise CheckpointError(f"'{path.name}' is not named step-<N>.pt")
    return int(match.group(1))


class CheckpointManager:
    """``step-<N>.pt`` files, a ``latest`` pointer and pruning to the last ``keep_last``.

    Args:
        folder: the run's ``checkpoints`` folder (created on the first save).
        keep_last: number of step checkpoints kept; the newest is never removed.
    """

    def __init__(self, folder: Path, keep_last: int) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.folder = Path(folder)
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.folder / f"step-{step}.pt"

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write ``step-<step>.pt``, point ``latest`` at it, then prune older files."""
        path = self.path_for(step)
        save_checkpoint(path, state)
        atomic_write_bytes(self.folder / LATEST, lambda h: h.write(path.name.encode() + b"\n"))
        self._prune(keep=path)
        return path

    def _prune(self, keep: Path) -> None:
        # Oldest first by write time, then step: a run resumed from an early checkpoint
        # writes lower step numbers than files of the abandoned continuation.
        files = [p for p in self.folder.glob("step-*.pt") if _STEP_FILE.match(p.name)]
        files.sort(key=lambda p: (p.stat().st_mtime_ns, step_of(p)))
        excess = [p for p in files if p != keep][: max(0, len(files) - self.keep_last)]
        for stale in excess:
            stale.unlink(missing_ok=True)

    def latest(self) -> Path | None:
        """The checkpoint named by ``latest`` (or the highest step when the pointer is gone)."""
        pointer = self.folder / LATEST
        if pointer.is_file():
            candidate = self.folder / pointer.read_text().strip()
            if candidate.is_file():
                return candidate
        files = [p for p in self.folder.glob("step-*.pt") if _STEP_FILE.match(p.name)]
        return max(files, key=step_of) if files else None

    def resolve(self, resume: str) -> Path:
        """``run.resume`` -> a checkpoint file: ``latest``, a run directory or a file path."""
        if resume == "latest":
            found = self.latest()
            if found is None:
                raise CheckpointError(
                    f"run.resume=latest but '{self.folder}' holds no checkpoint; start a fresh "
                    "run (run.resume='') or point run.dir at the run to continue")
            return found
        target = Path(resume)
        if target.is_dir():
            found = CheckpointManager(target / "checkpoints", self.keep_last).latest()
            if found is None:
                raise CheckpointError(f"run directory '{target}' holds no checkpoint")
            return found
        if not target.is_file():
            raise CheckpointError(f"run.resume='{resume}': no such checkpoint file")
        return target
