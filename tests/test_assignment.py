"""KAISA-style work assignment, tested without processes."""

from __future__ import annotations

import itertools

import pytest

from dgn_dist.distributed.assignment import (
    GreedyAssignment,
    WorkAssignment,
    cubic_cost,
    workers_per_player,
)

SIZES = {"conv1": [28, 8], "conv2": [73, 8], "conv3": [73, 8], "fc1": [513, 64],
         "fc2": [65, 10], "bn": []}


def _best_makespan(costs: list[float], bins: int) -> float:
    best = float("inf")
    for placement in itertools.product(range(bins), repeat=len(costs)):
        loads = [0.0] * bins
        for c, b in zip(costs, placement, strict=True):
            loads[b] += c
        best = min(best, max(loads))
    return best


def test_cost_is_cubic_and_players_keep_both_factors() -> None:
    a = GreedyAssignment(SIZES, 2, grad_worker_fraction=0.5)
    assert cubic_cost(5) == 125.0
    assert a.cost("fc1") == 513.0**3 + 64.0**3
    assert a.cost("bn") == 0.0
    for p in SIZES:  # one worker per player, it holds A and G
        assert len(a.workers(p)) == 1


def test_one_rank_per_player_balances_like_lpt() -> None:
    sizes = {f"p{i}": [n] for i, n in enumerate([10, 9, 8, 7, 6, 5, 4])}
    a = GreedyAssignment(sizes, 3, grad_worker_fraction=1 / 3)
    costs = [a.cost(p) for p in sizes]
    makespan = max(a.load(r) for r in range(3))
    # Greedy largest-first (LPT) is within 4/3 of the optimum (Graham 1969).
    assert makespan <= 4 / 3 * _best_makespan(costs, 3)
    assert sum(a.load(r) for r in range(3)) == pytest.approx(sum(costs))
    assert a.slot["p0"] == 0 and a.slot["p1"] == 1 and a.slot["p2"] == 2  # largest first
    assert a.imbalance() < 1.2


def test_fraction_one_means_everyone_computes_everything() -> None:
    a = GreedyAssignment(SIZES, 4, grad_worker_fraction=1.0)
    assert not a.broadcasts
    for r in range(4):
        assert a.players_of(r) == list(SIZES)
        assert a.broadcast_group(r) == (r,)
        assert all(a.source(r, p) == r for p in SIZES)


def test_minimal_fraction_puts_each_player_on_one_rank_then_broadcasts() -> None:
    a = GreedyAssignment(SIZES, 4, grad_worker_fraction=0.25)
    assert a.broadcasts
    assert a.blocks() == [(0, 1, 2, 3)]
    owners = [a.workers(p) for p in SIZES]
    assert all(len(w) == 1 for w in owners)
    assert sorted(p for r in range(4) for p in a.players_of(r)) == sorted(SIZES)
    assert all(a.source(r, "fc1") == a.workers("fc1")[0] for r in range(4))
    assert a.players_of(a.workers("fc1")[0]) == ["fc1"]  # the dominant factor alone


def test_intermediate_fraction_replicates_over_blocks() -> None:
    a = GreedyAssignment(SIZES, 4, grad_worker_fraction=0.5)
    assert a.blocks() == [(0, 1), (2, 3)]
    for p in SIZES:
        w = a.workers(p)
        assert len(w) == 2 and w[1] - w[0] == 2  # one worker in each block
        assert {a.source(0, p), a.source(1, p)} == {w[0]}
        assert {a.source(2, p), a.source(3, p)} == {w[1]}
    assert a.players_of(0) == a.players_of(2) and a.players_of(1) == a.players_of(3)


def test_deterministic_and_ties_keep_order() -> None:
    sizes = {"a": [4], "b": [4], "c": [4], "d": [4]}
    a1 = GreedyAssignment(sizes, 2, 0.5)
    a2 = GreedyAssignment(dict(sizes), 2, 0.5)
    assert a1.slot == a2.slot == {"a": 0, "b": 1, "c": 0, "d": 1}


def test_edge_cases() -> None:
    assert GreedyAssignment({}, 2, 0.5).imbalance() == 1.0
    one = GreedyAssignment(SIZES, 1, 0.3)  # any fraction works with one rank
    assert one.players_of(0) == list(SIZES) and not one.broadcasts
    few = GreedyAssignment({"x": [3]}, 4, 0.25)  # more ranks than players
    assert [few.load(r) for r in range(4)] == [27.0, 0.0, 0.0, 0.0]
    assert few.imbalance() == 4.0
    with pytest.raises(ValueError, match="factor sizes of player 'x' must be positive"):
        GreedyAssignment({"x": [0]}, 2)
    with pytest.raises(ValueError, match="rank must be in"):
        few.broadcast_group(4)


@pytest.mark.parametrize(("fraction", "world", "expected"), [
    (1.0, 4, 4), (0.5, 4, 2), (0.25, 4, 1), (0.3, 4, 1), (0.01, 8, 1), (1 / 3, 3, 1)])
def test_workers_per_player(fraction: float, world: int, expected: int) -> None:
    assert workers_per_player(fraction, world) == expected


@pytest.mark.parametrize(("fraction", "world", "needle"), [
    (0.0, 4, r"must be in \(0, 1\], got 0.0"),
    (1.5, 4, r"must be in \(0, 1\], got 1.5"),
    (0.5, 3, r"gives 2 workers per player, which does not divide the dp degree 3; "
             r"use one of \['1/3', '3/3'\]"),
])
def test_workers_per_player_errors(fraction: float, world: int, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        workers_per_player(fraction, world)


def test_custom_cost_function_and_abstract_base() -> None:
    sizes = {"p": [10], "q": [6, 6], "r": [5]}
    linear = GreedyAssignment(sizes, 2, 0.5, cost_fn=float)  # q (12) first, then p (10)
    assert linear.slot == {"p": 1, "q": 0, "r": 1}
    cubic = GreedyAssignment(sizes, 2, 0.5)  # p (1000) first, then q (432)
    assert cubic.slot == {"p": 0, "q": 1, "r": 1}
    with pytest.raises(TypeError, match="abstract"):
        WorkAssignment({}, 1)  # type: ignore[abstract]
