"""What the trainer needs to run data parallel under any launcher (DESIGN.md §4).

:func:`setup_parallel` joins the launcher's process group (:func:`init_distributed`), checks
the degrees against the world size and the global batch, builds the ``("pp", "dp")`` mesh
when there is more than one rank, and reads the DeepSpeed JSON's precision and clipping.
:meth:`ParallelRun.attach` then makes an optimizer reduce over the dp group:

* ``dgnopt``: :func:`~dgn_dist.distributed.dgnopt_dp.attach_data_parallel` (``Q_θ``,
  Kronecker and cross factors, the update pass's weighted gradient; eigendecompositions
  spread by ``parallel.grad_worker_fraction``);
* ``ekfac``: gradient averaging plus averaged factors before the EMA;
* every other optimizer: gradient averaging in a step pre-hook (with clipping).

The data convention: ``data.batch_size`` is the GLOBAL batch of one optimizer step; dp rank
``d`` trains on slice ``d`` of every global batch (:class:`ShardedBatchSampler`), so dp
replicas see exactly the examples one process would see in one step. With dp > 1 an epoch's
last incomplete global batch is dropped (DGNOpt's averaged input factors need equal local
batches).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from dgn_dist.config import Config, ConfigError
from dgn_dist.distributed.dgnopt_dp import (
    attach_data_parallel,
    average_ekfac_factors,
    average_gradients_before_step,
    broadcast_parameters,
)
from dgn_dist.distributed.env import DistContext, init_distributed
from dgn_dist.distributed.reduce import ByteCounter, ProcessGroup
from dgn_dist.distributed.validate import DistributedSetupError, ParallelDims, check_parallel
from dgn_dist.sampler import ResumableSampler

_MIB = 1 << 20


@dataclass(frozen=True)
class DeepSpeedSettings:
    """The parts of a DeepSpeed JSON the run honours."""

    bf16: bool = False
    gradient_clipping: float = 0.0
    zero_stage: int = 0


def read_deepspeed_json(path: str) -> DeepSpeedSettings:
    """Precision, clipping and ZeRO stage of a DeepSpeed JSON (``parallel.deepspeed_config``).

    Raises:
        ConfigError: the file is missing or not JSON, asks for fp16 (use bf16), or names a
            ZeRO stage other than 0-3.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"parallel.deepspeed_config: no file '{path}' (the JSONs that ship "
                          f"are in configs/deepspeed/)")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"parallel.deepspeed_config: '{path}' is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"parallel.deepspeed_config: '{path}' must hold a JSON object")
    if bool(data.get("fp16", {}).get("enabled", False)):
        raise ConfigError(f"parallel.deepspeed_config: '{path}' enables fp16, which dgn_dist "
                          f"does not support (curvature needs the range); use bf16.enabled")
    stage = int(data.get("zero_optimization", {}).get("stage", 0))
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.deepspeed_config: zero_optimization.stage must be one of "
                          f"[0, 1, 2, 3], got {stage}")
    return DeepSpeedSettings(bf16=bool(data.get("bf16", {}).get("enabled", False)),
                             gradient_clipping=float(data.get("gradient_clipping", 0.0) or 0.0),
                             zero_stage=stage)


def autocast_dtype(cfg: Config, device: torch.device,
                   deepspeed: DeepSpeedSettings) -> torch.dtype | None:
    """``torch.bfloat16`` when the forward should run under bf16 autocast, else ``None``.

    ``parallel.precision = auto`` follows the launcher: ``accelerate launch
    --mixed_precision bf16`` or a DeepSpeed JSON with ``bf16.enabled``.
    """
    precision = cfg.parallel.precision
    if precision == "auto":
        asked = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower() == "bf16"
        precision = "bf16" if asked or deepspeed.bf16 else "fp32"
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("parallel.precision=bf16 but this GPU has no bfloat16 support; "
                              "use parallel.precision=fp32")
        return torch.bfloat16
    return None


class ShardedBatchSampler(Sampler[list[int]]):
    """Slice ``dp_rank`` of every global batch drawn from a :class:`ResumableSampler`.

    Args:
        sampler: the global, resumable data order (``set_epoch`` is called on it).
        global_batch: examples per optimizer step over all replicas.
        dp: data-parallel degree; ``global_batch`` must be divisible by it.
        dp_rank: this replica's index in ``[0, dp)``.

    With ``dp == 1`` the last incomplete batch is kept (ordinary single-process training);
    with ``dp > 1`` it is dropped.
    """

    def __init__(self, sampler: ResumableSampler, global_batch: int, dp: int,
                 dp_rank: int) -> None:
        if global_batch % dp:
            raise ValueError(f"global batch {global_batch} is not divisible by dp={dp}")
        if not 0 <= dp_rank < dp:
            raise ValueError(f"dp_rank must be in [0, {dp}), got {dp_rank}")
        self.sampler, self.global_batch, self.dp, self.dp_rank = sampler, global_batch, dp, dp_rank
        self.local = global_batch // dp

    def __iter__(self) -> Iterator[list[int]]:
        order = list(iter(self.sampler))
        for begin in range(0, len(order), self.global_batch):
            batch = order[begin:begin + self.global_batch]
            if len(batch) < self.global_batch and self.dp > 1:
                return
            yield batch[self.dp_rank * self.local:(self.dp_rank + 1) * self.local] \
                if self.dp > 1 else batch

    def __len__(self) -> int:
        return steps_per_epoch(len(self.sampler), self.global_batch, self.dp)


def steps_per_epoch(num_samples: int, global_batch: int, dp: int) -> int:
    """Optimizer steps per epoch (the last incomplete batch counts only when dp == 1)."""
    full, rest = divmod(num_samples, global_batch)
    return full + (1 if rest and dp == 1 else 0)


@dataclass
class ParallelRun:
    """This process's place in a (possibly single-process) training job.

    Attributes:
        ctx: the launcher context (rank, device, backend).
        dims: the checked pp x dp degrees.
        dp_group: the data-parallel process group (``None`` = default group or no group).
        dp_rank: this replica's index in the dp group.
        autocast: ``torch.bfloat16`` to run the forward under autocast, else ``None``.
        grad_clip: global gradient-norm clip (``parallel.grad_clip`` or the DeepSpeed JSON).
        counter: bytes all-reduced per category (``grad``, ``factor``, ``cross``, ...).
        mesh: the ``("pp", "dp")`` device mesh when the job has several ranks.
        shard_eval: evaluate on a 1/dp shard per replica and sum (the torch data path);
            False where every rank reads the whole split (FFCV).
    """

    ctx: DistContext
    dims: ParallelDims
    dp_group: ProcessGroup = None
    dp_rank: int = 0
    autocast: torch.dtype | None = None
    grad_clip: float = 0.0
    counter: ByteCounter = field(default_factory=ByteCounter)
    mesh: Any = None
    shard_eval: bool = True

    @property
    def dp(self) -> int:
        """Data-parallel degree."""
        return self.dims.dp

    @property
    def is_main(self) -> bool:
        """True on the one rank that logs and writes checkpoints."""
        return self.ctx.is_main

    def attach(self, cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Start every replica from rank 0's parameters and make ``optimizer`` reduce over
        the dp group (module docstring); sets the gradient clip."""
        if hasattr(optimizer, "grad_clip"):
            optimizer.grad_clip = self.grad_clip  # DGNOpt: scales the step by ‖Q_θ‖
        if not self.ctx.distributed:
            if self.grad_clip > 0 and not hasattr(optimizer, "grad_clip"):
                average_gradients_before_step(optimizer, None, counter=self.counter,
                                              clip_norm=self.grad_clip)
            return
        broadcast_parameters(model, self.dp_group, src=self.dims.rank_of(
            self.dims.coords(self.ctx.rank)[0], 0))
        bucket = max(int(cfg.parallel.bucket_mb * _MIB), 1024)
        if cfg.optim.name == "dgnopt":
            attach_data_parallel(optimizer, self.dp_group, bucket_bytes=bucket,
                                 grad_worker_fraction=cfg.parallel.grad_worker_fraction,
                                 counter=self.counter, dp_groups=self.dims.dp_groups())
            return
        average_gradients_before_step(optimizer, self.dp_group, bucket_bytes=bucket,
                                      counter=self.counter, clip_norm=self.grad_clip)
        if cfg.optim.name == "ekfac":
            average_ekfac_factors(optimizer, self.dp_group, bucket_bytes=bucket,
                                  counter=self.counter)

    def sum_over_dp(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over the dp replicas (identity for one replica)."""
        if self.dims.dp == 1 or not self.ctx.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.dp_group)
        return t.tolist()

    def agree_on(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a broadcast of a picklable object)."""
        if not self.ctx.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.ctx.distributed:
            dist.barrier()


def setup_parallel(cfg: Config) -> ParallelRun:
    """Join the launcher's process group and check the parallel settings (before data).

    Raises:
        DistributedSetupError: degrees vs world size, batch divisibility, device/backend
            mismatch, the accelerate CPU pitfall (each a :class:`ConfigError`).
        ConfigError: a bad DeepSpeed JSON.
    """
    deepspeed = (read_deepspeed_json(cfg.parallel.deepspeed_config)
                 if cfg.parallel.deepspeed_config else DeepSpeedSettings())
    ctx = init_distributed(cfg.parallel.backend, cfg.run.device, cfg.parallel.timeout_s)
    if cfg.parallel.pp > 1:  # degrees, micro-batches, mode, DGNOpt-only (before any data)
        from dgn_dist.pipeline.setup import check_pipeline

        dims = check_pipeline(cfg, ctx.world_size)
        if cfg.data.loader == "ffcv":  # FFCV shards over every rank, not per dp replica
            raise DistributedSetupError(
                f"data.loader='ffcv' with parallel.pp={dims.pp}: FFCV would give each "
                "pipeline rank a different shard; use data.loader='torch' for pipelined runs")
    else:
        dims = check_parallel(cfg.parallel.pp, cfg.parallel.dp, ctx.world_size,
                              global_batch=cfg.data.batch_size)
    clip = cfg.parallel.grad_clip or deepspeed.gradient_clipping
    run = ParallelRun(ctx, dims, autocast=autocast_dtype(cfg, ctx.device, deepspeed),
                      grad_clip=clip)
    if ctx.distributed:
        from dgn_dist.distributed.env import build_device_mesh

        run.mesh = build_device_mesh(ctx, dims)
        run.dp_group = run.mesh["dp"].get_group()
        run.dp_rank = dims.coords(ctx.rank)[1]
    return run


def elastic_restart_count() -> int:
    """How often torchrun restarted this job's workers (0 = first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
