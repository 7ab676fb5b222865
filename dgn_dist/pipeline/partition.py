"""Partition of a game's stages over the pipeline ranks (DESIGN.md §4 "Pipeline parallel").

A partition is a list of ``pp`` contiguous, non-empty stage ranges covering ``0 … T-1``.
Three ways to choose it (``parallel.partition``):

* ``"uniform"``: stage counts as equal as possible (the first ``T mod pp`` ranks get one
  more stage);
* ``"params"``: balance the trainable-parameter count -- the split minimising the largest
  per-rank count (exact, by dynamic programming over the prefix sums);
* ``"a,b,c"``: explicit stage counts per rank (must sum to ``T``).

Whatever the split, the boundary carries the whole state tuple ``x_t`` of the stage where it
falls: one tensor between plain stages, the pair ``(h, s)`` when it falls inside a residual
block (the skip path ``s`` then crosses the ranks).
"""

from __future__ import annotations

from collections.abc import Sequence

from dgn_dist.distributed.validate import DistributedSetupError
from dgn_dist.game.core import Game

PARTITIONS = ("uniform", "params", "<comma list of stage counts>")


def stage_param_counts(game: Game) -> list[int]:
    """Trainable parameters of each stage's players (a module counted once)."""
    counts = []
    for stage in game.stage_list():
        seen: set[int] = set()
        total = 0
        for p in (q for pl in stage.players for q in pl.parameters()):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        counts.append(total)
    return counts


def _ranges(counts: Sequence[int]) -> list[range]:
    out, start = [], 0
    for c in counts:
        out.append(range(start, start + c))
        start += c
    return out


def uniform_counts(num_stages: int, pp: int) -> list[int]:
    """Stage counts per rank, as equal as possible (earlier ranks get the remainder)."""
    base, extra = divmod(num_stages, pp)
    return [base + (1 if i < extra else 0) for i in range(pp)]


def balanced_counts(weights: Sequence[int], pp: int) -> list[int]:
    """Stage counts per rank minimising the largest sum of ``weights`` on one rank.

    Ties are broken towards the uniform split (earlier ranks slightly larger). Every rank
    gets at least one stage.
    """
    n = len(weights)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + max(int(w), 0))
    inf = float("inf")
    # best[k][i]: minimal max-load splitting the first i stages over k ranks.
    best = [[inf] * (n + 1) for _ in range(pp + 1)]
    cut = [[0] * (n + 1) for _ in range(pp + 1)]
    best[0][0] = 0.0
    for k in range(1, pp + 1):
        for i in range(k, n - (pp - k) + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], float(prefix[i] - prefix[j]))
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    counts, i = [], n
    for k in range(pp, 0, -1):
        j = cut[k][i]
        counts.append(i - j)
        i = j
    return counts[::-1]


def partition_stages(game: Game, pp: int, spec: str = "uniform") -> list[range]:
    """Split the game's stages into ``pp`` contiguous ranges.

    Args:
        game: the game (its stages and players).
        pp: pipeline degree.
        spec: ``"uniform"``, ``"params"`` or a comma list of per-rank stage counts.

    Returns:
        One ``range`` of stage indices per pipeline rank.

    Raises:
        DistributedSetupError: ``pp`` exceeds the number of stages, or ``spec`` is not one of
            the forms above (the message lists the stages and what would fit).
    """
    num = len(game.stages)
    if not isinstance(pp, int) or pp < 1:
        raise DistributedSetupError(f"parallel.pp must be a positive integer, got {pp!r}")
    if pp > num:
        raise DistributedSetupError(
            f"parallel.pp={pp} exceeds the game's {num} stages (each pipeline rank needs at "
            f"least one); use parallel.pp <= {num} and a larger parallel.dp")
    text = spec.strip().lower() if isinstance(spec, str) else ""
    if text == "uniform":
        return _ranges(uniform_counts(num, pp))
    if text == "params":
        return _ranges(balanced_counts(stage_param_counts(game), pp))
    parts = [p.strip() for p in text.split(",")] if text else []
    if not parts or not all(p.isdigit() for p in parts):
        raise DistributedSetupError(
            f"parallel.partition must be 'uniform', 'params' or a comma list of stage counts "
            f"per pipeline rank (e.g. '{','.join(map(str, uniform_counts(num, pp)))}'); got "
            f"{spec!r}")
    counts = [int(p) for p in parts]
    if len(counts) != pp or sum(counts) != num or min(counts) < 1:
        raise DistributedSetupError(
            f"parallel.partition={spec!r} must list {pp} positive stage counts (one per "
            f"pipeline rank) summing to the game's {num} stages; e.g. "
            f"'{','.join(map(str, uniform_counts(num, pp)))}'")
    return _ranges(counts)


def describe_partition(game: Game, ranges: Sequence[range]) -> str:
    """One line per pipeline rank: its stages and parameter count."""
    counts = stage_param_counts(game)
    names = [s.name for s in game.stage_list()]
    return "\n".join(
        f"pp rank {i}: stages {r.start}..{r.stop - 1} ({', '.join(names[t] for t in r)}), "
        f"{sum(counts[t] for t in r)} parameters" for i, r in enumerate(ranges))
