"""End to end under the real launchers, 2 CPU processes each (gloo): ``torchrun``,
``accelerate launch`` (and its CPU pitfall), ``deepspeed``; and the torchrun fault test (a
worker killed mid-run, the job restarted from the last checkpoint ends where an uninterrupted
run ends)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_helper import free_port

from dgn_dist.game.training import EXPORT_NAME

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CONFIG = ROOT / "configs" / "synthetic_smoke.toml"
TRAIN = ["--config", str(CONFIG), "run.max_steps=6", "checkpoint.every_steps=2",
         "data.synthetic_train_size=256", "optim.name=ekfac", "optim.lr=0.05",
         "curvature.inverse_interval=1"]


def _launch(cmd: list[str], extra_env: dict[str, str] | None = None,
            timeout: float = 240.0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(ROOT), **(extra_env or {})}
    env.pop("ACCELERATE_USE_CPU", None)
    env.update(extra_env or {})
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _summary(run_dir: Path, proc: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["dp"] == 2 and summary["steps"] == 6
    assert proc.stdout.count("done: test acc") == 1  # rank 0 alone reports
    return summary


def _launcher_cmd(launcher: str, port: int) -> tuple[list[str], dict[str, str]]:
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port),
                "-m", "dgn_dist.train"], {}
    if launcher == "accelerate":
        return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(port), "-m", "dgn_dist.train"], \
            {"ACCELERATE_USE_CPU": "true"}
    return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
            str(ROOT / "launch" / "train.py")], {"DS_ACCELERATOR": "cpu"}


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate", "deepspeed"])
def test_launcher_trains_data_parallel(tmp_path: Path, launcher: str) -> None:
    cmd, env = _launcher_cmd(launcher, free_port())
    extra = ["parallel.deepspeed_config=configs/deepspeed/zero1.json"] \
        if launcher == "deepspeed" else []
    proc = _launch([*cmd, *TRAIN, f"run.dir={tmp_path}", *extra], env)
    summary = _summary(tmp_path, proc)
    assert summary["launcher"] == launcher
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1


def test_accelerate_without_cpu_variable_is_refused(tmp_path: Path) -> None:
    cmd, _ = _launcher_cmd("accelerate", free_port())
    proc = _launch([*cmd, *TRAIN, f"run.dir={tmp_path}"])
    assert proc.returncode != 0
    assert "ACCELERATE_USE_CPU=true" in proc.stderr
    assert not (tmp_path / "summary.json").exists()


def _launch_once_more_on_failure(make_cmd: Any) -> subprocess.CompletedProcess[str]:
    """Launch; if the launcher itself failed (e.g. a rendezvous port taken meanwhile), launch
    once more on fresh ports. What the run computes is asserted on by the caller."""
    proc = _launch(make_cmd(free_port()))
    if proc.returncode != 0:
        print("first launch failed, retrying:\n", proc.stdout[-3000:], proc.stderr[-5000:])
        proc = _launch(make_cmd(free_port()))
    return proc


def test_torchrun_restart_after_a_killed_worker_matches_uninterrupted(tmp_path: Path) -> None:
    """Kill rank 1 after step 5 under torchrun --max-restarts 1: the restarted job resumes
    from the step-4 checkpoint and ends bit-identical to an uninterrupted run. The scenario
    depends on process scheduling (a kill, a restart, a new rendezvous); it failed once in
    many runs on a loaded 2-core machine, so a failed attempt is reported as a warning with
    its logs and the whole scenario runs once more in fresh directories."""
    try:
        _fault_scenario(tmp_path / "attempt-1")
    except AssertionError as err:
        warnings.warn(f"fault scenario failed once, retrying: {str(err)[-4000:]}",
                      RuntimeWarning, stacklevel=1)
        _fault_scenario(tmp_path / "attempt-2")


def _fault_scenario(tmp_path: Path) -> None:
    tmp_path.mkdir(parents=True)
    base = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--max-restarts", "1"]
    whole = _launch_once_more_on_failure(lambda port: [
        *base, "--master_port", str(port), "-m", "dgn_dist.train", *TRAIN,
        f"run.dir={tmp_path / 'whole'}"])
    _summary(tmp_path / "whole", whole)
    faulty_dirs = iter([tmp_path / "faulty", tmp_path / "faulty-again"])
    faulty_dir = tmp_path / "faulty"

    def faulty_cmd(port: int) -> list[str]:
        nonlocal faulty_dir
        faulty_dir = next(faulty_dirs)
        # rank 1 SIGKILLs itself after step 5; the last checkpoint is step 4
        return [*base, "--master_port", str(port),
                str(ROOT / "tests" / "scripts" / "fault_worker.py"), "1", "5", *TRAIN,
                f"run.dir={faulty_dir}"]

    faulty = _launch_once_more_on_failure(faulty_cmd)
    assert faulty.returncode == 0, faulty.stdout[-3000:] + faulty.stderr[-5000:]
    assert "resumed from" in faulty.stdout and "step-4.pt" in faulty.stdout, \
        faulty.stdout[-3000:] + faulty.stderr[-5000:]
    summary = json.loads((faulty_dir / "summary.json").read_text())
    assert summary["steps"] == 6
    expected = torch.load(tmp_path / "whole" / EXPORT_NAME, weights_only=True)
    got = torch.load(faulty_dir / EXPORT_NAME, weights_only=True)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


PIPELINE = ["--config", str(CONFIG), "run.max_steps=4", "data.synthetic_train_size=256",
            "optim.name=dgnopt", "optim.lr=0.05", "curvature.damping=0.3",
            "model.name=digits_resnet", "parallel.pp=2", "parallel.micro_batches=2"]


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate", "deepspeed"])
def test_launcher_trains_pipeline_parallel(tmp_path: Path, launcher: str) -> None:
    """pp=2 from the config under each launcher: the game's stages on two ranks."""
    cmd, env = _launcher_cmd(launcher, free_port())
    proc = _launch([*cmd, *PIPELINE, f"run.dir={tmp_path}"], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["dp"] == 1 and summary["steps"] == 4
    assert summary["launcher"] == launcher


def test_dp_benchmark_reports_bytes_and_ratios(tmp_path: Path) -> None:
    """`dgn-bench dp` runs dp=1 and dp=2 and reports per-category bytes (a smoke run)."""
    out = tmp_path / "dp.json"
    proc = _launch([str(BIN / "dgn-bench"), "dp", "--model", "mlp", "--optimizers",
                    "sgd,dgnopt", "--batch", "32", "--steps", "1", "--warmup", "0",
                    "--json", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    dp2 = {r["optimizer"]: r for r in rows if r["setting"] == "dp=2"}
    assert dp2["sgd"]["bytes_per_step"]["grad"] > 0
    assert dp2["dgnopt"]["bytes_per_step"]["factor"] > 0
    assert all(r["ms_per_step"] > 0 for r in rows)


def test_gpu_check_script_plumbing_on_cpu(tmp_path: Path) -> None:
    """launch/gpu_check.sh (the prepared device check) runs end to end with DEVICE=cpu and
    writes its result files: the parity rows, the benchmark rows, the profile, the pass
    floor and both training summaries."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "DEVICE": "cpu", "MODELS": "digits_resnet",
           "PROFILE_MODEL": "digits_resnet",
           "STEPS": "10", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "launch" / "gpu_check.sh")], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {
        "env.txt", "parity.txt", "bench_gpu.txt", "bench_gpu.json", "profile.txt",
        "floor.json", "train_bf16.json", "train_nccl.json", "log.txt"}
    parity = (out / "parity.txt").read_text()
    assert parity.count(" ok") == 8 and "FAIL" not in parity, parity
    rows = json.loads((out / "bench_gpu.json").read_text())["results"]
    assert [r["optimizer"] for r in rows] == ["sgd", "ekfac", "dgnopt", "dgnopt-gr"]
    assert "profile of 2 steps" in (out / "profile.txt").read_text()
    (floor,) = json.loads((out / "floor.json").read_text())
    assert floor["model"] == "digits_resnet" and floor["floor_s"] > 0
    for name in ("train_bf16.json", "train_nccl.json"):
        summary = json.loads((out / name).read_text())
        assert summary["steps"] == 10 and 0.0 <= summary["test_acc"] <= 100.0
