"""Launcher detection and the default process group (DESIGN.md §4 "Launchers").

One call, :func:`init_distributed`, works under every supported launcher:

* ``torchrun`` (and ``srun torchrun``): ``TORCHELASTIC_RUN_ID`` with ``RANK`` /
  ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``;
* ``accelerate launch``: the same torchrun variables plus ``ACCELERATE_MIXED_PRECISION`` and
  ``ACCELERATE_DYNAMO_BACKEND`` (always set by the launcher), ``ACCELERATE_USE_CPU`` when
  asked for CPU;
* ``deepspeed``: ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_*`` plus ``CROSS_RANK``,
  ``CROSS_SIZE`` and ``LOCAL_SIZE`` (no ``TORCHELASTIC_*``); the group is created through
  ``deepspeed.init_distributed`` so DeepSpeed's comm layer and engines see it;
* ``env``: any other launcher that exports ``RANK`` and ``WORLD_SIZE`` (env:// rendezvous);
* ``none``: no launcher variables -- one process, no process group.

CPU runs use gloo, CUDA runs nccl with one GPU per local rank.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist

from dgn_dist.distributed.validate import DistributedSetupError, ParallelDims

Launcher = Literal["none", "torchrun", "accelerate", "deepspeed", "env"]
_TRUE = ("1", "true", "yes", "y", "on", "t")
# Opt-in to DeepSpeed's JIT-built shared-memory CPU all-reduce (see launch/README.md).
DS_SHM_ENV = "DGN_DS_SHM_COMM"


@dataclass(frozen=True)
class LaunchInfo:
    """What the launcher told this process through its environment."""

    launcher: Launcher
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job.

    Attributes:
        rank: global rank.
        world_size: number of processes.
        local_rank: rank on this node (selects the GPU).
        device: the device this rank computes on.
        backend: ``"gloo"`` / ``"nccl"``, or ``None`` for a single process without a group.
        launcher: the detected launcher.
        is_main: True on rank 0 (the rank that logs and writes checkpoints).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None
    launcher: Launcher
    is_main: bool

    @property
    def distributed(self) -> bool:
        """True when a process group is initialised."""
        return self.backend is not None


_CONTEXT: DistContext | None = None


def _int_env(env: Mapping[str, str], name: str, launcher: str) -> int:
    value = env.get(name)
    if value is None or not value.strip().lstrip("-").isdigit():
        raise DistributedSetupError(
            f"the {launcher} launch sets no valid {name} (got {value!r}); start the job with "
            f"torchrun, accelerate launch or deepspeed, or export RANK, WORLD_SIZE, LOCAL_RANK, "
            f"MASTER_ADDR and MASTER_PORT")
    return int(value)


def detect_launch(environ: Mapping[str, str] | None = None) -> LaunchInfo:
    """Which launcher started this process, and its rank numbers.

    Args:
        environ: the environment to read (default ``os.environ``).

    Raises:
        DistributedSetupError: launcher variables are present but incomplete or inconsistent.
    """
    env = os.environ if environ is None else environ
    launcher: Launcher
    if "CROSS_RANK" in env and "CROSS_SIZE" in env and "LOCAL_SIZE" in env:
        launcher = "deepspeed"
    elif "ACCELERATE_MIXED_PRECISION" in env or "ACCELERATE_DYNAMO_BACKEND" in env:
        launcher = "accelerate"
    elif "TORCHELASTIC_RUN_ID" in env:
        launcher = "torchrun"
    elif "RANK" in env or "WORLD_SIZE" in env:
        launcher = "env"
    else:
        return LaunchInfo("none", 0, 1, 0, 1)
    if launcher == "accelerate" and "WORLD_SIZE" not in env:
        # ``accelerate launch`` without --multi_gpu runs one plain process.
        return LaunchInfo("accelerate", 0, 1, 0, 1)
    rank = _int_env(env, "RANK", launcher)
    world = _int_env(env, "WORLD_SIZE", launcher)
    local = int(env.get("LOCAL_RANK", "0") or 0)
    local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", str(world))) or world)
    if world < 1 or not 0 <= rank < world or not 0 <= local < max(local_world, 1):
        raise DistributedSetupError(
            f"inconsistent {launcher} variables RANK={rank}, WORLD_SIZE={world}, "
            f"LOCAL_RANK={local}, local world size {local_world}; relaunch the job")
    if world > 1:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not env.get(v)]
        if missing:
            raise DistributedSetupError(
                f"{launcher} launch with WORLD_SIZE={world} but {' and '.join(missing)} unset; "
                f"export the rendezvous address of rank 0 (MASTER_ADDR=<host> MASTER_PORT=<port>)")
    return LaunchInfo(launcher, rank, world, local, local_world)


def resolve_device_backend(device: str, backend: str, local_rank: int = 0,
                           cuda_available: bool | None = None) -> tuple[torch.device, str]:
    """The device and backend for a run; ``auto`` picks cuda/nccl when a GPU is present.

    Raises:
        DistributedSetupError: unknown names, ``cuda`` without a GPU, or a backend that does
            not fit the device (nccl needs CUDA tensors, gloo is the CPU backend here).
    """
    if device not in ("auto", "cpu", "cuda"):
        raise DistributedSetupError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if backend not in ("auto", "gloo", "nccl"):
        raise DistributedSetupError(
            f"parallel.backend must be 'auto', 'gloo' or 'nccl', got {backend!r}")
    has_cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if device == "auto":
        device = "cuda" if has_cuda and backend != "gloo" else "cpu"
    if device == "cuda" and not has_cuda:
        raise DistributedSetupError("run.device='cuda' but no CUDA device is available; use "
                                    "run.device=cpu (gloo) or run.device=auto")
    if backend == "auto":
        backend = "nccl" if device == "cuda" else "gloo"
    if backend == "nccl" and device == "cpu":
        raise DistributedSetupError(
            "parallel.backend='nccl' needs CUDA tensors but the run is on the CPU"
            + ("" if has_cuda else " (no GPU here)")
            + "; use parallel.backend=gloo (or auto) for CPU runs, or run.device=cuda")
    if backend == "gloo" and device == "cuda":
        raise DistributedSetupError(
            "parallel.backend='gloo' with run.device='cuda': DGNOpt's reductions need nccl on "
            "GPUs; use parallel.backend=nccl (or auto), or run.device=cpu")
    if device == "cuda":
        return torch.device("cuda", local_rank), backend
    return torch.device("cpu"), backend


def check_accelerate_cpu(launch: LaunchInfo, device: torch.device,
                         environ: Mapping[str, str] | None = None) -> None:
    """Catch ``accelerate launch --multi_gpu`` on CPU without ``ACCELERATE_USE_CPU=true``.

    accelerate then sets ``WORLD_SIZE=2`` but its ``Accelerator`` falls back to
    ``DistributedType.NO``: each process trains alone on unsharded data with a backend-less
    group (``dist.get_backend()`` returns ``'undefined'``). Also rejects the converse
    (``ACCELERATE_USE_CPU=true`` with a CUDA device).

    Raises:
        DistributedSetupError: with the launch line to use instead.
    """
    if launch.launcher != "accelerate" or launch.world_size < 2:
        return
    env = os.environ if environ is None else environ
    use_cpu = env.get("ACCELERATE_USE_CPU", "").strip().lower() in _TRUE
    if device.type == "cpu" and not use_cpu:
        raise DistributedSetupError(
            f"accelerate launch started {launch.world_size} processes for a CPU run without "
            f"ACCELERATE_USE_CPU=true: accelerate would run each as an unsharded single "
            f"process (DistributedType.NO). Set it, e.g. `ACCELERATE_USE_CPU=true accelerate "
            f"launch --multi_gpu --num_processes {launch.world_size} --num_machines 1 "
            f"--mixed_precision no --dynamo_backend no ...` (also needed with "
            f"--config_file launch/accelerate_cpu.yaml)")
    if device.type == "cuda" and use_cpu:
        raise DistributedSetupError(
            "ACCELERATE_USE_CPU=true but the run is on CUDA; unset it for GPU runs or set "
            "run.device=cpu")


def _check_existing_group(launch: LaunchInfo, backend: str) -> None:
    current = dist.get_backend()
    if current == "undefined":
        raise DistributedSetupError(
            "the default process group has no backend (dist.get_backend() is 'undefined'): "
            "under accelerate this means ACCELERATE_USE_CPU=true is missing for a CPU run; "
            "set it and relaunch")
    if dist.get_world_size() != launch.world_size or current != backend:
        raise DistributedSetupError(
            f"a process group (backend {current}, world size {dist.get_world_size()}) already "
            f"exists but the launch asks for {backend} with world size {launch.world_size}; "
            f"call init_distributed before anything else creates the group")


def _init_deepspeed(backend: str, device: torch.device, timeout: timedelta) -> None:
    import deepspeed
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if device.type == "cpu" and name != "cpu":
        raise DistributedSetupError(
            f"the deepspeed launcher selected its {name!r} accelerator for a CPU run; "
            f"export DS_ACCELERATOR=cpu")
    if device.type == "cpu" and os.environ.get(DS_SHM_ENV, "").lower() not in _TRUE:
        # DeepSpeed JIT-compiles a shared-memory all-reduce op on the first CPU group (35-75 s);
        # DGNOpt reduces through torch.distributed, so skip it unless asked for.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=timeout)


def _attempt_store(launch: LaunchInfo, timeout: timedelta) -> dist.Store:
    """The rendezvous store at ``MASTER_ADDR:MASTER_PORT``, namespaced by torchrun's restart
    attempt.

    torchrun keeps its store alive across ``--max-restarts`` restarts; without a per-attempt
    prefix the restarted workers read the dead workers' gloo addresses from it and fail with
    "connectFullMesh failed ... Connection refused".
    """
    env = os.environ
    if launch.world_size == 1 and not env.get("MASTER_ADDR"):
        return dist.HashStore()  # a one-process group needs no rendezvous
    agent_hosts = env.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), launch.world_size,
                          is_master=launch.rank == 0 and not agent_hosts, timeout=timeout)
    attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0") or "0"
    return dist.PrefixStore(f"dgn_dist/attempt_{attempt}", store)


def init_distributed(backend: str = "auto", device: str = "auto",
                     timeout_s: float = 1800.0) -> DistContext:
    """Initialise the default process group once for the detected launcher.

    A second call with the same arguments returns the same context.

    Args:
        backend: ``"auto"`` (nccl on CUDA, gloo on CPU), ``"gloo"`` or ``"nccl"``.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        timeout_s: collective timeout; a rank that waits longer fails instead of hanging.

    Returns:
        The :class:`DistContext`; single-process (``backend=None``) without launcher
        variables.

    Raises:
        DistributedSetupError: incomplete launcher variables, a device/backend mismatch, the
            accelerate CPU pitfall (:func:`check_accelerate_cpu`), or a GPU count below the
            local world size.
    """
    global _CONTEXT
    launch = detect_launch()
    dev, be = resolve_device_backend(device, backend, launch.local_rank)
    if _CONTEXT is not None and _CONTEXT.launcher == "none" and launch.launcher != "none":
        _CONTEXT = None  # a single-process context inherited by a forked worker
    if _CONTEXT is not None:
        if _CONTEXT.device != dev or (_CONTEXT.backend not in (None, be)):
            raise DistributedSetupError(
                f"init_distributed was already called for {_CONTEXT.device}/{_CONTEXT.backend}; "
                f"call shutdown() first to switch to {dev}/{be}")
        return _CONTEXT
    check_accelerate_cpu(launch, dev)
    if dev.type == "cuda":
        if launch.local_rank >= torch.cuda.device_count():
            raise DistributedSetupError(
                f"local rank {launch.local_rank} has no GPU (this node has "
                f"{torch.cuda.device_count()}); start at most that many processes per node")
        torch.cuda.set_device(dev)
    if launch.launcher == "none":
        _CONTEXT = DistContext(0, 1, 0, dev, None, "none", True)
        return _CONTEXT
    timeout = timedelta(seconds=timeout_s)
    if dist.is_initialized():
        _check_existing_group(launch, be)
    elif launch.launcher == "deepspeed":
        _init_deepspeed(be, dev, timeout)
    else:
        dist.init_process_group(backend=be, store=_attempt_store(launch, timeout),
                                rank=launch.rank, world_size=launch.world_size, timeout=timeout,
                                device_id=dev if dev.type == "cuda" else None)
    if dist.is_initialized() and dist.get_world_size() > 1:
        # A rank can leave init_process_group while its peer is still connecting (gloo's
        # full-mesh handshake); if it then stops on a bad setting (ConfigError, the usual
        # case right after init), the peer fails with "connection closed by peer" instead of
        # that message. Once every rank has passed this barrier, every rank is connected.
        dist.barrier()
    _CONTEXT = DistContext(launch.rank, launch.world_size, launch.local_rank, dev, be,
                           launch.launcher, launch.rank == 0)
    return _CONTEXT


def get_context() -> DistContext | None:
    """The context of the last :func:`init_distributed`, or ``None``."""
    return _CONTEXT


def shutdown() -> None:
    """Destroy the default process group (if any) and forget the context; idempotent."""
    global _CONTEXT
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CONTEXT = None


def build_device_mesh(ctx: DistContext, dims: ParallelDims) -> Any:
    """The 2-D ``("pp", "dp")`` device mesh (``mesh["dp"].get_group()`` is the dp group).

    Raises:
        DistributedSetupError: the degrees do not match the context's world size.
    """
    if dims.world_size != ctx.world_size:
        raise DistributedSetupError(
            f"parallel degrees were checked for {dims.world_size} processes but the job has "
            f"{ctx.world_size}; build ParallelDims from the launched world size")
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(ctx.device.type, (dims.pp, dims.dp), mesh_dim_names=("pp", "dp"))


def verify_accelerator(ctx: DistContext, accelerator: Any) -> None:
    """Check that an ``accelerate.Accelerator`` shards over the same processes as ``ctx``.

    Raises:
        DistributedSetupError: the Accelerator runs unsharded (``DistributedType.NO``) or
            with another process count.
    """
    num = int(accelerator.num_processes)
    kind = str(accelerator.distributed_type)
    if num != ctx.world_size or (ctx.world_size > 1 and kind.endswith("NO")):
        raise DistributedSetupError(
            f"the Accelerator runs {num} process(es) ({kind}) but the launch has "
            f"{ctx.world_size}; for CPU runs export ACCELERATE_USE_CPU=true")
