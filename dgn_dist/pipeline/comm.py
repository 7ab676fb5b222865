"""Point-to-point transport of the pipeline schedule (DESIGN.md §4 "Pipeline parallel").

Every message is a list of tensors with shapes fixed in advance: the state tuple at a
boundary ``[mb, *state]`` (forward, update pass) or ``V_x [mb, *state]`` and the factors
``U [mb, r, *state]`` (backward sweep). The shapes come from a shape-only dry run of the
whole game on the ``meta`` device (:func:`state_specs`), which every rank can do alone, so no
metadata travels and every receive buffer is allocated before the sender has computed
anything. Messages are posted with ``dist.batch_isend_irecv`` and waited on only when their
content is needed (sends: at the end of the pass), so computation overlaps the transfer.

:class:`Link` counts the payload bytes it hands to ``isend`` per pass (``forward``,
``sweep``, ``update``, ``predict``) in a :class:`~dgn_dist.distributed.reduce.ByteCounter`.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from dgn_dist.distributed.reduce import ByteCounter
from dgn_dist.game.core import Game

#: Message tags per pass (keeps the passes' messages apart on one pair of ranks).
TAGS = {"forward": 1, "sweep": 2, "update": 3, "predict": 4}


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one tensor of a message."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def empty(self, device: torch.device) -> Tensor:
        """An uninitialised buffer of this spec."""
        return torch.empty(self.shape, dtype=self.dtype, device=device)


def meta_copy(game: Game) -> Game:
    """A parameter-free copy of ``game`` on the ``meta`` device (for shape inference)."""
    return copy.deepcopy(game).to("meta").eval()


def state_specs(meta_game: Game, sample_shape: Sequence[int], dtype: torch.dtype,
                rows: int) -> list[list[TensorSpec]]:
    """Specs of the states ``X_0 … X_T`` for a batch of ``rows`` examples.

    Args:
        meta_game: the game on the meta device (:func:`meta_copy`), in eval mode.
        sample_shape: one input example's shape (``x.shape[1:]``).
        dtype: the input dtype.
        rows: examples in the batch (a micro-batch).
    """
    x = torch.zeros((rows, *sample_shape), dtype=dtype, device="meta")
    with torch.no_grad():
        states = meta_game.trajectory(x)
    return [[TensorSpec(tuple(s.shape), s.dtype) for s in st] for st in states]


def factor_specs(states: Sequence[TensorSpec], r: int) -> list[TensorSpec]:
    """Specs of the ``V_xx`` factors ``[mb, r, *state]`` of a state tuple."""
    return [TensorSpec((s.shape[0], r, *s.shape[1:]), s.dtype) for s in states]


class IdleQueue:
    """Work for a rank's waits (:meth:`Link.wait`), in order of priority: the first list's
    tasks, then the next list's. Each list is consumed in place, so its owner sees what is
    left of it."""

    def __init__(self, *lists: list[Callable[[], None]]) -> None:
        self.lists = lists

    def __bool__(self) -> bool:
        return any(self.lists)

    def run_next(self) -> None:
        """Pop and run the first task of the first list that has one."""
        for tasks in self.lists:
            if tasks:
                tasks.pop(0)()
                return


@dataclass
class Link:
    """Posts a pass's sends and receives to pipeline neighbours and counts the bytes.

    Args:
        counter: bytes per pass (``forward``, ``sweep``, ``update``, ``predict``).
        device: where receive buffers live.
    """

    counter: ByteCounter = field(default_factory=ByteCounter)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: Seconds spent blocked in :meth:`wait` and :meth:`flush` (the pipeline bubble).
    waited: float = 0.0
    _pending: list[tuple[Any, list[Tensor]]] = field(default_factory=list)

    def recv(self, specs: Sequence[TensorSpec], src: int, kind: str) -> tuple[list[Tensor], Any]:
        """Post receives of one message; returns the buffers and a handle for :meth:`wait`."""
        bufs = [s.empty(self.device) for s in specs]
        ops = [dist.P2POp(dist.irecv, b, src, tag=TAGS[kind]) for b in bufs]
        return bufs, dist.batch_isend_irecv(ops) if ops else []

    def send(self, tensors: Sequence[Tensor], dst: int, kind: str) -> None:
        """Post sends of one message (contiguous copies kept alive until :meth:`flush`)."""
        bufs = [t.detach().contiguous() for t in tensors]
        for b in bufs:
            self.counter.add(kind, b.numel() * b.element_size())
        ops = [dist.P2POp(dist.isend, b, dst, tag=TAGS[kind]) for b in bufs]
        if ops:
            self._pending.append((dist.batch_isend_irecv(ops), bufs))

    def wait(self, handle: Any,
             idle: list[Callable[[], None]] | IdleQueue | None = None) -> None:
        """Block until a posted receive has arrived. With ``idle`` tasks, run them (popped
        from the front) until it has: a watcher thread waits for the message meanwhile (gloo
        has no polling: ``Work.is_completed`` stays false until someone waits, and the wait
        releases the GIL)."""
        errors: list[BaseException] = []
        watcher: threading.Thread | None = None
        if isinstance(idle, list):
            idle = IdleQueue(idle)
        if idle:
            arrived = threading.Event()

            def watch() -> None:
                try:
                    for work in handle:
                        work.wait()
                except BaseException as err:  # re-raised in the caller's thread below
                    errors.append(err)
                finally:
                    arrived.set()

            watcher = threading.Thread(target=watch, name="pipeline-recv", daemon=True)
            watcher.start()
            while idle and not arrived.is_set():
                idle.run_next()
        start = time.perf_counter()
        if watcher is not None:
            watcher.join()
        else:
            for work in handle:
                work.wait()
        self.waited += time.perf_counter() - start
        if errors:
            raise errors[0]

    def flush(self) -> None:
        """Block until every posted send has left (end of a pass)."""
        start = time.perf_counter()
        for works, _ in self._pending:
            for work in works:
                work.wait()
        self._pending.clear()
        self.waited += time.perf_counter() - start


def split_rows(state: Sequence[Tensor], sizes: Sequence[int]) -> list[tuple[Tensor, ...]]:
    """A batch-stacked state tuple cut into micro-batches of ``sizes`` rows."""
    parts = [t.split(list(sizes), dim=0) for t in state]
    return [tuple(p[m] for p in parts) for m in range(len(sizes))]


def cat_rows(parts: Sequence[Sequence[Tensor]]) -> tuple[Tensor, ...]:
    """Micro-batch state tuples stacked back into one batch (row order kept)."""
    return tuple(torch.cat([p[i] for p in parts]) for i in range(len(parts[0])))
