"""The distributed test helper itself: results, raised errors, crashes and hangs."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
from dist_helper import DistributedTestError, run_distributed


def _all_reduce_sum(rank: int, world_size: int, n: int) -> list[float]:
    x = torch.full((n,), float(rank + 1))
    dist.all_reduce(x)
    return x.tolist() + [float(torch.get_num_threads()), float(os.environ["OMP_NUM_THREADS"])]


def _raise_on_rank1(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("rank one is broken on purpose")
    return rank


def _hang_on_rank1(rank: int, world_size: int) -> int:
    if rank == 1:
        time.sleep(600)
    return rank


def _raise_while_peer_sleeps(rank: int, world_size: int) -> None:
    if rank == 1:
        raise RuntimeError("failed while rank 0 sleeps")
    time.sleep(600)


def _exit_on_rank0(rank: int, world_size: int) -> int:
    if rank == 0:
        os._exit(3)
    return rank


def _env_only(rank: int, world_size: int) -> tuple[bool, str, str, str]:
    return (dist.is_initialized(), os.environ["RANK"], os.environ["WORLD_SIZE"],
            os.environ["EXTRA_VAR"])


def test_results_come_back_in_rank_order_with_one_thread() -> None:
    out = run_distributed(_all_reduce_sum, 2, 3)
    assert out == [[3.0, 3.0, 3.0, 1.0, 1.0]] * 2


def test_raising_rank_fails_with_its_traceback() -> None:
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_raise_on_rank1, 2, timeout=20)
    msg = str(info.value)
    assert "ranks failed ([1])" in msg
    assert "ValueError: rank one is broken on purpose" in msg
    assert "--- rank 1 ---" in msg and "--- rank 0 ---" not in msg


def test_hanging_rank_is_killed_and_named() -> None:
    start = time.monotonic()
    with pytest.raises(DistributedTestError, match=r"ranks \[1\] of 2 hung") as info:
        run_distributed(_hang_on_rank1, 2, timeout=1.5)
    assert "finished: [0]" in str(info.value)
    assert time.monotonic() - start < 15


def test_busy_peer_is_killed_shortly_after_a_failure() -> None:
    start = time.monotonic()
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_raise_while_peer_sleeps, 2, timeout=60)
    msg = str(info.value)
    assert "2 of 2 ranks failed" in msg
    assert "RuntimeError: failed while rank 0 sleeps" in msg
    assert "--- rank 0 ---\nstill running after another rank failed" in msg
    assert time.monotonic() - start < 20


def test_silent_exit_is_a_failure() -> None:
    with pytest.raises(DistributedTestError, match="exited with status 3"):
        run_distributed(_exit_on_rank0, 2, timeout=20)


def test_init_false_sets_launcher_variables_only() -> None:
    out = run_distributed(_env_only, 2, init=False, env={"EXTRA_VAR": "x"})
    assert out == [(False, "0", "2", "x"), (False, "1", "2", "x")]
