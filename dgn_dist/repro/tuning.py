"""Learning-rate tuning on the validation split, and the learning-rate TOML it writes.

The search is a log-spaced grid inside each optimizer's range (:data:`LR_RANGES`): the
paper's Table 8 for SGD, RMSprop, Adam and EKFAC, our own documented choice for EMSA and
DGNOpt (the paper gives none). Every grid point is trained on a few seeds and scored by the
VALIDATION accuracy only (``summary["val_acc"]`` and the per-epoch ``history[i]["val_acc"]``);
the selection code never reads a test accuracy (``tests/test_repro.py`` checks this with a
trainer whose test fields raise when read).

Score of a grid point, compared lexicographically (higher wins; ties go to the smaller lr):

1. mean over the tuning seeds of the final-epoch validation accuracy;
2. mean over seeds of the validation accuracy averaged over the last :data:`TAIL_EPOCHS`
   evaluated epochs (a smoother tie-breaker: the DIGITS validation split has ~144 images,
   so one image is 0.7 points).

A failed run (exception) or a non-finite validation accuracy scores ``-inf``.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

#: Learning-rate search ranges ``(low, high)``, both ends included in the grid.
#: sgd, rmsprop, adam, ekfac: the paper's Table 8. emsa: the lr is the step length of the
#: per-layer L-BFGS solve, whose first step is a plain gradient step, so we give it SGD's
#: range. dgnopt-*: DGNOpt's step ``lr·(k + K δx)`` is a damped Gauss-Newton step like EKFAC's,
#: so we give it EKFAC's range.
LR_RANGES: dict[str, tuple[float, float]] = {
    "sgd": (7e-2, 5e-1),
    "rmsprop": (7e-4, 1e-2),
    "adam": (7e-4, 1e-2),
    "ekfac": (1e-2, 3e-1),
    "emsa": (7e-2, 5e-1),
    "dgnopt-fne": (1e-2, 3e-1),
    "dgnopt-gr": (1e-2, 3e-1),
}
#: Where each range comes from (written into the lr TOML next to the grid).
RANGE_SOURCES: dict[str, str] = {
    "sgd": "paper Table 8", "rmsprop": "paper Table 8", "adam": "paper Table 8",
    "ekfac": "paper Table 8", "emsa": "ours: SGD's Table-8 range (L-BFGS step length)",
    "dgnopt-fne": "ours: EKFAC's Table-8 range", "dgnopt-gr": "ours: EKFAC's Table-8 range",
}
#: Epochs averaged by the tie-breaking score.
TAIL_EPOCHS = 3

#: ``train(cfg) -> summary`` (``dgn_dist.trainer.train``, or a fake in tests).
TrainFn = Callable[[Any], Mapping[str, Any]]
#: ``(lr, seed) -> summary``: one training run of the optimizer being tuned.
RunFn = Callable[[float, int], Mapping[str, Any]]


def log_grid(low: float, high: float, points: int) -> list[float]:
    """``points`` log-spaced values from ``low`` to ``high`` (both included), 3 significant
    digits.

    Raises:
        ValueError: ``points < 1``, or not ``0 < low <= high``.
    """
    if points < 1:
        raise ValueError(f"points must be >= 1, got {points}")
    if not 0 < low <= high:
        raise ValueError(f"need 0 < low <= high, got low={low}, high={high}")
    if points == 1 or low == high:
        return [float(f"{math.sqrt(low * high):.3g}")]
    ratio = math.log(high / low) / (points - 1)
    return [float(f"{low * math.exp(i * ratio):.3g}") for i in range(points)]


@dataclass
class GridPoint:
    """One learning rate of the grid and its validation scores (one entry per seed)."""

    lr: float
    final_val: list[float] = field(default_factory=list)
    tail_val: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def score(self) -> tuple[float, float]:
        """(mean final val acc, mean tail val acc); ``-inf`` when any seed failed."""
        if self.errors or not self.final_val:
            return (-math.inf, -math.inf)
        return (statistics.fmean(self.final_val), statistics.fmean(self.tail_val))


@dataclass
class TuneResult:
    """The outcome of :func:`tune_lr` for one optimizer."""

    label: str
    best_lr: float
    points: list[GridPoint]
    seeds: list[int]
    epochs: int
    max_steps: int = 0


def validation_scores(summary: Mapping[str, Any]) -> tuple[float, float]:
    """(final val acc, val acc averaged over the last :data:`TAIL_EPOCHS` evaluations).

    Reads ``summary["val_acc"]`` and ``summary["history"][i]["val_acc"]`` only.

    Raises:
        ValueError: the run has no validation accuracy (``data.val_fraction = 0``).
    """
    final = summary["val_acc"]
    if final is None:
        raise ValueError("the run reports no validation accuracy; tuning needs "
                         "data.val_fraction > 0")
    evaluated = [rec["val_acc"] for rec in summary.get("history", [])
                 if rec.get("val_acc") is not None]
    tail = evaluated[-TAIL_EPOCHS:] or [final]
    return float(final), statistics.fmean(float(v) for v in tail)


def tune_lr(label: str, grid: Sequence[float], seeds: Sequence[int], run_fn: RunFn,
            epochs: int, log: Callable[[str], None] = print, max_steps: int = 0) -> TuneResult:
    """Train every ``lr`` of ``grid`` on every seed and pick the best by validation score.

    Args:
        label: optimizer label (for messages).
        grid: learning rates to try.
        seeds: seeds of the tuning runs (the data split, and so the validation set, follows
            the seed).
        run_fn: ``run_fn(lr, seed) -> summary`` trains once.
        epochs: epochs per run (recorded only).
        max_steps: step limit per run, 0 = none (recorded only).
        log: progress sink.

    Raises:
        RuntimeError: every run of every grid point failed.
    """
    if not grid or not seeds:
        raise ValueError(f"tuning {label}: grid and seeds must be non-empty")
    points = [GridPoint(lr) for lr in grid]
    for point in points:
        for seed in seeds:
            try:
                final, tail = validation_scores(run_fn(point.lr, seed))
            except Exception as err:  # noqa: BLE001 - a failed run scores -inf, reported
                point.errors.append(f"seed {seed}: {type(err).__name__}: {err}")
                log(f"[tune] {label} lr={point.lr:g} seed {seed}: FAILED ({err})")
                continue
            if not (math.isfinite(final) and math.isfinite(tail)):
                point.errors.append(f"seed {seed}: non-finite validation accuracy")
            point.final_val.append(final)
            point.tail_val.append(tail)
            log(f"[tune] {label} lr={point.lr:g} seed {seed}: val {final:.2f} "
                f"(last-{TAIL_EPOCHS} mean {tail:.2f})")
    # max() keeps the first of equal scores; points are in increasing lr order.
    best = max(sorted(points, key=lambda p: p.lr), key=GridPoint.score)
    if best.score()[0] == -math.inf:
        raise RuntimeError(f"tuning {label}: every run failed: "
                           + "; ".join(e for p in points for e in p.errors))
    return TuneResult(label, best.lr, points, list(seeds), epochs, max_steps)


# --- the learning-rate TOML ----------------------------------------------------------------

def read_lr_file(path: Path) -> dict[str, float]:
    """The ``[lr]`` table of ``path``: ``{optimizer label: learning rate}``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: no ``[lr]`` table, or a value that is not a positive number.
    """
    data = _read_toml(path)
    table = data.get("lr")
    if not isinstance(table, dict):
        raise ValueError(f"{path}: no [lr] table (label = learning rate)")
    lrs: dict[str, float] = {}
    for label, value in table.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{path}: lr.{label} must be a positive number, got {value!r}")
        lrs[label] = float(value)
    return lrs


def _read_toml(path: Path) -> dict[str, Any]:
    with open(path, "rb") as handle:
        return tomllib.load(handle)


def write_lr_file(path: Path, results: Sequence[TuneResult], header: Sequence[str]) -> None:
    """Merge ``results`` into the lr TOML at ``path`` (created when missing).

    Entries of optimizers not in ``results`` are kept as they were, together with their
    ``[tuning.<label>]`` records; ``header`` comment lines (without ``#``) replace the old
    header and should say how the values were obtained.
    """
    date = time.strftime("%Y-%m-%d")
    old: dict[str, Any] = _read_toml(path) if path.is_file() else {}
    lrs: dict[str, float] = dict(old.get("lr", {}))
    records: dict[str, dict[str, Any]] = dict(old.get("tuning", {}))
    for res in results:
        lrs[res.label] = res.best_lr
        low, high = LR_RANGES.get(res.label, (min(p.lr for p in res.points),
                                                max(p.lr for p in res.points)))
        records[res.label] = {
            "range": [low, high],
            "range_source": RANGE_SOURCES.get(res.label, "grid given by the caller"),
            "grid": [p.lr for p in res.points],
            "mean_final_val_acc": [_finite(p.score()[0]) for p in res.points],
            "mean_tail_val_acc": [_finite(p.score()[1]) for p in res.points],
            "seeds": list(res.seeds),
            "epochs": res.epochs,
            "max_steps": res.max_steps,
            "date": date,
        }
    lines = [f"# {line}".rstrip() for line in header]
    lines += ["", "[lr]"] + [f"{_key(k)} = {_value(v)}" for k, v in lrs.items()]
    for label, record in records.items():
        lines += ["", f"[tuning.{_key(label)}]"]
        lines += [f"{_key(k)} = {_value(v)}" for k, v in record.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def _finite(value: float) -> float:
    """An accuracy rounded for the record; a failed grid point (``-inf``) is written -1."""
    return round(value, 3) if math.isfinite(value) else -1.0


def _key(key: str) -> str:
    bare = key.replace("-", "").replace("_", "").isalnum()
    return key if bare else '"' + key.replace('"', '\\"') + '"'


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")
