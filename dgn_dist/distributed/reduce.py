"""Averaging over a dp process group, and broadcasts of assigned work (DESIGN.md §4).

* :class:`Averager` flattens tensors into buckets of ``bucket_bytes``, starts one
  asynchronous all-reduce per bucket and, on :meth:`PendingAverage.wait`, divides by the group
  size (per tensor: ``mean=False`` keeps the sum) and copies the results back into the
  tensors in place -- compute issued between
  ``start`` and ``wait`` overlaps the communication. Symmetric matrices (Kronecker factors)
  travel as their upper triangles (``n(n+1)/2`` numbers instead of ``n^2``).
* :func:`broadcast_assigned` sends each player's results from the rank that computed them
  (:mod:`dgn_dist.distributed.assignment`) to the other ranks of its block.
* :class:`ByteCounter` records the payload bytes handed to collectives per category
  (``grad``, ``factor``, ``cross``, ``inverse`` ...) for the benchmark. It counts the buffer
  size per rank and call; a ring all-reduce puts ``2 (W-1)/W`` times that on each link.

Without an initialised process group (or with a group of one rank) everything is a no-op.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from dgn_dist.distributed.assignment import GreedyAssignment

DEFAULT_BUCKET_BYTES = 4 * 2**20
ProcessGroup = Any  # torch.distributed.ProcessGroup; None = the default group


@dataclass
class ByteCounter:
    """Bytes handed to collectives by this rank, per category, and the number of calls."""

    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, category: str, nbytes: int) -> None:
        """Record one collective of ``nbytes`` under ``category``."""
        self.bytes[category] += nbytes
        self.calls[category] += 1

    @property
    def total(self) -> int:
        """Bytes over all categories."""
        return sum(self.bytes.values())

    def as_dict(self) -> dict[str, int]:
        """A plain ``{category: bytes}`` copy (for JSON / TensorBoard)."""
        return dict(self.bytes)

    def reset(self) -> None:
        """Forget everything counted so far."""
        self.bytes.clear()
        self.calls.clear()


def group_size(group: ProcessGroup = None) -> int:
    """Ranks in ``group``; 1 without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def triu_pack(mat: Tensor) -> Tensor:
    """The upper triangle (diagonal included) of a square matrix, row by row."""
    if mat.dim() != 2 or mat.shape[0] != mat.shape[1]:
        raise ValueError(f"symmetric packing needs a square matrix, got shape {tuple(mat.shape)}")
    n = mat.shape[0]
    rows, cols = torch.triu_indices(n, n, device=mat.device)
    return mat[rows, cols]


def triu_unpack(values: Tensor, n: int) -> Tensor:
    """The symmetric ``n x n`` matrix whose upper triangle is ``values`` (from
    :func:`triu_pack`)."""
    if values.numel() != n * (n + 1) // 2:
        raise ValueError(f"{values.numel()} values do not fill the upper triangle of a "
                         f"{n}x{n} matrix ({n * (n + 1) // 2} needed)")
    rows, cols = torch.triu_indices(n, n, device=values.device)
    out = values.new_empty(n, n)
    out[rows, cols] = values
    out[cols, rows] = values
    return out


def _packed(t: Tensor, symmetric: bool) -> Tensor:
    return triu_pack(t) if symmetric else t.reshape(-1)


def _packed_numel(t: Tensor, symmetric: bool) -> int:
    return t.shape[0] * (t.shape[0] + 1) // 2 if symmetric else t.numel()


def _restore(dst: Tensor, flat: Tensor, symmetric: bool) -> None:
    if symmetric:
        dst.copy_(triu_unpack(flat, dst.shape[0]))
    else:
        dst.copy_(flat.view_as(dst))


def make_buckets(tensors: Sequence[Tensor], bucket_bytes: int,
                 symmetric: Sequence[bool]) -> list[list[int]]:
    """Indices of ``tensors`` grouped into buckets of at most ``bucket_bytes`` payload.

    Tensors are kept in order; a bucket holds one dtype and device; a tensor larger than
    ``bucket_bytes`` gets a bucket of its own.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buckets: list[list[int]] = []
    size = 0
    key: tuple[torch.dtype, torch.device] | None = None
    for i, t in enumerate(tensors):
        nbytes = _packed_numel(t, symmetric[i]) * t.element_size()
        if not buckets or (t.dtype, t.device) != key or size + nbytes > bucket_bytes:
            buckets.append([])
            size, key = 0, (t.dtype, t.device)
        buckets[-1].append(i)
        size += nbytes
    return buckets


class PendingAverage:
    """All-reduces in flight; :meth:`wait` finishes them and writes the means back."""

    def __init__(self, works: list[Any], flats: list[Tensor], buckets: list[list[int]],
                 tensors: Sequence[Tensor], symmetric: Sequence[bool], world: int,
                 mean: Sequence[bool] | None = None) -> None:
        self._mean = [True] * len(tensors) if mean is None else list(mean)
        self._works = works
        self._flats = flats
        self._buckets = buckets
        self._tensors = tensors
        self._symmetric = symmetric
        self._world = world
        self.done = not works

    def wait(self) -> None:
        """Block until every bucket is reduced, then copy ``sum / W`` (``sum`` where
        ``mean=False``) into the tensors."""
        if self.done:
            return
        for work, flat, bucket in zip(self._works, self._flats, self._buckets, strict=True):
            work.wait()
            offset = 0
            for i in bucket:
                t, sym = self._tensors[i], self._symmetric[i]
                n = _packed_numel(t, sym)
                part = flat[offset:offset + n]
                _restore(t, part.div_(self._world) if self._mean[i] else part, sym)
                offset += n
        self.done = True


class Averager:
    """Bucketed, asynchronous averaging of tensor lists over one process group.

    Args:
        group: the process group (``None`` = default group).
        bucket_bytes: payload per all-reduce.
        counter: where to record bytes (a fresh :class:`ByteCounter` when omitted).
    """

    def __init__(self, group: ProcessGroup = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 counter: ByteCounter | None = None) -> None:
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        self.group = group
        self.bucket_bytes = bucket_bytes
        self.counter = counter if counter is not None else ByteCounter()

    def start(self, tensors: Sequence[Tensor], category: str,
              symmetric: bool | Sequence[bool] = False,
              mean: bool | Sequence[bool] = True) -> PendingAverage:
        """Start averaging (or summing) ``tensors`` in place; returns the handle to
        :meth:`PendingAverage.wait` on.

        Args:
            tensors: tensors with identical shapes and dtypes on every rank, in the same order.
            category: byte-counter category (``"grad"``, ``"factor"``, ``"cross"`` ...).
            symmetric: per tensor (or for all), whether it is a symmetric matrix to send as
                its upper triangle.
            mean: per tensor (or for all): the mean over the ranks (True) or the sum (False).
        """
        sym = [symmetric] * len(tensors) if isinstance(symmetric, bool) else list(symmetric)
        means = [mean] * len(tensors) if isinstance(mean, bool) else list(mean)
        if len(sym) != len(tensors) or len(means) != len(tensors):
            raise ValueError(f"symmetric has {len(sym)} and mean {len(means)} flags for "
                             f"{len(tensors)} tensors")
        world = group_size(self.group)
        if world == 1 or not tensors:
            return PendingAverage([], [], [], tensors, sym, 1)
        buckets = make_buckets(tensors, self.bucket_bytes, sym)
        works, flats = [], []
        for bucket in buckets:
            flat = torch.cat([_packed(tensors[i], sym[i]) for i in bucket])
            self.counter.add(category, flat.numel() * flat.element_size())
            works.append(dist.all_reduce(flat, group=self.group, async_op=True))
            flats.append(flat)
        return PendingAverage(works, flats, buckets, tensors, sym, world, means)

    def average(self, tensors: Sequence[Tensor], category: str,
                symmetric: bool | Sequence[bool] = False,
                mean: bool | Sequence[bool] = True) -> None:
        """Blocking :meth:`start` + :meth:`PendingAverage.wait`."""
        self.start(tensors, category, symmetric, mean).wait()


def broadcast_assigned(results: Mapping[str, Sequence[Tensor]], assignment: GreedyAssignment,
                       dp_rank: int, block_ranks: Sequence[int], group: ProcessGroup = None,
                       counter: ByteCounter | None = None, category: str = "inverse") -> None:
    """Send each player's results from its computing rank to the rest of its block, in place.

    Every rank passes tensors of the right shapes for *all* players (filled on the ranks
    that computed them, placeholders elsewhere). One flattened broadcast per source slot,
    all started asynchronously, then waited on.

    Args:
        results: player -> its result tensors (e.g. eigenbases and eigenvalues of A and G).
        assignment: the work assignment all ranks share.
        dp_rank: this rank's dp rank.
        block_ranks: global ranks of this rank's block, in dp order
            (``assignment.broadcast_group(dp_rank)`` mapped to global ranks).
        group: process group spanning exactly ``block_ranks`` (the dp group when the
            assignment has one block; ``None`` = default group).
        counter: optional byte counter.
        category: byte-counter category.
    """
    block = assignment.broadcast_group(dp_rank)
    if len(block) == 1:
        return
    if len(block_ranks) != len(block):
        raise ValueError(f"block_ranks has {len(block_ranks)} ranks but the assignment's block "
                         f"of dp rank {dp_rank} has {len(block)}")
    if missing := set(assignment.players) - set(results):
        raise ValueError(f"results lack players {sorted(missing)}; every rank passes "
                         f"tensors for all players")
    pending = []
    for slot, src_dp in enumerate(block):
        tensors = [t for p in assignment.players if assignment.slot[p] == slot
                   for t in results[p]]
        if not tensors:
            continue
        flat = torch.cat([t.reshape(-1) for t in tensors])
        if counter is not None:
            counter.add(category, flat.numel() * flat.element_size())
        work = dist.broadcast(flat, src=block_ranks[slot], group=group, async_op=True)
        if work is None:  # this rank is not in ``group``
            raise ValueError(f"rank {dist.get_rank()} is not in the broadcast group "
                             f"{list(block_ranks)}; pass the group new_block_groups returned")
        pending.append((work, flat, tensors, src_dp == dp_rank))
    for work, flat, tensors, is_src in pending:
        work.wait()
        if is_src:
            continue
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def new_block_groups(assignment: GreedyAssignment,
                     dp_groups: Sequence[Sequence[int]]) -> tuple[list[int], ProcessGroup]:
    """Create the broadcast process groups of every dp group; collective over all ranks.

    Every rank of the world must call this with the same ``dp_groups`` (e.g.
    ``ParallelDims.dp_groups()``): ``dist.new_group`` is collective.

    Returns:
        ``(block_ranks, group)`` for the calling rank: the global ranks of its block and the
        process group over them (``None`` when blocks are single ranks).
    """
    me = dist.get_rank()
    mine: tuple[list[int], ProcessGroup] = ([me], None)
    if assignment.block_size == 1:
        return mine
    for ranks in dp_groups:
        if len(ranks) != assignment.world_size:
            raise ValueError(f"dp group {list(ranks)} has {len(ranks)} ranks but the "
                             f"assignment was built for {assignment.world_size}")
        for block in assignment.blocks():
            globals_ = [ranks[d] for d in block]
            pg = dist.new_group(globals_)
            if me in globals_:
                mine = (globals_, pg)
    return mine
