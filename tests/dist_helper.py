"""Run a function on N gloo processes and fail loudly on an error or a hang.

Every distributed test uses :func:`run_distributed`::

    def _body(rank: int, world_size: int, n: int) -> float:
        x = torch.full((n,), float(rank))
        dist.all_reduce(x)
        return x.sum().item()

    def test_sum() -> None:
        assert run_distributed(_body, 2, 3) == [3.0, 3.0]

``fn`` runs as ``fn(rank, world_size, *args)`` in each child (a module-level function, so it
pickles under ``spawn``); its return values come back as a list ordered by rank. Children
are forked by default (no re-import of torch: ~0.05 s instead of ~3 s per test on 2 cores);
they run with one thread and no GPU. With ``init=True`` the child joins a gloo group on a
free port before ``fn``; with ``init=False`` it only gets torchrun-style variables (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) so ``fn`` can test
:func:`dgn_dist.distributed.env.init_distributed` itself.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

FAILURE_GRACE_S = 3.0  # how long the other ranks may still finish after one rank failed


class DistributedTestError(AssertionError):
    """A rank raised, crashed or hung (the message names the ranks and has the tracebacks)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _child(fn: Callable[..., Any], rank: int, world_size: int, args: tuple[Any, ...],
           port: int, init: bool, env: Mapping[str, str], timeout: float,
           results: Any) -> None:
    os.environ.update({
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
        "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size), "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "", **env})
    code = 0
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        if init:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                    world_size=world_size, timeout=timedelta(seconds=timeout))
        results.put(("ready", rank, b""))
        payload = pickle.dumps(fn(rank, world_size, *args))
        results.put(("ok", rank, payload))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put(("error", rank, traceback.format_exc().encode()))
        code = 1
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - the group may be broken after a failure
            pass
    results.close()
    results.join_thread()
    os._exit(code)


def _stop(procs: list[Any]) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 60.0,
                    init: bool = True, env: Mapping[str, str] | None = None,
                    startup_timeout: float = 120.0, start_method: str = "fork") -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes.

    Args:
        fn: module-level function run in every child.
        world_size: number of processes (keep 2 on CI's 2 cores; 4 only when essential).
        *args: extra arguments for ``fn`` (picklable).
        timeout: seconds each rank may spend in ``fn`` (and in collectives) before it counts
            as hung.
        init: join a gloo process group before ``fn`` (else only set the launcher variables).
        env: extra environment variables for the children.
        startup_timeout: seconds allowed for start-up and rendezvous.
        start_method: ``"fork"`` (fast) or ``"spawn"``.

    Returns:
        ``fn``'s return values, ordered by rank.

    Raises:
        DistributedTestError: a rank raised (its traceback is in the message), exited with a
            non-zero status or a signal, or hung (all processes are killed first).
    """
    ctx = mp.get_context(start_method)
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, daemon=True,
                         args=(fn, r, world_size, args, port, init, dict(env or {}), timeout,
                               results)) for r in range(world_size)]
    start = time.monotonic()
    for p in procs:
        p.start()
    ready: dict[int, float] = {}
    values: dict[int, Any] = {}
    errors: dict[int, str] = {}
    first_failure: float | None = None
    dead_since: dict[int, float] = {}
    try:
        while len(values) + len(errors) < world_size:
            try:
                kind, rank, payload = results.get(timeout=0.05)
            except queue.Empty:
                kind = ""
            now = time.monotonic()
            if kind == "ready":
                ready[rank] = now
            elif kind == "ok":
                values[rank] = pickle.loads(payload)
            elif kind == "error":
                errors[rank] = payload.decode()
                first_failure = first_failure or now
            pending = [r for r in range(world_size) if r not in values and r not in errors]
            for r in pending:  # crashed without a message (signal, os._exit)
                if procs[r].exitcode is not None:
                    dead_since.setdefault(r, now)
                    if now - dead_since[r] > 1.0:
                        errors[r] = f"exited with status {procs[r].exitcode} and no traceback"
                        first_failure = first_failure or now
            pending = [r for r in pending if r not in errors]
            if first_failure is not None and pending and now - first_failure > FAILURE_GRACE_S:
                for r in pending:
                    errors[r] = "still running after another rank failed (killed)"
                break
            hung = [r for r in pending
                    if now > (ready[r] + timeout if r in ready else start + startup_timeout)]
            if hung and first_failure is None:
                _stop(procs)
                done = sorted(values)
                raise DistributedTestError(
                    f"ranks {pending} of {world_size} hung: no result within {timeout:.1f} s "
                    f"of starting fn (finished: {done})")
    finally:
        _stop(procs)
        results.close()
    if errors:
        text = "\n".join(f"--- rank {r} ---\n{errors[r]}" for r in sorted(errors))
        raise DistributedTestError(
            f"{len(errors)} of {world_size} ranks failed ({sorted(errors)}):\n{text}")
    return [values[r] for r in range(world_size)]


def expect_setup_error(rank: int, world_size: int, config: str, overrides: list[str]) -> str:
    """A :func:`run_distributed` body: ``train()`` with ``config`` and ``overrides`` must
    raise :class:`~dgn_dist.config.ConfigError` before it writes anything; its message.

    Raises:
        AssertionError: ``train()`` accepted the settings.
    """
    del rank, world_size
    from dgn_dist.config import ConfigError, load_config
    from dgn_dist.trainer import train

    try:
        train(load_config(config, ["run.dir=/nonexistent/never-written", *overrides]))
    except ConfigError as err:
        return str(err)
    raise AssertionError(f"train() accepted the bad settings {overrides}")
