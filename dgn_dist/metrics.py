"""What a run reports: TensorBoard scalars, one console line per epoch, a progress bar.

Only the main process (rank 0) writes; on other ranks every helper here is a no-op.
TensorBoard tags (namespaced like torchtitan's): ``loss/train``, ``acc/train``, ``acc/test``,
``acc/val``, ``loss/test``, ``lr``, ``time/step`` and whatever ``curvature_stats()`` of the
optimizer returns (``curvature/<layer>/A_eig_max``, ``.../damping``, ...).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dgn_dist.device import is_main_process


def wait_for_later_event_file(log_dir: Path) -> float:
    """Sleep until a new event file in ``log_dir`` sorts after every existing one.

    TensorBoard reads a folder's event files in file-name order,
    ``events.out.tfevents.<unix seconds>.<host>.<pid>.<counter>``. A resumed session's
    ``purge_step`` only hides the abandoned steps of files read BEFORE its own, but two files
    written by one process within the same second are ordered by the counter as text
    (``...10`` sorts before ``...9``). Waiting until the clock is past the newest file's
    second makes the order follow time (at most about one second, on resume only).

    Returns:
        The seconds slept.
    """
    stamps = []
    for path in log_dir.glob("events.out.tfevents.*"):
        field = path.name.split(".")[3] if path.name.count(".") >= 3 else ""
        if field.isdigit():
            stamps.append(int(field))
    if not stamps:
        return 0.0
    wait = max(stamps) + 1 - time.time()
    if wait > 0:
        time.sleep(wait)
    return max(wait, 0.0)


class MetricsWriter:
    """Scalars to TensorBoard event files in ``log_dir``; disabled -> writes nothing.

    Args:
        log_dir: folder for the event files (``<run dir>/tb``).
        enabled: ``logging.tensorboard``; also off on ranks other than 0.
        purge_step: on resume, the first step not yet covered by the checkpoint; events of
            an abandoned continuation at or after it are hidden by TensorBoard.
    """

    def __init__(self, log_dir: Path, enabled: bool, purge_step: int | None = None) -> None:
        self.enabled = enabled and is_main_process()
        self._writer: Any = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            if purge_step is not None:
                wait_for_later_event_file(log_dir)
            self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def scalars(self, values: Mapping[str, float | None], step: int) -> None:
        """Write every finite value under its tag (``None`` entries are skipped)."""
        if self._writer is None:
            return
        for tag, value in values.items():
            if value is not None and math.isfinite(float(value)):
                self._writer.add_scalar(tag, float(value), global_step=step)

    def histograms(self, values: Mapping[str, Tensor], step: int) -> None:
        """Write one histogram per tag (finite entries only; empty tensors are skipped)."""
        if self._writer is None:
            return
        for tag, value in values.items():
            data = value.detach().reshape(-1).double().cpu()
            data = data[torch.isfinite(data)]
            if data.numel():
                self._writer.add_histogram(tag, data, global_step=step)

    def custom_scalars(self, layout: Mapping[str, Any]) -> None:
        """Write a custom-scalars layout (:mod:`dgn_dist.dashboard`) into the event file."""
        if self._writer is not None:
            self._writer.add_custom_scalars(dict(layout))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class RunningStats:
    """Loss and accuracy sums kept on the device (no host sync per step)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.correct = torch.zeros((), dtype=torch.int64, device=self.device)
        self.seen = 0
        self.steps = 0
        self.time_s = 0.0

    def add(self, loss: Tensor, logits: Tensor, y: Tensor) -> None:
        self.loss_sum += loss.detach().double() * len(y)
        self.correct += (logits.detach().argmax(dim=1) == y).sum()
        self.seen += len(y)
        self.steps += 1

    def add_counts(self, loss: Tensor, correct: Tensor, count: int) -> None:
        """Like :meth:`add` from a batch's mean ``loss`` and its ``correct`` count."""
        self.loss_sum += loss.detach().double().to(self.device) * count
        self.correct += correct.to(self.device)
        self.seen += count
        self.steps += 1

    def loss(self) -> float:
        return self.loss_sum.item() / max(self.seen, 1)

    def acc(self) -> float:
        return 100.0 * self.correct.item() / max(self.seen, 1)

    def state(self) -> dict[str, float]:
        return {"loss_sum": self.loss_sum.item(), "correct": int(self.correct.item()),
                "seen": self.seen, "steps": self.steps}

    def load(self, state: dict[str, float]) -> None:
        self.reset()
        if state:
            self.loss_sum.fill_(state["loss_sum"])
            self.correct.fill_(int(state["correct"]))
            self.seen, self.steps = int(state["seen"]), int(state["steps"])


def curvature_scalars(optimizer: object) -> dict[str, float]:
    """``optimizer.curvature_stats()`` when the optimizer reports curvature, else ``{}``."""
    stats = getattr(optimizer, "curvature_stats", None)
    return {k: float(v) for k, v in stats().items()} if callable(stats) else {}


def curvature_histograms(optimizer: object) -> dict[str, Tensor]:
    """``optimizer.curvature_eigenvalues()`` (``curvature/<player>/{A,G}_eig``) when the
    optimizer has Kronecker factors, else ``{}``. Called only on ``logging.hist_every`` steps:
    nothing is computed otherwise (the eigenvalues are those of the last refresh)."""
    eigs = getattr(optimizer, "curvature_eigenvalues", None)
    return dict(eigs()) if callable(eigs) else {}


def log(message: str) -> None:
    """Print one line on the main process (progress bars are on stderr, lines on stdout)."""
    if is_main_process():
        print(message, flush=True)


def _pct(value: float | None) -> str:
    return "   -  " if value is None else f"{value:6.2f}%"


def epoch_line(epoch: int, epochs: int, step: int, train_loss: float, train_acc: float,
               test_acc: float | None, val_acc: float | None, lr: float, seconds: float) -> str:
    """The one console line of an epoch, e.g.
    ``epoch   1/10  step    162  loss 0.4123  train  88.12%  test  93.33%  val  92.10%  ...``.
    """
    line = (f"epoch {epoch:3d}/{epochs:<3d} step {step:7d}  loss {train_loss:.4f}  "
            f"train {_pct(train_acc)}  test {_pct(test_acc)}")
    if val_acc is not None:
        line += f"  val {_pct(val_acc)}"
    return line + f"  lr {lr:.3g}  time {seconds:.1f}s"


def progress_enabled(quiet: bool) -> bool:
    """A bar only for an interactive terminal, without ``run.quiet``, on the main process."""
    return not quiet and sys.stderr.isatty() and is_main_process()


class _NoBar:
    """Stand-in for a tqdm bar when the bar is off: iterates, ignores updates."""

    def __init__(self, iterable: Iterable[Any]) -> None:
        self._iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        return iter(self._iterable)

    def set_postfix_str(self, text: str) -> None:
        del text

    def close(self) -> None:
        return None


def progress(iterable: Iterable[Any], total: int, initial: int, desc: str,
             enabled: bool) -> Any:
    """A tqdm bar over one epoch (``initial`` batches already done on resume).

    Returns an iterable with ``set_postfix_str(text)`` and ``close()``; a silent stand-in
    when ``enabled`` is false.
    """
    if not enabled:
        return _NoBar(iterable)
    from tqdm import tqdm

    return tqdm(iterable, total=total, initial=initial, desc=desc, leave=False,
                dynamic_ncols=True, file=sys.stderr)
