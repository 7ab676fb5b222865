"""Parallel degrees checked against the world size, the stages and the batch (DESIGN.md §4).

Pure Python (no torch): :class:`ParallelDims` is built and checked before any process group
exists, so a wrong ``parallel.pp`` / ``parallel.dp`` or an indivisible batch is reported in a
fraction of a second, never as a hang.

Rank layout of the 2-D mesh ``("pp", "dp")`` (row-major, as ``init_device_mesh``)::

    rank = pp_rank * dp + dp_rank

so the ranks of one dp group are contiguous and one pp group strides by ``dp``.
"""

from __future__ import annotations

from dataclasses import dataclass

from dgn_dist.config.loader import ConfigError


class DistributedSetupError(ConfigError):
    """A launch or parallel setting the user must change (degrees, batch, backend, launcher).

    A :class:`~dgn_dist.config.ConfigError` (hence a ``ValueError``), so ``dgn-train`` prints
    it as ``error: ...`` and exits with status 2.
    """


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DistributedSetupError(f"{name} must be a positive integer, got {value!r}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class ParallelDims:
    """Pipeline (``pp``) and data (``dp``) parallel degrees of a launch.

    Args:
        pp: pipeline-parallel degree (number of stage shards), >= 1.
        dp: data-parallel degree; 0 means ``world_size // pp``.
        world_size: number of processes the launcher started.

    Raises:
        DistributedSetupError: a degree is not positive, ``pp`` does not divide the world
            size (with ``dp=0``), or ``pp * dp != world_size``; the message lists the
            degrees that would fit.
    """

    pp: int
    dp: int
    world_size: int

    def __post_init__(self) -> None:
        _check_positive("world_size", self.world_size)
        _check_positive("parallel.pp", self.pp)
        if not isinstance(self.dp, int) or isinstance(self.dp, bool) or self.dp < 0:
            raise DistributedSetupError(
                f"parallel.dp must be 0 (= world size / pp) or a positive integer, got {self.dp!r}")
        fits = _divisors(self.world_size)
        if self.dp == 0:
            if self.world_size % self.pp:
                raise DistributedSetupError(
                    f"parallel.pp={self.pp} does not divide the world size {self.world_size}; "
                    f"use parallel.pp in {fits} or launch a multiple of {self.pp} processes")
            self.dp = self.world_size // self.pp
        if self.pp * self.dp != self.world_size:
            raise DistributedSetupError(
                f"parallel.pp * parallel.dp = {self.pp} * {self.dp} = {self.pp * self.dp} but "
                f"the launcher started {self.world_size} processes; set parallel.dp=0 (derived "
                f"from the world size) or launch {self.pp * self.dp} processes "
                f"(pp must divide the world size: one of {fits})")

    @property
    def pp_enabled(self) -> bool:
        """True when the model is split over more than one pipeline rank."""
        return self.pp > 1

    @property
    def dp_enabled(self) -> bool:
        """True when there is more than one data-parallel replica."""
        return self.dp > 1

    def check_stages(self, num_stages: int) -> None:
        """Every pipeline rank needs at least one stage of the game.

        Raises:
            DistributedSetupError: ``pp`` exceeds the number of stages.
        """
        _check_positive("num_stages", num_stages)
        if self.pp > num_stages:
            raise DistributedSetupError(
                f"parallel.pp={self.pp} exceeds the model's {num_stages} stages (each pipeline "
                f"rank needs at least one); use parallel.pp <= {num_stages} and a larger dp")

    def local_batch(self, global_batch: int, micro_batches: int = 1) -> int:
        """Examples per dp replica and step; checks that the batch splits evenly.

        Args:
            global_batch: examples per optimizer step over all replicas.
            micro_batches: micro-batches per replica and step (pipeline schedule).

        Returns:
            ``global_batch // dp``.

        Raises:
            DistributedSetupError: the global batch is not divisible by ``dp``, or the
                per-replica batch is not divisible by ``micro_batches``.
        """
        _check_positive("global batch size", global_batch)
        _check_positive("micro_batches", micro_batches)
        if global_batch % self.dp:
            lo = global_batch - global_batch % self.dp
            raise DistributedSetupError(
                f"global batch {global_batch} is not divisible by the data-parallel degree "
                f"dp={self.dp}; use a batch size that is a multiple of {self.dp} (e.g. {lo} "
                f"or {lo + self.dp}) or launch a number of replicas that divides it")
        local = global_batch // self.dp
        if local % micro_batches:
            raise DistributedSetupError(
                f"per-replica batch {local} (= {global_batch} / dp={self.dp}) is not divisible "
                f"by micro_batches={micro_batches}; use micro_batches in {_divisors(local)} or "
                f"a global batch that is a multiple of {self.dp * micro_batches}")
        return local

    def coords(self, rank: int) -> tuple[int, int]:
        """``(pp_rank, dp_rank)`` of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        return divmod(rank, self.dp)

    def rank_of(self, pp_rank: int, dp_rank: int) -> int:
        """Global rank at mesh coordinates ``(pp_rank, dp_rank)``."""
        if not (0 <= pp_rank < self.pp and 0 <= dp_rank < self.dp):
            raise ValueError(f"coordinates ({pp_rank}, {dp_rank}) outside the "
                             f"({self.pp}, {self.dp}) mesh")
        return pp_rank * self.dp + dp_rank

    def dp_groups(self) -> list[list[int]]:
        """Global ranks of each dp group (one per pipeline rank), in dp-rank order."""
        return [[self.rank_of(p, d) for d in range(self.dp)] for p in range(self.pp)]

    def pp_groups(self) -> list[list[int]]:
        """Global ranks of each pipeline (one per dp replica), in pp-rank order."""
        return [[self.rank_of(p, d) for p in range(self.pp)] for d in range(self.dp)]


def check_parallel(pp: int, dp: int, world_size: int, *, num_stages: int | None = None,
                   global_batch: int | None = None, micro_batches: int = 1) -> ParallelDims:
    """All launch-time checks at once (call before building the mesh or loading data).

    Args:
        pp: ``parallel.pp``.
        dp: ``parallel.dp`` (0 = derived).
        world_size: processes started by the launcher.
        num_stages: stages of the game, when known.
        global_batch: examples per step over all replicas, when known.
        micro_batches: micro-batches per replica and step.

    Returns:
        The checked :class:`ParallelDims` (with ``dp`` resolved).
    """
    dims = ParallelDims(pp=pp, dp=dp, world_size=world_size)
    if num_stages is not None:
        dims.check_stages(num_stages)
    if global_batch is not None:
        dims.local_batch(global_batch, micro_batches)
    return dims
