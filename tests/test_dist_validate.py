"""Parallel degrees vs world size, stages and batch; launcher detection and device/backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist_helper import free_port, run_distributed

from dgn_dist.config import ConfigError
from dgn_dist.distributed.env import (
    DistContext,
    build_device_mesh,
    check_accelerate_cpu,
    detect_launch,
    get_context,
    init_distributed,
    resolve_device_backend,
    shutdown,
    verify_accelerator,
)
from dgn_dist.distributed.validate import DistributedSetupError, ParallelDims, check_parallel


def test_dp_zero_is_derived_from_world_size() -> None:
    dims = ParallelDims(pp=2, dp=0, world_size=8)
    assert (dims.pp, dims.dp) == (2, 4)
    assert dims.pp_enabled and dims.dp_enabled
    assert not ParallelDims(1, 0, 1).dp_enabled


@pytest.mark.parametrize(("pp", "dp", "world", "needle"), [
    (3, 0, 4, "parallel.pp=3 does not divide the world size 4; use parallel.pp in [1, 2, 4]"),
    (2, 3, 4, "parallel.pp * parallel.dp = 2 * 3 = 6 but the launcher started 4 processes"),
    (0, 1, 1, "parallel.pp must be a positive integer, got 0"),
    (1, -1, 2, "parallel.dp must be 0 (= world size / pp) or a positive integer, got -1"),
])
def test_bad_degrees_say_what_to_change(pp: int, dp: int, world: int, needle: str) -> None:
    with pytest.raises(DistributedSetupError) as info:
        ParallelDims(pp=pp, dp=dp, world_size=world)
    assert needle in str(info.value)
    assert isinstance(info.value, ConfigError)  # dgn-train reports it and exits 2


def test_pp_at_most_the_number_of_stages() -> None:
    dims = ParallelDims(pp=4, dp=1, world_size=4)
    dims.check_stages(4)
    with pytest.raises(DistributedSetupError, match="parallel.pp=4 exceeds the model's 3 stages"):
        dims.check_stages(3)


def test_batch_divisibility() -> None:
    dims = ParallelDims(pp=1, dp=4, world_size=4)
    assert dims.local_batch(256) == 64
    assert dims.local_batch(256, micro_batches=8) == 64
    with pytest.raises(DistributedSetupError, match=r"global batch 250 is not divisible by .*"
                       r"dp=4.*e\.g\. 248 or 252"):
        dims.local_batch(250)
    with pytest.raises(DistributedSetupError, match=r"per-replica batch 64 .* not divisible by "
                       r"micro_batches=3; use micro_batches in \[1, 2, 4, 8, 16, 32, 64\]"):
        dims.local_batch(256, micro_batches=3)


def test_mesh_coordinates_are_row_major() -> None:
    dims = ParallelDims(pp=2, dp=3, world_size=6)
    assert [dims.coords(r) for r in range(6)] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert dims.dp_groups() == [[0, 1, 2], [3, 4, 5]]
    assert dims.pp_groups() == [[0, 3], [1, 4], [2, 5]]
    assert all(dims.rank_of(*dims.coords(r)) == r for r in range(6))
    with pytest.raises(ValueError, match="rank must be in"):
        dims.coords(6)


def test_check_parallel_runs_every_check() -> None:
    assert check_parallel(1, 0, 2, num_stages=5, global_batch=64, micro_batches=2).dp == 2
    with pytest.raises(DistributedSetupError, match="exceeds"):
        check_parallel(2, 1, 2, num_stages=1)
    with pytest.raises(DistributedSetupError, match="not divisible"):
        check_parallel(1, 2, 2, global_batch=63)


def test_validate_imports_no_torch() -> None:
    code = ("import sys, dgn_dist.distributed, dgn_dist.distributed.validate; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


BASE = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "RANK": "1", "WORLD_SIZE": "2",
        "LOCAL_RANK": "1"}
# Variables observed under each launcher on this machine (see launch/README.md).
TORCHRUN = {**BASE, "TORCHELASTIC_RUN_ID": "none", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0"}
ACCELERATE = {**TORCHRUN, "ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"}
DEEPSPEED = {**BASE, "CROSS_RANK": "0", "CROSS_SIZE": "1", "LOCAL_SIZE": "2"}


@pytest.mark.parametrize(("env", "launcher"), [
    ({}, "none"), (TORCHRUN, "torchrun"), (ACCELERATE, "accelerate"),
    (DEEPSPEED, "deepspeed"), (BASE, "env"),
])
def test_detect_launch(env: dict[str, str], launcher: str) -> None:
    info = detect_launch(env)
    assert info.launcher == launcher
    if launcher != "none":
        assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (1, 2, 1, 2)


def test_accelerate_single_process_without_world_size() -> None:
    env = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "True"}
    assert detect_launch(env).world_size == 1


@pytest.mark.parametrize(("env", "needle"), [
    ({**BASE, "RANK": "x"}, "sets no valid RANK (got 'x')"),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "sets no valid RANK"),
    ({**BASE, "RANK": "2"}, "inconsistent env variables RANK=2, WORLD_SIZE=2"),
    ({**BASE, "MASTER_PORT": ""}, "MASTER_PORT unset"),
])
def test_detect_launch_errors(env: dict[str, str], needle: str) -> None:
    with pytest.raises(DistributedSetupError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        detect_launch(env)


def test_resolve_device_backend() -> None:
    assert resolve_device_backend("auto", "auto", cuda_available=False) == (
        torch.device("cpu"), "gloo")
    assert resolve_device_backend("auto", "auto", 1, cuda_available=True) == (
        torch.device("cuda", 1), "nccl")
    assert resolve_device_backend("auto", "gloo", cuda_available=True) == (
        torch.device("cpu"), "gloo")
    with pytest.raises(DistributedSetupError, match="parallel.backend='nccl' needs CUDA"):
        resolve_device_backend("cpu", "nccl", cuda_available=True)
    with pytest.raises(DistributedSetupError, match=r"no GPU here\); use parallel.backend=gloo"):
        resolve_device_backend("auto", "nccl", cuda_available=False)
    with pytest.raises(DistributedSetupError, match="'gloo' with run.device='cuda'"):
        resolve_device_backend("cuda", "gloo", cuda_available=True)
    with pytest.raises(DistributedSetupError, match="run.device='cuda' but no CUDA device"):
        resolve_device_backend("cuda", "auto", cuda_available=False)
    with pytest.raises(DistributedSetupError, match="got 'mpi'"):
        resolve_device_backend("cpu", "mpi")


def test_accelerate_cpu_pitfall() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    info = detect_launch(ACCELERATE)
    with pytest.raises(DistributedSetupError, match="without ACCELERATE_USE_CPU=true"):
        check_accelerate_cpu(info, cpu, ACCELERATE)
    check_accelerate_cpu(info, cpu, {**ACCELERATE, "ACCELERATE_USE_CPU": "true"})
    check_accelerate_cpu(info, cpu, {**ACCELERATE, "ACCELERATE_USE_CPU": "True"})  # --cpu
    check_accelerate_cpu(info, cuda, ACCELERATE)
    with pytest.raises(DistributedSetupError, match="unset it for GPU runs"):
        check_accelerate_cpu(info, cuda, {**ACCELERATE, "ACCELERATE_USE_CPU": "1"})
    check_accelerate_cpu(detect_launch(TORCHRUN), cpu, TORCHRUN)  # other launchers: no check


# --- init_distributed in-process (no group is created) -------------------------------------

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "CROSS_RANK",
               "ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_USE_CPU")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_single_process_context(clean_env: pytest.MonkeyPatch) -> None:
    ctx = init_distributed(device="cpu")
    try:
        assert ctx == DistContext(0, 1, 0, torch.device("cpu"), None, "none", True)
        assert not ctx.distributed and not dist.is_initialized()
        assert init_distributed(device="cpu") is ctx and get_context() is ctx
    finally:
        shutdown()
    assert get_context() is None


def test_accelerate_without_use_cpu_fails_before_any_group(clean_env: pytest.MonkeyPatch) -> None:
    for name, value in ACCELERATE.items():
        clean_env.setenv(name, value)
    with pytest.raises(DistributedSetupError, match="Set it, e.g. `ACCELERATE_USE_CPU=true"):
        init_distributed(device="cpu")
    assert get_context() is None and not dist.is_initialized()


# --- init_distributed on 2 gloo processes ---------------------------------------------------

def _init_body(rank: int, world_size: int) -> tuple[Any, ...]:
    ctx = init_distributed(device="cpu", timeout_s=30)
    assert init_distributed(device="cpu") is ctx
    with pytest.raises(DistributedSetupError, match="nccl' needs CUDA"):
        init_distributed(device="cpu", backend="nccl")
    mesh = build_device_mesh(ctx, ParallelDims(1, 0, world_size))
    x = torch.tensor([float(rank + 1)])
    dist.all_reduce(x, group=mesh["dp"].get_group())
    out = (ctx.rank, ctx.world_size, ctx.local_rank, ctx.backend, ctx.launcher, ctx.is_main,
           dist.get_backend(), x.item(), tuple(mesh.mesh_dim_names), mesh["dp"].size())
    shutdown()
    return out


def test_init_distributed_under_torchrun_variables() -> None:
    out = run_distributed(_init_body, 2, init=False, env={"TORCHELASTIC_RUN_ID": "t"})
    assert out == [(0, 2, 0, "gloo", "torchrun", True, "gloo", 3.0, ("pp", "dp"), 2),
                   (1, 2, 1, "gloo", "torchrun", False, "gloo", 3.0, ("pp", "dp"), 2)]


def _accelerator_body(rank: int, world_size: int) -> tuple[int, str, float]:
    from accelerate import Accelerator

    ctx = init_distributed(device="auto")
    accelerator = Accelerator()
    verify_accelerator(ctx, accelerator)
    x = torch.ones(1)
    dist.all_reduce(x)
    return accelerator.num_processes, str(accelerator.distributed_type), x.item()


def test_accelerator_shards_over_our_group() -> None:
    env = {**{k: v for k, v in ACCELERATE.items() if k.startswith("ACCELERATE")},
           "ACCELERATE_USE_CPU": "true"}
    out = run_distributed(_accelerator_body, 2, init=False, env=env, timeout=60)
    assert out == [(2, "DistributedType.MULTI_CPU", 2.0)] * 2


def _backendless_group_body(rank: int, world_size: int) -> str:
    dist.init_process_group(init_method="env://", rank=rank, world_size=world_size)
    with pytest.raises(DistributedSetupError, match="has no backend") as info:
        init_distributed(device="cpu")
    return str(info.value)


def test_backendless_group_is_detected() -> None:
    """What accelerate leaves behind on CPU without ACCELERATE_USE_CPU (get_backend 'undefined')."""
    out = run_distributed(_backendless_group_body, 2, init=False)
    assert all("ACCELERATE_USE_CPU=true is missing" in msg for msg in out)


# --- the real launchers (2 CPU processes) ---------------------------------------------------

SCRIPT = """
import json, sys
import torch, torch.distributed as dist
from dgn_dist.distributed.env import init_distributed, shutdown
from dgn_dist.distributed.validate import DistributedSetupError
try:
    ctx = init_distributed(device="cpu")
except DistributedSetupError as err:
    print("SETUP-ERROR", err, flush=True)
    sys.exit(2)
x = torch.tensor([float(ctx.rank + 1)])
dist.all_reduce(x)
with open(f"result{ctx.rank}.json", "w") as f:
    json.dump([ctx.rank, ctx.world_size, ctx.launcher, ctx.backend, x.item(), sys.argv[1:]], f)
shutdown()
"""
BIN = os.path.dirname(sys.executable)


def _launch(tmp_path: Path, argv: list[str], env: dict[str, str],
            timeout: float = 120) -> tuple[int, list[list[Any]], str]:
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    full_env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    full_env.update({"OMP_NUM_THREADS": "1", **env})
    proc = subprocess.run([*argv, str(script)], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=tmp_path)
    results = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("result*.json"))]
    for f in tmp_path.glob("result*.json"):
        f.unlink()
    return proc.returncode, results, proc.stdout + proc.stderr


@pytest.mark.slow
def test_torchrun_starts_two_gloo_ranks(tmp_path: Path) -> None:
    rc, results, text = _launch(tmp_path, [
        f"{BIN}/torchrun", "--nproc_per_node", "2", "--master_port", str(free_port())], {})
    assert rc == 0, text
    assert results == [[0, 2, "torchrun", "gloo", 3.0, []], [1, 2, "torchrun", "gloo", 3.0, []]]


ACCEL = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
         "no", "--dynamo_backend", "no"]


@pytest.mark.slow
def test_accelerate_launch_cpu(tmp_path: Path) -> None:
    port = ["--main_process_port", str(free_port())]
    config = str(Path(__file__).resolve().parent.parent / "launch" / "accelerate_cpu.yaml")
    rc, results, text = _launch(tmp_path, [f"{BIN}/accelerate", "launch", "--config_file",
                                           config, *port], {"ACCELERATE_USE_CPU": "true"})
    assert rc == 0, text
    assert [r[:5] for r in results] == [[0, 2, "accelerate", "gloo", 3.0],
                                        [1, 2, "accelerate", "gloo", 3.0]]
    argv = [f"{BIN}/accelerate", "launch", *ACCEL, *port]
    rc, results, text = _launch(tmp_path, argv, {})  # the pitfall: fail, say what to set
    assert rc != 0 and not results
    # the first rank to exit makes the launcher stop the other, which may not have printed yet
    assert text.count("SETUP-ERROR") >= 1 and "ACCELERATE_USE_CPU=true" in text


@pytest.mark.slow
def test_deepspeed_launcher_cpu(tmp_path: Path) -> None:
    argv = [f"{BIN}/deepspeed", "--num_gpus", "2", "--master_port", str(free_port())]
    rc, results, text = _launch(tmp_path, argv, {"DS_ACCELERATOR": "cpu",
                                                 "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    assert rc == 0, text
    assert results == [[0, 2, "deepspeed", "gloo", 3.0, ["--local_rank=0"]],
                       [1, 2, "deepspeed", "gloo", 3.0, ["--local_rank=1"]]]
    assert "shm_comm" not in text and not (tmp_path / "ext").exists()  # no JIT build


# --- launch files ---------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def test_launch_train_drops_deepspeed_local_rank() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--local_rank=1",
                          "--print-config", "run.epochs=3", "--local_rank", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "epochs = 3" in out.stdout


def test_accelerate_yaml_files_load() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    cpu = load_config_from_file(str(ROOT / "launch" / "accelerate_cpu.yaml"))
    gpu = load_config_from_file(str(ROOT / "launch" / "accelerate_multigpu.yaml"))
    # MULTI_GPU is accelerate's only local multi-process launcher (MULTI_CPU needs mpirun).
    assert (str(cpu.distributed_type), cpu.num_processes, cpu.mixed_precision) == (
        "DistributedType.MULTI_GPU", 2, "no")
    assert (str(gpu.distributed_type), gpu.mixed_precision, gpu.use_cpu) == (
        "DistributedType.MULTI_GPU", "bf16", False)


@pytest.mark.parametrize(("name", "stage", "bf16"), [
    ("zero0", 0, False), ("zero1", 1, False), ("bf16_zero1", 1, True)])
def test_deepspeed_json_configs_validate(name: str, stage: int, bf16: bool) -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = json.loads((ROOT / "configs" / "deepspeed" / f"{name}.json").read_text())
    raw["train_micro_batch_size_per_gpu"] = 64  # the trainer fills the batch size in
    cfg = DeepSpeedConfig(raw)  # pydantic: unknown keys raise
    assert cfg.zero_optimization_stage == stage
    assert cfg.bfloat16_config.enabled is bf16
    assert cfg.gradient_clipping == 1.0 and cfg.zero_allow_untested_optimizer
