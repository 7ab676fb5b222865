"""``dgn-repro quickstart``: the README's main job.

A short DGNOpt run on DIGITS (the 8x8 digits that ship with scikit-learn) with baselines
beside it, same network, batch and seed; prints a result table and leaves each run's
TensorBoard logs under ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dgn_dist.repro.common import config_path, format_table, run_config

RUNS = (
    ("SGD", "digits_sgd.toml"),
    ("EKFAC", "digits_ekfac.toml"),
    ("DGNOpt-FNE", "digits_dgnopt.toml"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/quickstart", help="parent of the run directories")


def run(args: argparse.Namespace) -> int:
    rows = []
    for label, config in RUNS:
        run_dir = Path(args.out) / Path(config).stem
        print(f"[quickstart] {label}: {config} for {args.epochs} epochs -> {run_dir}", flush=True)
        summary = run_config(config_path(config), [
            f"run.epochs={args.epochs}", f"run.seed={args.seed}", f"run.dir=\"{run_dir}\"",
            "run.quiet=true", "run.resume=\"\""])
        rows.append((label, summary["test_acc"], summary["best_test_acc"],
                     summary["train_loss"], summary["steps"], summary["wall_time_s"]))
    print()
    print(format_table(
        ("optimizer", "test acc %", "best test acc %", "train loss", "steps", "time s"), rows))
    print(f"\nTensorBoard: .venv/bin/tensorboard --logdir {args.out}")
    return 0
