"""Which dp rank computes which player's inverse / eigen work (KAISA, Pauloski et al. 2021).

Process-free: an assignment is a pure function of the factor sizes, the dp degree and the
``grad_worker_fraction`` knob, so every rank computes the same answer without talking and
the logic is unit-tested without processes. :mod:`dgn_dist.distributed.reduce` does the
broadcasts it prescribes.

Layout. With ``W`` dp ranks and ``g = fraction * W`` workers per player, the dp ranks form
``g`` contiguous *blocks* of ``B = W / g`` ranks; block ``j`` holds dp ranks
``j*B .. j*B + B - 1`` and its ``s``-th member is *slot* ``s``. Each player is assigned one
slot (greedy, largest cost first, onto the least loaded slot); the slot's rank in every block
computes the player's eigendecompositions and broadcasts them within its block.

* ``fraction = 1``   -> ``B = 1``: every rank inverts everything, nothing is broadcast.
* ``fraction = 1/W`` -> ``g = 1``: each player on exactly one rank, broadcast to all ``W``.

A player's factors (``A`` and ``G``) always stay on one rank.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence

CostFn = Callable[[int], float]


def cubic_cost(n: int) -> float:
    """Cost of an ``n x n`` symmetric eigendecomposition / inverse: ``n^3`` flops (up to a
    constant)."""
    return float(n) ** 3


def workers_per_player(fraction: float, world_size: int) -> int:
    """``g = max(1, round(fraction * world_size))``: ranks computing each player's work.

    Raises:
        ValueError: ``fraction`` outside ``(0, 1]`` or ``g`` does not divide ``world_size``
            (the message lists the fractions that do).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
        raise ValueError(f"grad_worker_fraction must be in (0, 1], got {fraction!r}")
    g = max(1, round(fraction * world_size))
    if world_size % g:
        valid = [f"{d}/{world_size}" for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(f"grad_worker_fraction={fraction} gives {g} workers per player, which "
                         f"does not divide the dp degree {world_size}; use one of {valid}")
    return g


class WorkAssignment(ABC):
    """Who computes each player's inverse/eigen work and who sends it to whom.

    Ranks are dp ranks ``0 .. world_size - 1`` of one dp group. Subclasses decide the
    placement; they share the cost model (:meth:`cost`) and the queries below.

    Args:
        factor_sizes: player name -> sizes of its Kronecker factors (e.g. ``[d_in + 1,
            d_out]``; an empty list for a player without eigen work).
        world_size: dp degree.
        cost_fn: cost of one ``n x n`` factor (default :func:`cubic_cost`).
    """

    def __init__(self, factor_sizes: Mapping[str, Sequence[int]], world_size: int,
                 cost_fn: CostFn = cubic_cost) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        for name, sizes in factor_sizes.items():
            if any((not isinstance(n, int)) or n < 1 for n in sizes):
                raise ValueError(f"factor sizes of player {name!r} must be positive integers, "
                                 f"got {list(sizes)}")
        self.factor_sizes = {name: tuple(sizes) for name, sizes in factor_sizes.items()}
        self.world_size = world_size
        self.cost_fn = cost_fn

    def cost(self, player: str) -> float:
        """Cost of a player's work: the sum of ``cost_fn(n)`` over its factors."""
        return sum(self.cost_fn(n) for n in self.factor_sizes[player])

    @property
    def players(self) -> list[str]:
        """Player names, in the order given."""
        return list(self.factor_sizes)

    @abstractmethod
    def workers(self, player: str) -> tuple[int, ...]:
        """dp ranks that compute ``player``'s work (ascending)."""

    @abstractmethod
    def broadcast_group(self, rank: int) -> tuple[int, ...]:
        """dp ranks that exchange results with ``rank`` (its block, ascending; ``(rank,)``
        when nothing is broadcast)."""

    def computes(self, rank: int, player: str) -> bool:
        """True when ``rank`` computes ``player``'s work itself."""
        return rank in self.workers(player)

    def source(self, rank: int, player: str) -> int:
        """The dp rank ``rank`` gets ``player``'s results from (itself when it computes)."""
        group = self.broadcast_group(rank)
        (src,) = [w for w in self.workers(player) if w in group]
        return src

    def players_of(self, rank: int) -> list[str]:
        """Players whose work ``rank`` computes, in player order."""
        return [p for p in self.factor_sizes if self.computes(rank, p)]

    def load(self, rank: int) -> float:
        """Total cost computed by ``rank``."""
        return sum(self.cost(p) for p in self.players_of(rank))

    def imbalance(self) -> float:
        """``max load / mean load`` over ranks (1.0 = perfect balance; 1.0 with no work)."""
        loads = [self.load(r) for r in range(self.world_size)]
        mean = sum(loads) / len(loads)
        return max(loads) / mean if mean > 0 else 1.0

    @property
    def broadcasts(self) -> bool:
        """True when results travel between ranks at all."""
        return any(len(self.broadcast_group(r)) > 1 for r in range(self.world_size))


class GreedyAssignment(WorkAssignment):
    """KAISA-style placement: largest cost first onto the least loaded slot.

    Deterministic: ties in cost keep the given player order, ties in load go to the lowest
    slot, so every rank derives the same assignment from the same inputs.

    Args:
        factor_sizes: player name -> sizes of its factors.
        world_size: dp degree ``W``.
        grad_worker_fraction: fraction of the dp ranks computing each player's work, one of
            ``d / W`` for ``d`` dividing ``W``; 1 = every rank computes everything (no
            broadcast), ``1 / W`` = each player on one rank (then broadcast).
        cost_fn: cost of one ``n x n`` factor.
    """

    def __init__(self, factor_sizes: Mapping[str, Sequence[int]], world_size: int,
                 grad_worker_fraction: float = 1.0, cost_fn: CostFn = cubic_cost) -> None:
        super().__init__(factor_sizes, world_size, cost_fn)
        self.grad_worker_fraction = grad_worker_fraction
        self.num_blocks = workers_per_player(grad_worker_fraction, world_size)
        self.block_size = world_size // self.num_blocks
        order = sorted(range(len(self.factor_sizes)), key=lambda i: -self.cost(self.players[i]))
        slot_load = [0.0] * self.block_size
        self.slot: dict[str, int] = {}
        for i in order:
            player = self.players[i]
            s = min(range(self.block_size), key=lambda k: (slot_load[k], k))
            self.slot[player] = s
            slot_load[s] += self.cost(player)
        self.slot = {p: self.slot[p] for p in self.players}  # player order

    def workers(self, player: str) -> tuple[int, ...]:
        s = self.slot[player]
        return tuple(j * self.block_size + s for j in range(self.num_blocks))

    def broadcast_group(self, rank: int) -> tuple[int, ...]:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        start = (rank // self.block_size) * self.block_size
        return tuple(range(start, start + self.block_size))

    def blocks(self) -> list[tuple[int, ...]]:
        """All broadcast groups (blocks) of dp ranks, in order."""
        return [self.broadcast_group(j * self.block_size) for j in range(self.num_blocks)]
