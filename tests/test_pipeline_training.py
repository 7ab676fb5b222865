"""The trainer with parallel.pp=2 (game stages sharded over 2 gloo ranks): equals
one-process DGNOpt, resumes exactly from its checkpoints, writes pipeline TensorBoard tags,
and refuses settings the pipeline does not support before training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from dist_helper import expect_setup_error, run_distributed

from dgn_dist.config import load_config
from dgn_dist.game.training import EXPORT_NAME
from dgn_dist.trainer import train

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "synthetic_smoke.toml"
# digits_resnet: stem conv | residual block | head -> the skip path crosses the boundary
BASE = ["run.max_steps=4", "optim.name=dgnopt", "optim.lr=0.05", "curvature.damping=0.3",
        "curvature.inverse_interval=1", "model.name=digits_resnet", "logging.log_every=2",
        "checkpoint.every_steps=2", "data.synthetic_train_size=256"]


def _cfg(run_dir: Path, *overrides: str) -> Any:
    return load_config(CONFIG, [f"run.dir={run_dir}", *BASE, *overrides])


def _rank(rank: int, world: int, run_dir: str, overrides: list[str]) -> dict[str, Any]:
    del rank, world
    return train(_cfg(Path(run_dir), *overrides))


def _close(a: Path, b: Path) -> None:
    expected = torch.load(a / EXPORT_NAME, weights_only=True)
    got = torch.load(b / EXPORT_NAME, weights_only=True)
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("info", ["fne", "gr"])
def test_pp2_trainer_equals_one_process(tmp_path: Path, info: str) -> None:
    single = train(_cfg(tmp_path / "single", f"game.info={info}"))
    results = run_distributed(_rank, 2, str(tmp_path / "pp"),
                              [f"game.info={info}", "parallel.pp=2", "parallel.micro_batches=2"],
                              init=False, timeout=180.0)
    _close(tmp_path / "single", tmp_path / "pp")
    for summary in results:
        assert summary["train_loss"] == pytest.approx(single["train_loss"], rel=1e-5)
        assert summary["test_acc"] == pytest.approx(single["test_acc"], abs=1e-9)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "pp" / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"time/forward", "time/sweep", "time/update", "comm/sweep_bytes"} <= tags
    assert events.Scalars("comm/sweep_bytes")[-1].value > 0


def test_pp2_resume_equals_uninterrupted(tmp_path: Path) -> None:
    run_distributed(_rank, 2, str(tmp_path / "whole"), ["parallel.pp=2"], init=False,
                    timeout=180.0)
    run_distributed(_rank, 2, str(tmp_path / "split"), ["parallel.pp=2", "run.max_steps=2"],
                    init=False, timeout=180.0)
    run_distributed(_rank, 2, str(tmp_path / "split"), ["parallel.pp=2", "run.resume=latest"],
                    init=False, timeout=180.0)
    _close(tmp_path / "whole", tmp_path / "split")


@pytest.mark.parametrize(("overrides", "needle"), [
    (["parallel.pp=2", "optim.name=sgd"], "optim.name='dgnopt'"),
    (["parallel.pp=2", "parallel.micro_batches=5"], "micro_batches"),
    (["parallel.pp=2", "parallel.dp=2"], "launch 4 processes"),
    (["parallel.pp=2", "data.loader=ffcv"], "data.loader='torch'"),
])
def test_bad_pipeline_settings_fail_on_every_rank(overrides: list[str], needle: str) -> None:
    for message in run_distributed(expect_setup_error, 2, str(CONFIG), [*BASE, *overrides],
                                   init=False, timeout=60.0):
        assert needle in message, message
