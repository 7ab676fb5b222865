"""Pieces shared by the reproduction commands: run one config, format result tables."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dgn_dist.config import Config, load_config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def config_path(name: str) -> Path:
    """A config shipped in the repository's ``configs/`` folder."""
    path = CONFIG_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"config {path} not found (run from a checkout of dgn_dist)")
    return path


def run_config(path: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """Train once with ``dgn-train`` semantics and return its summary."""
    from dgn_dist.trainer import train

    cfg: Config = load_config(path, list(overrides))
    return train(cfg)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    if len(values) == 1:
        return values[0], 0.0
    return statistics.fmean(values), statistics.stdev(values)


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width table (also valid Markdown)."""
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
             for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)
