"""Helpers of the §5.2 reproduction commands (table3-fictitious, table4-alignment,
fig6-ablation): one training run, TensorBoard curves, output files and figures."""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dgn_dist.repro.common import run_config


def set_threads(threads: int) -> None:
    """Intra-op threads for the runs (1 is fastest for these small nets on a shared CPU)."""
    if threads < 1:
        raise ValueError(f"--threads must be >= 1; got {threads}")
    torch.set_num_threads(threads)


def train_once(config: Path, overrides: Sequence[str], run_dir: Path) -> dict[str, Any]:
    """Train ``config`` with ``overrides`` into ``run_dir``; the summary, or ``{"error": ...}``
    (with the traceback printed) when the run raises, so one failure does not end a table."""
    start = time.perf_counter()
    try:
        summary = run_config(config, [*overrides, f"run.dir=\"{run_dir}\"", "run.quiet=true",
                                      "run.resume=\"\""])
    except Exception as err:  # reported in the table; the command exits 1
        traceback.print_exc()
        return {"error": f"{type(err).__name__}: {err}", "wall_s": time.perf_counter() - start}
    summary["wall_s"] = time.perf_counter() - start
    return summary


def tb_curve(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """``(step, value)`` of one TensorBoard scalar of a run (empty when absent)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return []
    return [(int(e.step), float(e.value)) for e in acc.Scalars(tag)]


def first_step_at(curve: Sequence[tuple[int, float]], target: float) -> int | None:
    """The first step whose value reaches ``target`` (``None``: never)."""
    return next((step for step, value in curve if value >= target), None)


def fmt_mean_std(values: Sequence[float], digits: int = 2) -> str:
    """``mean ± std`` (sample std; a single value alone), or ``-`` for none."""
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_outputs(out: Path, title: str, table: str, notes: Sequence[str],
                  results: Mapping[str, Any]) -> None:
    """``table.md`` (title, table, notes) and ``results.json`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    text = f"# {title}\n\n{table}\n\n" + "\n".join(notes) + "\n"
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
