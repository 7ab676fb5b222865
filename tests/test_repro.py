"""``dgn-repro table2-digits``: end to end on a tiny budget, lr tuning by validation accuracy
only, the lr TOML, failure reporting, argument errors, and the accuracy-curve helpers."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pytest

from dgn_dist.config import load_config
from dgn_dist.repro import main
from dgn_dist.repro import table2 as t2
from dgn_dist.repro.plots import accuracy_curve, mean_std_curve
from dgn_dist.repro.tuning import (
    LR_RANGES,
    GridPoint,
    TuneResult,
    log_grid,
    read_lr_file,
    tune_lr,
    write_lr_file,
)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    t2.add_arguments(parser)
    return parser.parse_args(list(argv))


class NoTestDict(dict):
    """A summary whose test fields raise when read: tuning must never look at them."""

    def _check(self, key: object) -> None:
        if isinstance(key, str) and "test" in key:
            raise AssertionError(f"tuning read the test-set field {key!r}")

    def __getitem__(self, key: object) -> Any:
        self._check(key)
        return super().__getitem__(key)

    def get(self, key: object, default: Any = None) -> Any:
        self._check(key)
        return super().get(key, default)


def _fake_summary(val_final: float, val_hist: list[float], test: float) -> NoTestDict:
    history = [NoTestDict(epoch=i + 1, val_acc=v, test_acc=test) for i, v in enumerate(val_hist)]
    return NoTestDict(val_acc=val_final, test_acc=test, best_test_acc=test, history=history)


def _write_lrs(path: Path, lrs: dict[str, float]) -> None:
    results = [TuneResult(k, v, [GridPoint(v, [90.0], [90.0])], [0], 1) for k, v in lrs.items()]
    write_lr_file(path, results, ["test learning rates"])


# --- end to end -----------------------------------------------------------------------------

def test_table2_end_to_end_tiny_budget(tmp_path: Path) -> None:
    lr_file = tmp_path / "lr.toml"
    _write_lrs(lr_file, {"sgd": 0.1, "adam": 0.003})
    out = tmp_path / "out"
    rc = main(["table2-digits", "--optimizers", "sgd,adam", "--seeds", "1", "--epochs", "1",
               "--max-steps", "4", "--lr-file", str(lr_file), "--out", str(out)])
    assert rc == 0
    table = (out / "table.md").read_text()
    assert "| SGD " in table and "| Adam " in table and "96.05" in table and "95.71" in table
    results = json.loads((out / "results.json").read_text())
    assert list(results["optimizers"]) == ["sgd", "adam"]
    for label, lr in (("sgd", 0.1), ("adam", 0.003)):
        entry = results["optimizers"][label]
        assert entry["lr"] == lr
        (run,) = entry["runs"]
        assert run["ok"] and run["steps"] == 4 and 0.0 <= run["test_acc"] <= 100.0
        summary = json.loads((out / "runs" / label / "seed0" / "summary.json").read_text())
        assert summary["optimizer"] == label and summary["model"] == "digits_resnet"
    assert (out / "test_acc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failed_run_is_reported_not_skipped(tmp_path: Path) -> None:
    lr_file = tmp_path / "lr.toml"
    _write_lrs(lr_file, {"sgd": 0.1, "emsa": 0.2})

    def fake_train(cfg: Any) -> dict[str, Any]:
        if cfg.optim.name == "emsa" and cfg.run.seed == 1:
            raise FloatingPointError("loss is NaN")
        hist = [{"epoch": 1, "test_acc": 90.0 + cfg.run.seed, "val_acc": 80.0}]
        return {"test_acc": 90.0 + cfg.run.seed, "best_test_acc": 91.0, "val_acc": 80.0,
                "wall_time_s": 1.0, "steps": 10, "epochs": 1.0, "history": hist}

    out = tmp_path / "out"
    args = _args("--optimizers", "sgd,emsa", "--seeds", "2", "--epochs", "1",
                 "--lr-file", str(lr_file), "--out", str(out))
    assert t2.reproduce(args, train_fn=fake_train, log=lambda _: None) == 1
    table = (out / "table.md").read_text()
    assert "1/2 FAILED" in table and "EMSA seed 1: FloatingPointError: loss is NaN" in table
    assert "90.50 ± 0.71" in table  # SGD: seeds 0 and 1 give 90 and 91
    assert "90.00 ± 0.00" in table  # EMSA: the one finished seed
    runs = json.loads((out / "results.json").read_text())["optimizers"]["emsa"]["runs"]
    assert [r["ok"] for r in runs] == [True, False] and "NaN" in runs[1]["error"]


def test_unknown_optimizer_exits_2_with_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["table2-digits", "--optimizers", "sgd,lbfgs"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "lbfgs" in err and "valid choices" in err
    for label in t2.SPECS:
        assert label in err


def test_missing_learning_rate_exits_2(tmp_path: Path) -> None:
    lr_file = tmp_path / "lr.toml"
    _write_lrs(lr_file, {"sgd": 0.1})
    messages: list[str] = []
    args = _args("--optimizers", "sgd,adam", "--lr-file", str(lr_file), "--out",
                 str(tmp_path / "out"), "--epochs", "1")
    assert t2.reproduce(args, train_fn=lambda cfg: {}, log=messages.append) == 2
    assert "no lr for adam" in messages[-1] and "--tune" in messages[-1]


# --- tuning ---------------------------------------------------------------------------------

def test_tuning_selects_by_validation_never_test(tmp_path: Path) -> None:
    """Validation peaks at the 3rd grid point, test accuracy at the 1st: the 3rd must win,
    and reading any test field fails the test."""
    grid = log_grid(*LR_RANGES["sgd"], 5)
    seen: list[tuple[float, int]] = []

    def fake_train(cfg: Any) -> NoTestDict:
        lr, seed = cfg.optim.lr, cfg.run.seed
        seen.append((lr, seed))
        rank = grid.index(lr)
        val = 90.0 - 2.0 * abs(rank - 2) + 0.1 * seed
        return _fake_summary(val, [val - 1.0, val], test=99.0 - rank)

    args = _args("--optimizers", "sgd", "--tune", "--tune-only", "--tune-seeds", "2",
                 "--epochs", "1", "--lr-file", str(tmp_path / "lr.toml"),
                 "--out", str(tmp_path / "out"))
    assert t2.reproduce(args, train_fn=fake_train, log=lambda _: None) == 0
    assert sorted(seen) == sorted((lr, s) for lr in grid for s in (0, 1))
    assert read_lr_file(tmp_path / "lr.toml") == {"sgd": grid[2]}


def test_tuning_tie_breaks_and_failures() -> None:
    scores = {0.1: (90.0, [80.0, 90.0]), 0.2: (90.0, [89.0, 90.0]), 0.3: (95.0, None)}

    def run_fn(lr: float, seed: int) -> NoTestDict:
        final, hist = scores[lr]
        if hist is None:
            raise RuntimeError("diverged")
        return _fake_summary(final, hist, test=0.0)

    res = tune_lr("sgd", [0.1, 0.2, 0.3], [0], run_fn, epochs=2, log=lambda _: None)
    assert res.best_lr == 0.2  # same final val, better last-epochs mean; 0.3 failed
    assert res.points[2].errors and res.points[2].score() == (-math.inf, -math.inf)
    equal = tune_lr("sgd", [0.2, 0.1], [0], lambda lr, s: _fake_summary(90.0, [90.0], 0.0),
                    epochs=1, log=lambda _: None)
    assert equal.best_lr == 0.1  # full tie: the smaller lr
    with pytest.raises(RuntimeError, match="every run failed"):
        tune_lr("sgd", [0.3], [0], run_fn, epochs=1, log=lambda _: None)


def test_log_grid_stays_inside_the_range() -> None:
    grid = log_grid(7e-4, 1e-2, 5)
    assert grid[0] == 7e-4 and grid[-1] == 1e-2 and grid == sorted(grid) and len(set(grid)) == 5
    ratios = [b / a for a, b in zip(grid, grid[1:], strict=False)]
    assert max(ratios) / min(ratios) < 1.01
    with pytest.raises(ValueError, match="low <= high"):
        log_grid(1.0, 0.1, 3)


def test_lr_file_round_trip_and_merge(tmp_path: Path) -> None:
    path = tmp_path / "lr.toml"
    points = [GridPoint(0.07, [91.0], [90.5]), GridPoint(0.123, [93.0], [92.0])]
    first = TuneResult("sgd", 0.123, points, [0, 1], 10)
    write_lr_file(path, [first], ["how these were obtained"])
    assert read_lr_file(path) == {"sgd": 0.123}
    text = path.read_text()
    assert text.startswith("# how these were obtained") and "[tuning.sgd]" in text
    second = TuneResult("dgnopt-fne", 0.0314, [GridPoint(0.0314, [95.0], [94.0])], [0], 10)
    write_lr_file(path, [second], ["second header"])
    assert read_lr_file(path) == {"sgd": 0.123, "dgnopt-fne": 0.0314}
    assert "[tuning.sgd]" in path.read_text() and "[tuning.dgnopt-fne]" in path.read_text()
    path.write_text("[lr]\nsgd = -1.0\n")
    with pytest.raises(ValueError, match="positive"):
        read_lr_file(path)


def test_committed_configs_match_the_paper_setup() -> None:
    cfg = load_config(t2.BASE_CONFIG)
    assert (cfg.data.dataset, cfg.data.batch_size, cfg.model.name, cfg.model.activation,
            cfg.model.width, cfg.run.eval_every) == ("digits", 8, "digits_resnet", "tanh", 5, 1)
    lrs = read_lr_file(t2.LR_FILE)
    assert set(lrs) == set(t2.SPECS)
    for label, lr in lrs.items():
        low, high = LR_RANGES[label]
        assert low <= lr <= high, label
    # The quickstart's DGNOpt config uses the tuned DGNOpt-FNE setting.
    quick = load_config(t2.CONFIG_DIR / "digits_dgnopt.toml")
    assert (quick.optim.name, quick.game.info, quick.optim.lr) == ("dgnopt", "fne",
                                                                   lrs["dgnopt-fne"])
    # ... with the Table-2 recipe already in it, and the shared setup's (EKFAC's) damping
    assert load_config(t2.CONFIG_DIR / "digits_dgnopt.toml", list(t2.DGNOPT_RECIPE)) == quick
    assert quick.curvature.damping == cfg.curvature.damping
    # Table 4's DGNOpt-GR runs at the Table-2 DGNOpt-GR setting too
    t4 = load_config(t2.CONFIG_DIR / "table4_digits.toml")
    assert load_config(t2.CONFIG_DIR / "table4_digits.toml", list(t2.DGNOPT_RECIPE)) == t4
    assert (t4.game.info, t4.optim.lr, t4.curvature.damping) == (
        "gr", lrs["dgnopt-gr"], cfg.curvature.damping)
    assert (quick.data.batch_size, quick.model.name) == (8, "digits_resnet")


# --- curves ---------------------------------------------------------------------------------

def test_accuracy_curves_mean_and_std() -> None:
    a = accuracy_curve({"history": [{"epoch": 1, "test_acc": 90.0}, {"epoch": 2,
                                                                      "test_acc": 94.0}],
                        "test_acc": 94.0, "epochs": 2.0})
    b = accuracy_curve({"history": [{"epoch": 1, "test_acc": 92.0}, {"epoch": 2,
                                                                      "test_acc": 96.0}],
                        "test_acc": 96.0, "epochs": 2.0})
    assert a == [(1.0, 90.0), (2.0, 94.0)]
    epochs, means, stds = mean_std_curve([a, b])
    assert epochs == [1.0, 2.0] and means == [91.0, 95.0]
    assert stds == pytest.approx([math.sqrt(2.0)] * 2)
    # Stopped inside the first epoch (run.max_steps): the final evaluation is the curve.
    assert accuracy_curve({"history": [], "test_acc": 50.0, "epochs": 0.25}) == [(0.25, 50.0)]
