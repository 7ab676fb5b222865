"""Curvature monitoring (issue 3, item 5): eigenvalue histograms in the event file, and no
statistics computed at all when monitoring is off."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dgn_dist.config import Config, ConfigError, load_config
from dgn_dist.dgnopt import optimizer as dgn_optimizer
from dgn_dist.dgnopt.gains import StageSolver
from dgn_dist.optim.kronecker import KroneckerFactor
from dgn_dist.trainer import train

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "synthetic_smoke.toml"


def _cfg(run_dir: Path, *overrides: str) -> Config:
    return load_config(SMOKE, [f"run.dir={run_dir}", "run.max_steps=4", "checkpoint.every_steps=0",
                               "curvature.damping=0.3", "optim.lr=0.05", *overrides])


@pytest.mark.parametrize("optim", ["dgnopt", "ekfac"])
def test_eigenvalue_histograms_in_the_event_file(tmp_path: Path, optim: str) -> None:
    train(_cfg(tmp_path, f"optim.name={optim}", "logging.hist_every=2",
               "logging.curvature_every=2"))
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    players = {t.split("/")[1] for t in acc.Tags()["scalars"] if t.endswith("/damping")}
    assert players  # the same players as the scalar statistics
    expected = {f"curvature/{p}/{side}_eig" for p in players for side in "AG"}
    assert set(acc.Tags()["histograms"]) == expected
    for p in players:
        events = acc.Histograms(f"curvature/{p}/A_eig")
        assert [e.step for e in events] == [2, 4]
        top = acc.Scalars(f"curvature/{p}/A_eig_max")[-1].value
        hist = events[-1].histogram_value
        assert hist.num >= 2 and hist.max == pytest.approx(top, rel=1e-5)


def test_no_histograms_by_default(tmp_path: Path) -> None:
    train(_cfg(tmp_path, "optim.name=dgnopt"))
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0})
    acc.Reload()
    assert acc.Tags()["histograms"] == []


def _count_stat_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count every entry point that computes a monitoring statistic."""
    calls = {"value_stats": 0, "cross_ratio": 0, "player_stats": 0, "factor_stats": 0,
             "eigenvalues": 0}

    def counted(name: str, fn):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(dgn_optimizer, "value_stats",
                        counted("value_stats", dgn_optimizer.value_stats))
    monkeypatch.setattr(StageSolver, "cross_ratio", counted("cross_ratio", StageSolver.cross_ratio))
    monkeypatch.setattr(StageSolver, "player_stats",
                        counted("player_stats", StageSolver.player_stats))
    monkeypatch.setattr(KroneckerFactor, "stats", counted("factor_stats", KroneckerFactor.stats))
    monkeypatch.setattr(dgn_optimizer.DGNOpt, "curvature_eigenvalues",
                        counted("eigenvalues", dgn_optimizer.DGNOpt.curvature_eigenvalues))
    return calls


@pytest.mark.parametrize("on", [False, True])
def test_monitoring_off_computes_nothing(tmp_path: Path, on: bool,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``logging.curvature_every = 0`` and ``logging.hist_every = 0`` no statistic is
    computed (the optimizer does not record, the trainer does not ask); switched on, every
    counted entry point runs (so the counting itself works)."""
    calls = _count_stat_calls(monkeypatch)
    every = 2 if on else 0
    train(_cfg(tmp_path, "optim.name=dgnopt", "game.info=gr", "model.name=coop_cnn",
               "data.synthetic_shape=[3, 8, 8]", f"logging.curvature_every={every}",
               f"logging.hist_every={every}"))
    if on:
        assert all(n > 0 for n in calls.values()), calls
    else:
        assert calls == dict.fromkeys(calls, 0)


def test_hist_every_must_not_be_negative() -> None:
    with pytest.raises(ConfigError, match="logging.hist_every"):
        load_config(SMOKE, ["logging.hist_every=-1"])
