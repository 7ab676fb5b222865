"""Data-parallel optimizers over a dp process group (DESIGN.md §4 "Data parallel").

* DGNOpt: :class:`DataParallelReducer` implements :class:`dgn_dist.dgnopt.reduction.Reducer`
  with :class:`~dgn_dist.distributed.reduce.Averager`: ``Q_θ`` is summed asynchronously while
  the factor pass runs, each stage's Kronecker statistics (``A`` averaged, ``G`` summed, as
  upper triangles), cross factors (``A_uv``, ``B_uv``) and EKFAC / Gauss-Newton diagonal
  sums travel in one bucketed all-reduce per stage, the rescale quadratics as one small
  vector per stage, and the weighted gradient ``Q_θx δX`` of the update pass once per stage.
  Eigendecompositions are spread over the replicas by cost
  (:class:`~dgn_dist.distributed.assignment.GreedyAssignment`, both factors of a player on
  one rank) and broadcast. With equal local batches dp replicas then train exactly like one
  process on the global batch (up to float rounding).
* Baselines: :func:`average_gradients_before_step` (SGD, RMSprop, Adam: gradient averaging
  in a step pre-hook, optional clipping) and :func:`average_ekfac_factors` (EKFAC: the batch
  factors and scalings averaged before they enter the EMA).

Everything here is a no-op for a group of one rank.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from dgn_dist.dgnopt.reduction import Pending, Reducer
from dgn_dist.distributed.assignment import GreedyAssignment, workers_per_player
from dgn_dist.distributed.reduce import (
    DEFAULT_BUCKET_BYTES,
    Averager,
    ByteCounter,
    ProcessGroup,
    broadcast_assigned,
    group_size,
    new_block_groups,
)
from dgn_dist.optim.kronecker import KroneckerFactor


class DataParallelReducer(Reducer):
    """DGNOpt's reductions over one dp group (module docstring).

    Args:
        group: the dp process group (``None`` = the default group).
        bucket_bytes: payload per all-reduce.
        grad_worker_fraction: fraction of the dp ranks that compute each player's
            eigendecompositions (KAISA): 1 = every rank computes everything, ``1/dp`` = each
            player on one rank, then broadcast.
        counter: byte counter (a fresh one when omitted).
        dp_groups: global ranks of EVERY dp group of the job (all ranks call this constructor
            with the same list; needed only for fractions strictly between ``1/dp`` and 1,
            where sub-groups are created collectively). Default: the one group ``group``.
    """

    def __init__(self, group: ProcessGroup = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 grad_worker_fraction: float = 1.0, counter: ByteCounter | None = None,
                 dp_groups: Sequence[Sequence[int]] | None = None) -> None:
        self.counter = counter if counter is not None else ByteCounter()
        self.averager = Averager(group, bucket_bytes, self.counter)
        self.group = group
        self.world = group_size(group)
        workers_per_player(grad_worker_fraction, self.world)  # validates the fraction
        self.fraction = grad_worker_fraction
        initialised = dist.is_available() and dist.is_initialized()
        self.dp_rank = dist.get_rank(group) if initialised else 0
        ranks = (dist.get_process_group_ranks(group) if group is not None
                 else list(range(dist.get_world_size()))) if initialised else [0]
        template = GreedyAssignment({}, self.world, grad_worker_fraction)
        self.block_size = template.block_size
        if self.block_size in (1, self.world):
            self.block_ranks: list[int] = list(ranks) if self.block_size > 1 else [ranks[0]]
            self.block_group: ProcessGroup = group
        else:
            self.block_ranks, self.block_group = new_block_groups(
                template, dp_groups if dp_groups is not None else [ranks])
        #: Factors (both eigendecompositions of a player) this rank computed / received.
        self.computed = 0
        self.received = 0

    def start(self, tensors: Sequence[Tensor], category: str,
              mean: bool | Sequence[bool] = False,
              symmetric: bool | Sequence[bool] = False) -> Pending:
        return self.averager.start(tensors, category, symmetric, mean)  # type: ignore[return-value]

    def agree(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        bad = torch.tensor([0.0 if flag else 1.0])
        dist.all_reduce(bad, group=self.group)
        return float(bad) == 0.0

    @contextmanager
    def refreshing(self, factors: Sequence[KroneckerFactor]) -> Iterator[None]:
        """Defer the eigendecompositions requested inside; on exit compute the assigned ones
        and broadcast them within the blocks of the assignment."""
        if self.block_size == 1 or not factors:
            yield
            return
        requested: dict[int, KroneckerFactor] = {}
        unique = list({id(f): f for f in factors}.values())
        for f in unique:
            f.refresh_eigenbasis = (  # type: ignore[method-assign]
                lambda f=f: requested.setdefault(id(f), f))  # type: ignore[misc,assignment]
        try:
            yield
        finally:
            for f in unique:
                del f.__dict__["refresh_eigenbasis"]
        self._refresh(list(requested.values()))

    def _refresh(self, factors: list[KroneckerFactor]) -> None:
        if not factors:
            return
        sizes: dict[str, list[int]] = {}
        for i, f in enumerate(factors):
            assert f.A is not None and f.G is not None
            sizes[str(i)] = [int(f.A.shape[0]), int(f.G.shape[0])]
        assignment = GreedyAssignment(sizes, self.world, self.fraction)
        results: dict[str, list[Tensor]] = {}
        for i, f in enumerate(factors):
            if assignment.computes(self.dp_rank, str(i)):
                f.refresh_eigenbasis()
                self.computed += 1
            else:
                _allocate_eigenbasis(f)
                self.received += 1
            results[str(i)] = _eigen_tensors(f)
        broadcast_assigned(results, assignment, self.dp_rank, self.block_ranks,
                           self.block_group, self.counter, "inverse")


def _allocate_eigenbasis(f: KroneckerFactor) -> None:
    """Placeholders a broadcast fills in (a rank that does not compute this factor)."""
    assert f.A is not None and f.G is not None
    na, ng = f.A.shape[0], f.G.shape[0]
    kw: dict[str, Any] = {"dtype": f.A.dtype, "device": f.A.device}
    f.eig_a, f.q_a = torch.empty(na, **kw), torch.empty(na, na, **kw)
    f.eig_g, f.q_g = torch.empty(ng, **kw), torch.empty(ng, ng, **kw)
    if f.mode == "ekfac":
        f.scaling = torch.empty(ng, na, **kw)


def _eigen_tensors(f: KroneckerFactor) -> list[Tensor]:
    out = [f.eig_a, f.q_a, f.eig_g, f.q_g] + ([f.scaling] if f.mode == "ekfac" else [])
    assert all(t is not None for t in out)
    return out  # type: ignore[return-value]


def attach_data_parallel(optimizer: Any, group: ProcessGroup = None, *,
                         bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                         grad_worker_fraction: float = 1.0, counter: ByteCounter | None = None,
                         dp_groups: Sequence[Sequence[int]] | None = None
                         ) -> DataParallelReducer:
    """Make a :class:`~dgn_dist.dgnopt.DGNOpt` reduce over ``group`` (see the module doc).

    Each replica must feed a local batch of ``B_global / dp`` examples, and the loss must be
    the mean over the local batch (the optimizer converts to the global convention).

    Returns:
        The reducer (its ``counter`` holds the bytes per category).
    """
    reducer = DataParallelReducer(group, bucket_bytes, grad_worker_fraction, counter, dp_groups)
    optimizer.reducer = reducer
    return reducer


def broadcast_parameters(module: nn.Module, group: ProcessGroup = None, src: int = 0) -> None:
    """Copy ``module``'s parameters and buffers from global rank ``src`` to the group (one
    flattened broadcast per dtype), so every replica starts from the same point."""
    if group_size(group) == 1:
        return
    tensors = [t for t in (*module.parameters(), *module.buffers())]
    with torch.no_grad():
        for dtype in sorted({t.dtype for t in tensors}, key=str):
            same = [t for t in tensors if t.dtype == dtype]
            flat = torch.cat([t.detach().reshape(-1) for t in same])
            dist.broadcast(flat, src=src, group=group)
            offset = 0
            for t in same:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def average_gradients_before_step(optimizer: Optimizer, group: ProcessGroup = None, *,
                                  bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                                  counter: ByteCounter | None = None,
                                  clip_norm: float = 0.0) -> Averager:
    """Average every parameter's ``.grad`` over ``group`` before each ``optimizer.step()``
    (a step pre-hook; bucketed all-reduces), then clip the global norm to ``clip_norm``
    when it is > 0. The loss must be the mean over the local batch."""
    averager = Averager(group, bucket_bytes, counter)

    def hook(opt: Optimizer, args: Any, kwargs: Any) -> None:
        del args, kwargs
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        averager.average(grads, "grad")
        if clip_norm > 0:
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, clip_norm)

    optimizer.register_step_pre_hook(hook)
    return averager


class _AveragedFactor(KroneckerFactor):
    """A :class:`KroneckerFactor` whose batch statistics are averaged over a dp group before
    they enter the EMA (EKFAC's factors are means over examples: the mean over replicas is
    the global-batch statistic)."""

    def __init__(self, mode: Any, averager: Averager) -> None:
        super().__init__(mode)
        self.averager = averager

    def update_stats(self, a_batch: Tensor, g_batch: Tensor, decay: float) -> None:
        a_batch, g_batch = a_batch.clone(), g_batch.clone()
        self.averager.average([a_batch, g_batch], "factor", symmetric=True)
        super().update_stats(a_batch, g_batch, decay)

    def update_scaling_stats(self, s_batch: Tensor, decay: float) -> None:
        s_batch = s_batch.clone()
        self.averager.average([s_batch], "factor")
        super().update_scaling_stats(s_batch, decay)


def average_ekfac_factors(optimizer: Any, group: ProcessGroup = None, *,
                          bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                          counter: ByteCounter | None = None) -> Averager:
    """Make an :class:`~dgn_dist.optim.EKFAC` average its Kronecker statistics and EKFAC
    scalings over ``group`` (combine with :func:`average_gradients_before_step`)."""
    averager = Averager(group, bucket_bytes, counter)
    for name, old in list(optimizer.factors.items()):
        new = _AveragedFactor(old.mode, averager)
        new.load_state_dict(old.state_dict())
        optimizer.factors[name] = new
    return averager
