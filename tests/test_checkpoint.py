"""Checkpoints: atomic writes, weights-only loading, RNG round trips, exact resume."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dgn_dist.checkpoint import (
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    step_of,
)
from dgn_dist.config import Config, load_config
from dgn_dist.sampler import ResumableSampler
from dgn_dist.trainer import train

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def _has_optimizer(name: str) -> bool:
    try:
        from dgn_dist.optim import build_optimizer

        cfg = Config()
        cfg.optim.name = name  # type: ignore[assignment]
        build_optimizer(cfg, torch.nn.Linear(2, 2))
    except Exception:  # not written yet, or not available in this checkout
        return False
    return True


def _digits(run_dir: Path, *overrides: str) -> Config:
    """DIGITS at batch 32 (41 steps per epoch) on the CPU, quiet, no TensorBoard."""
    return load_config(CONFIGS / "digits_sgd.toml", [
        "run.device=cpu", "run.quiet=true", f"run.dir={run_dir}", "logging.tensorboard=false",
        "data.batch_size=32", "run.epochs=2", *overrides])


def _losses(cfg: Config) -> tuple[dict[int, float], dict]:
    losses: dict[int, float] = {}
    summary = train(cfg, on_step=lambda step, loss: losses.__setitem__(step, loss))
    return losses, summary


class _Unpicklable:
    def __reduce__(self) -> tuple:
        raise RuntimeError("this object refuses to be pickled")


# --- files ---------------------------------------------------------------------------------

def test_atomic_write_keeps_the_old_file_when_saving_fails(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"w": torch.arange(3)})
    with pytest.raises(RuntimeError, match="refuses"):  # torch.save fails midway
        save_checkpoint(path, {"w": torch.zeros(3), "bad": _Unpicklable()})
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary left behind


def test_load_is_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "pickle.pt"
    torch.save({"obj": Path("/x")}, path)  # an arbitrary class instance needs a full pickle
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's legacy state
    save_checkpoint(tmp_path / "rng.pt", {"rng": capture_rng_state()})
    first = (torch.rand(4), np.random.rand(4), np.random.normal(), random.random())
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    again = (torch.rand(4), np.random.rand(4), np.random.normal(), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2:] == again[2:]


def test_manager_prunes_and_points_at_latest(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        manager.resolve("latest")
    for step in (10, 20, 30):
        manager.save({"step": step}, step)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*.pt"))
    assert names == ["step-20.pt", "step-30.pt"]
    assert manager.resolve("latest").name == "step-30.pt"
    assert manager.resolve(str(tmp_path)).name == "step-30.pt"  # a run directory
    # Resuming from step 20 and saving step 25 must keep 25 (newest write), not 30.
    time.sleep(0.01)
    manager.save({"step": 25}, 25)
    latest = manager.latest()
    assert latest is not None and step_of(latest) == 25
    assert (tmp_path / "checkpoints" / "step-25.pt").is_file()
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        manager.resolve(str(tmp_path / "nope.pt"))


def test_sampler_resumes_mid_epoch() -> None:
    sampler = ResumableSampler(10, seed=5)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.set_epoch(3, start=4)
    assert list(sampler) == full[4:] and len(sampler) == 6
    sampler.set_epoch(4)
    assert sorted(full) == list(range(10)) and list(sampler) != full


# --- exact resume --------------------------------------------------------------------------

RESUME_CASES = [
    ("sgd", ["optim.momentum=0.9", "optim.lr=0.05", "optim.lr_schedule=multistep",
             "data.augment=crop_flip",  # draws from the global RNG: tests its restore
             "optim.milestones=[1]", "optim.gamma=0.5"]),
    ("ekfac", ["optim.lr=0.05", "curvature.inverse_interval=7"]),
]


@pytest.mark.parametrize(("name", "extra"), RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_resume_equals_uninterrupted_run(tmp_path: Path, name: str, extra: list[str]) -> None:
    if not _has_optimizer(name):
        pytest.skip(f"optimizer {name} is not available in this checkout")
    opts = [f"optim.name={name}", *extra]
    straight, ref = _losses(_digits(tmp_path / "a", *opts))
    assert sorted(straight) == list(range(1, 83))  # 2 epochs of ceil(1293 / 32) = 41 steps

    # Three sessions: stop mid-epoch 1 (step 30), stop at the epoch boundary (41), finish.
    run = tmp_path / "b"
    got, _ = _losses(_digits(run, *opts, "run.max_steps=30"))
    more, _ = _losses(_digits(run, *opts, "run.epochs=1", "run.resume=latest"))
    rest, summary = _losses(_digits(run, *opts, "run.resume=latest"))
    assert sorted(got) == list(range(1, 31)) and sorted(more) == list(range(31, 42))
    assert sorted(rest) == list(range(42, 83))
    assert {**got, **more, **rest} == straight  # bit-exact, every step
    assert summary["test_acc"] == ref["test_acc"] and summary["train_loss"] == ref["train_loss"]
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "step-82.pt")
    b = load_checkpoint(run / "checkpoints" / "step-82.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_interrupt_writes_a_checkpoint_and_resume_continues(tmp_path: Path) -> None:
    straight, _ = _losses(_digits(tmp_path / "a", "optim.momentum=0.9", "run.epochs=1"))

    def interrupt_at_25(step: int, loss: float) -> None:
        if step == 25:
            raise KeyboardInterrupt

    run = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        train(_digits(run, "optim.momentum=0.9", "run.epochs=1"), on_step=interrupt_at_25)
    latest = CheckpointManager(run / "checkpoints", 2).latest()
    assert latest is not None and latest.name == "step-25.pt"
    assert load_checkpoint(latest)["progress"]["position"] == 25
    rest, _ = _losses(_digits(run, "optim.momentum=0.9", "run.epochs=1", "run.resume=latest"))
    assert rest == {s: v for s, v in straight.items() if s > 25}


def test_an_error_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    def fail_at_15(step: int, loss: float) -> None:
        if step == 15:
            raise RuntimeError("boom")

    run = tmp_path / "r"
    with pytest.raises(RuntimeError, match="boom"):
        train(_digits(run, "checkpoint.every_steps=10"), on_step=fail_at_15)
    latest = CheckpointManager(run / "checkpoints", 2).latest()
    assert latest is not None and latest.name == "step-10.pt"
    assert load_checkpoint(latest)["progress"]["step"] == 10


def test_sigint_checkpoints_then_exits_130(tmp_path: Path) -> None:
    run = tmp_path / "r"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "dgn_dist.train", "--config",
           str(CONFIGS / "synthetic_smoke.toml"), f"run.dir={run}", "run.epochs=1000",
           "checkpoint.every_steps=5", "logging.tensorboard=false"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "latest").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (out, err)
    assert "interrupted at step" in out
    latest = CheckpointManager(run / "checkpoints", 2).latest()
    assert latest is not None
    ckpt = load_checkpoint(latest)
    assert ckpt["progress"]["step"] >= 5 and step_of(latest) == ckpt["progress"]["step"]
