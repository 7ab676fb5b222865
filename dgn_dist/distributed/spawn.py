"""Run a benchmark function on ``world`` fresh gloo processes and collect a result per rank.

Shared by ``dgn-bench dp`` (:mod:`dgn_dist.distributed.bench`) and ``dgn-bench pipeline``
(:mod:`dgn_dist.pipeline.bench`): a free port on 127.0.0.1, ``world`` spawned processes with
the launcher variables (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``) set, every
rank's result through a queue under a deadline, and a teardown that cannot lose a result: a
worker reports first, then waits at a barrier for its peers (nobody destroys the group while
a peer is still in a collective) and destroys its process group. A rank that exits non-zero
in that teardown, after it has reported, is a warning, not a failure.

The parent imports no torch; the children import it when the target does.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

#: ``target(rank, world, port, payload) -> result``, run in every worker.
Target = Callable[[int, int, int, Any], Any]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rendezvous_env(rank: int, world: int, port: int) -> dict[str, str]:
    """The ``env://`` variables of ``rank`` in a ``world``-process group on ``port``."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
            "WORLD_SIZE": str(world)}


def close_group() -> None:
    """Barrier, then destroy the default process group (no-op when none is initialised)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # nobody tears the group down while a peer is still in a collective
        dist.destroy_process_group()


def _worker(target: Target, rank: int, world: int, port: int, payload: Any, out: Any) -> None:
    os.environ.update(rendezvous_env(rank, world, port))
    try:
        result = target(rank, world, port, payload)
    except BaseException as err:  # noqa: BLE001 - reported by the parent
        out.put((rank, False, f"{type(err).__name__}: {err}"))
        return
    out.put((rank, True, result))
    close_group()


def _start(procs: list[Any], env: Mapping[str, str]) -> None:
    """Start ``procs`` with ``env`` added to the environment they inherit (the parent's own
    environment is restored afterwards)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for p in procs:
            p.start()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_workers(target: Target, world: int, payload: Any, *, timeout: float,
                env: Mapping[str, str] | None = None, join_s: float = 5.0) -> list[Any]:
    """Run ``target(rank, world, port, payload)`` on ``world`` spawned processes.

    Args:
        target: a module-level function (pickled by reference). It runs with the launcher
            variables set and initialises a gloo group itself when it needs one (``env://``,
            or ``tcp://127.0.0.1:{port}``); its return value must pickle. A group it leaves
            initialised is closed by :func:`close_group` after the result is sent.
        world: number of processes (``>= 1``).
        payload: the target's last argument (picklable).
        timeout: seconds to wait for every rank's result.
        env: variables the children start with, e.g. ``OMP_NUM_THREADS`` (read when torch is
            imported, so it cannot be set inside the target).
        join_s: seconds a worker may take to exit after reporting before it is killed.

    Returns:
        The targets' results, ordered by rank.

    Raises:
        ValueError: ``world < 1``.
        RuntimeError: a rank raised (``rank r: Type: message``), died without reporting or did
            not report within ``timeout``.
    """
    if world < 1:
        raise ValueError(f"world must be >= 1 process; got {world}")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(target, r, world, port, payload, out)) for r in range(world)]
    _start(procs, env or {})
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    dead: list[int] = []
    try:
        while len(results) < world and not errors and time.monotonic() < deadline:
            try:
                rank, ok, value = out.get(timeout=2.0)
            except queue.Empty:
                gone = [r for r, p in enumerate(procs) if r not in results and
                        p.exitcode is not None]
                if gone and gone == dead:
                    break  # exited a whole poll ago and nothing came (import error, signal)
                dead = gone
                continue
            if ok:
                results[rank] = value
            else:
                errors[rank] = value
    finally:
        for p in procs:
            p.join(join_s)
            if p.is_alive():
                p.kill()
                p.join()
    codes = [p.exitcode for p in procs]
    if errors or len(results) < world:
        missing = [r for r in range(world) if r not in results and r not in errors]
        raise RuntimeError("; ".join(f"rank {r}: {errors[r]}" for r in sorted(errors)) or
                           f"ranks {missing} did not report (a rank died, or no result "
                           f"within {timeout:.0f} s); exit codes {codes}, -9: killed here")
    if any(codes):  # every rank has reported: the teardown failed, not the measurement
        print(f"warning: a benchmark rank exited with {codes} while shutting down, after "
              "reporting its figures", flush=True)
    return [results[r] for r in range(world)]
