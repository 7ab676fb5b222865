"""The next step's forward pass, run ahead by the ranks before the last (DESIGN.md §4).

The update pass is serial over the stages (stage ``t`` needs ``δX_t``, Alg. 1 lines 8-12), so
every rank before the last finishes its update while the last rank still updates its own
stages, and then waits at the step's closing agreement (loss, skip decision). Given the next
batch (``PipelineRunner.train_step(x, y, next_x=...)``), those ranks run the next step's
forward pass in that wait instead -- their parameters are final once their own update is
done -- and sum its Kronecker ``A`` statistics there, which otherwise run in the next step's
sweep waits or, where the waits are too short, on the step's critical path.

Nothing is computed differently: the same forward, the same statistics in the same order,
at the same parameters. Only two effects need care:

* BatchNorm running statistics change in a training forward. They are put back at once
  (:func:`dgn_dist.dgnopt.capture.snapshot` / ``load``, as on a skipped step) and
  the forward's values applied when the next step uses it, so that a checkpoint or an
  evaluation between the two steps sees the state of the step boundary.
* The step can still be skipped (a non-finite value on a later rank). Its parameters are then
  restored, so the forward run ahead is void: it is dropped, and the last rank receives and
  discards the activations it was sent (:meth:`PipelineRunner.drop_lookahead`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dgn_dist.dgnopt.streamed import StreamedStats
from dgn_dist.game.core import State


def same_batch(x: Tensor, announced: Tensor) -> bool:
    """Whether ``x`` is the batch announced as the next one (the same tensor, or equal)."""
    return x is announced or (x.shape == announced.shape and bool(torch.equal(x, announced)))


@dataclass
class Lookahead:
    """The forward of the next step, run ahead on a rank before the last.

    Attributes:
        traj: the forward's trajectory (:meth:`~dgn_dist.pipeline.schedule.Shard.forward`).
        sums: the ``A`` statistics summed so far (``None`` without Kronecker curvature).
        tasks: the ``A`` statistics not yet summed (run in the next step's sweep waits).
        buffers: the running statistics after the forward (applied when it is used).
        rows: the input rows those tasks keep for the stream (``Shard.kept_rows``).
    """

    traj: list[list[State]]
    sums: list[StreamedStats] | None
    tasks: list[Callable[[], None]]  # schedule.InputTask items
    buffers: list[Tensor]
    rows: dict[tuple[int, int], dict[int, Tensor]]
