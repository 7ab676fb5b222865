"""TensorBoard event files, read back with tensorboard's EventAccumulator."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dgn_dist.config import Config, load_config
from dgn_dist.trainer import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STEP_TAGS = {"loss/train", "acc/train", "lr", "time/step"}
EVAL_TAGS = {"acc/test", "loss/test", "acc/val"}


def _cfg(config: str, run_dir: Path, *overrides: str) -> Config:
    return load_config(CONFIGS / config, ["run.device=cpu", "run.quiet=true",
                                          f"run.dir={run_dir}", *overrides])


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


class _CurvatureSGD(torch.optim.SGD):
    """SGD that reports fixed curvature statistics (stands in for a curvature optimizer)."""

    def curvature_stats(self) -> dict[str, float]:
        return {"curvature/fc/A_eig_max": 3.0, "curvature/fc/damping": 0.01}


def test_step_eval_and_curvature_tags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    optim_module = importlib.import_module("dgn_dist.optim")
    monkeypatch.setattr(optim_module, "build_optimizer",
                        lambda cfg, model: _CurvatureSGD(model.parameters(), lr=cfg.optim.lr))
    summary = train(_cfg("synthetic_smoke.toml", tmp_path, "run.epochs=2",
                         "logging.log_every=2", "logging.curvature_every=5"))
    scalars = _scalars(tmp_path)
    assert STEP_TAGS | EVAL_TAGS | {"curvature/fc/A_eig_max", "curvature/fc/damping"} \
        <= set(scalars)
    assert [s for s, _ in scalars["loss/train"]] == list(range(2, summary["steps"] + 1, 2))
    assert [s for s, _ in scalars["curvature/fc/A_eig_max"]] == [5, 10, 15, 20, 25, 30]
    assert all(v == 3.0 for _, v in scalars["curvature/fc/A_eig_max"])
    assert all(v == pytest.approx(0.1) for _, v in scalars["lr"])
    assert all(v > 0 for _, v in scalars["time/step"])
    tests = scalars["acc/test"]
    assert [s for s, _ in tests] == [15, 30]  # end of each epoch
    assert tests[-1][1] == pytest.approx(summary["test_acc"])


def test_tensorboard_false_writes_nothing(tmp_path: Path) -> None:
    train(_cfg("synthetic_smoke.toml", tmp_path, "logging.tensorboard=false"))
    assert not (tmp_path / "tb").exists()
    assert not list(tmp_path.rglob("events.out.tfevents.*"))


def test_ekfac_curvature_statistics(tmp_path: Path) -> None:
    try:
        summary = train(_cfg("digits_ekfac.toml", tmp_path, "run.max_steps=20",
                             "logging.curvature_every=10"))
    except ImportError as err:
        pytest.skip(f"EKFAC unavailable: {err}")
    assert summary["optimizer"] == "ekfac"
    tags = set(_scalars(tmp_path))
    for stat in ("A_eig_max", "A_eig_min", "A_cond", "G_eig_max", "G_eig_min", "G_cond"):
        assert any(t.startswith("curvature/") and t.endswith("/" + stat) for t in tags), stat
    assert any(t.startswith("curvature/") and t.endswith("damping") for t in tags), tags
    assert STEP_TAGS | EVAL_TAGS <= tags


def test_resume_after_a_crash_has_no_duplicate_steps(tmp_path: Path) -> None:
    def crash_at_25(step: int, loss: float) -> None:
        if step == 25:
            raise RuntimeError("crash")

    opts = ["run.epochs=2", "logging.log_every=1", "checkpoint.every_steps=10"]
    with pytest.raises(RuntimeError, match="crash"):
        train(_cfg("synthetic_smoke.toml", tmp_path, *opts), on_step=crash_at_25)
    train(_cfg("synthetic_smoke.toml", tmp_path, *opts, "run.resume=latest"))  # from step 20
    steps = [s for s, _ in _scalars(tmp_path)["loss/train"]]
    assert steps == list(range(1, 31))  # steps 21-25 of the crashed session are purged


def test_resumed_event_file_sorts_after_existing_ones(tmp_path: Path) -> None:
    """TensorBoard reads event files in name order; a resumed writer's file must come last
    even when an existing file carries the same (here: a later) second and a counter that
    sorts after the new one's as text -- the flake of the resume test above."""
    import time

    from dgn_dist.metrics import MetricsWriter

    tmp_path.mkdir(exist_ok=True)
    old = tmp_path / f"events.out.tfevents.{int(time.time()) + 1:010d}.host.1.99"
    old.write_bytes(b"")
    writer = MetricsWriter(tmp_path, True, purge_step=5)
    writer.scalars({"x": 1.0}, 5)
    writer.close()
    files = sorted(p.name for p in tmp_path.glob("events.out.tfevents.*"))
    assert len(files) == 2 and files[0] == old.name
