"""Bucketed averaging, upper-triangle transport, byte counts and assigned broadcasts."""

from __future__ import annotations

import torch
import torch.distributed as dist
from dist_helper import run_distributed

from dgn_dist.distributed.assignment import GreedyAssignment
from dgn_dist.distributed.reduce import (
    Averager,
    ByteCounter,
    broadcast_assigned,
    make_buckets,
    new_block_groups,
    triu_pack,
    triu_unpack,
)
from dgn_dist.distributed.validate import ParallelDims

SHAPES = [(5, 5), (3, 4), (7,), (4, 4), (2, 3, 2)]
SYMMETRIC = [True, False, False, True, False]
DTYPES = [torch.float32, torch.float32, torch.float64, torch.float64, torch.float32]


def _rank_tensors(rank: int) -> list[torch.Tensor]:
    """Deterministic per-rank tensors; symmetric ones are SPD-like ``X X^T``."""
    gen = torch.Generator().manual_seed(100 + rank)
    out = []
    for shape, sym, dtype in zip(SHAPES, SYMMETRIC, DTYPES, strict=True):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        out.append((x @ x.T if sym else x).to(dtype))
    return out


def _expected_bytes() -> int:
    total = 0
    for shape, sym, dtype in zip(SHAPES, SYMMETRIC, DTYPES, strict=True):
        n = shape[0] * (shape[0] + 1) // 2 if sym else torch.Size(shape).numel()
        total += n * torch.empty((), dtype=dtype).element_size()
    return total


def test_triu_roundtrip_and_size() -> None:
    x = torch.randn(6, 6, dtype=torch.float64)
    s = x + x.T
    packed = triu_pack(s)
    assert packed.numel() == 21
    assert torch.equal(triu_unpack(packed, 6), s)


def test_buckets_respect_size_dtype_and_order() -> None:
    ts = [torch.zeros(10), torch.zeros(10), torch.zeros(10, dtype=torch.float64),
          torch.zeros(100), torch.zeros(4, 4)]
    # 40 B + 40 B fit 96; float64 starts a new bucket; 400 B alone; 4x4 symmetric = 40 B.
    assert make_buckets(ts, 96, [False, False, False, False, True]) == [[0, 1], [2], [3], [4]]
    assert make_buckets(ts[:2], 10**6, [False, False]) == [[0, 1]]


def test_single_process_is_a_no_op() -> None:
    counter = ByteCounter()
    x = torch.ones(3)
    pending = Averager(counter=counter).start([x], "grad")
    assert pending.done
    pending.wait()
    assert torch.equal(x, torch.ones(3)) and counter.total == 0


def _average_body(rank: int, world_size: int, bucket_bytes: int) -> tuple[float, dict[str, int],
                                                                             int]:
    tensors = _rank_tensors(rank)
    counter = ByteCounter()
    averager = Averager(bucket_bytes=bucket_bytes, counter=counter)
    pending = averager.start(tensors[:3], "factor", SYMMETRIC[:3])
    overlap = torch.randn(20, 20).matmul(torch.randn(20, 20)).sum()  # compute while in flight
    averager.average(tensors[3:], "grad", SYMMETRIC[3:])
    pending.wait()
    assert torch.isfinite(overlap)
    # Reference: dense float64 mean of every rank's tensors.
    err = 0.0
    for i, t in enumerate(tensors):
        ref = sum(_rank_tensors(r)[i].double() for r in range(world_size)) / world_size
        err = max(err, (t.double() - ref).abs().max().item())
        assert t.dtype == DTYPES[i] and t.shape == SHAPES[i]
        if SYMMETRIC[i]:
            assert torch.equal(t, t.T)
    return err, counter.as_dict(), sum(counter.calls.values())


def test_average_matches_dense_mean_and_counts_bytes() -> None:
    for bucket_bytes, calls in ((10**6, 4), (64, 5)):  # 2 dtype buckets per call / 1 per tensor
        out = run_distributed(_average_body, 2, bucket_bytes, timeout=30)
        for err, counted, ncalls in out:
            assert err < 1e-6
            assert sum(counted.values()) == _expected_bytes()
            assert set(counted) == {"factor", "grad"}
            assert ncalls == calls
    dense = sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size()
                for s, d in zip(SHAPES, DTYPES, strict=True))
    assert _expected_bytes() < dense  # upper triangles save bytes


def _results_for(players: list[str]) -> dict[str, list[torch.Tensor]]:
    """What the computing rank produces: eigendecompositions of fixed SPD matrices."""
    out = {}
    for k, p in enumerate(players):
        gen = torch.Generator().manual_seed(k)
        x = torch.randn(3 + k, 3 + k, generator=gen)
        evals, evecs = torch.linalg.eigh(x @ x.T)
        out[p] = [evecs, evals]
    return out


def _broadcast_body(rank: int, world_size: int, fraction: float) -> tuple[bool, int, list[str]]:
    sizes = {"a": [3], "b": [4], "c": [5], "d": [6]}
    assignment = GreedyAssignment(sizes, world_size, fraction)
    dims = ParallelDims(pp=1, dp=world_size, world_size=world_size)
    block_ranks, group = new_block_groups(assignment, dims.dp_groups())
    truth = _results_for(list(sizes))
    mine = assignment.players_of(rank)
    results = {p: [t.clone() if p in mine else torch.full_like(t, float("nan")) for t in ts]
               for p, ts in truth.items()}
    counter = ByteCounter()
    broadcast_assigned(results, assignment, rank, block_ranks, group, counter)
    ok = all(torch.equal(results[p][i], truth[p][i]) for p in sizes for i in range(2))
    dist.barrier()
    return ok, counter.total, mine


def test_broadcast_from_single_owner() -> None:
    out = run_distributed(_broadcast_body, 2, 0.5, timeout=30)
    assert all(ok for ok, _, _ in out)
    assert sorted(out[0][2] + out[1][2]) == ["a", "b", "c", "d"]  # each player on one rank
    floats = sum(n * n + n for n in (3, 4, 5, 6))
    assert out[0][1] == out[1][1] == 4 * floats


def test_broadcast_everyone_computes_is_silent() -> None:
    out = run_distributed(_broadcast_body, 2, 1.0, timeout=30)
    assert out == [(True, 0, ["a", "b", "c", "d"])] * 2


def test_broadcast_within_blocks_of_four_ranks() -> None:
    out = run_distributed(_broadcast_body, 4, 0.5, timeout=60)
    assert all(ok for ok, _, _ in out)
    assert out[0][2] == out[2][2] and out[1][2] == out[3][2]  # blocks (0, 1) and (2, 3)
    assert sorted(out[0][2] + out[1][2]) == ["a", "b", "c", "d"]
