"""How the trainer steps, evaluates and saves a model: one process / data parallel, or a
pipeline of game stages (DESIGN.md §4).

The trainer talks to an :class:`Engine` only:

* :class:`LocalEngine` -- the model lives whole on this rank; a step is the ordinary
  ``logits = model(x); loss.backward(); optimizer.step()`` (any optimizer, data parallel
  through the optimizer's reductions), under bf16 autocast when configured;
* :class:`PipelineEngine` -- the stages are sharded over the pipeline ranks and a step is
  :meth:`dgn_dist.pipeline.runner.PipelineRunner.train_step` (forward, backward sweep and
  update pass over point-to-point sends).

Methods marked *collective* must be called on every rank at the same point.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer


@dataclass
class StepOutput:
    """One training step as the metrics see it.

    Attributes:
        loss: mean loss of the batch the statistics count (a 0-dim tensor).
        correct: correctly classified examples of that batch (a 0-dim integer tensor).
        count: examples of that batch.
    """

    loss: Tensor
    correct: Tensor
    count: int


class LocalEngine:
    """The whole model on this rank (single process or one data-parallel replica).

    Args:
        model: the model (fictitious players already split in, if any).
        optimizer: its optimizer (data-parallel reductions already attached).
        autocast: ``torch.bfloat16`` to run forward and loss under autocast, else ``None``.
    """

    #: The step statistics are this replica's; the trainer sums them over the dp group.
    stats_are_local = True
    #: Nothing to gain from knowing the next batch.
    runs_ahead = False

    def __init__(self, model: nn.Module, optimizer: Optimizer,
                 autocast: torch.dtype | None = None) -> None:
        self.model, self.optimizer, self.autocast = model, optimizer, autocast

    def train_step(self, x: Tensor, y: Tensor, next_x: Tensor | None = None) -> StepOutput:
        del next_x  # see PipelineEngine
        with torch.autocast(x.device.type, dtype=self.autocast or torch.bfloat16,
                            enabled=self.autocast is not None):
            logits = self.model(x)
            loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return StepOutput(loss.detach(), (logits.detach().argmax(dim=1) == y).sum(), len(y))

    def predict(self, x: Tensor) -> Tensor:
        return self.model(x)

    def model_state(self) -> dict[str, Tensor]:
        """Collective (trivially here)."""
        return self.model.state_dict()

    def load_model_state(self, state: dict[str, Tensor]) -> None:
        self.model.load_state_dict(state)

    def optimizer_state(self) -> dict[str, Any]:
        """Collective (trivially here)."""
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def export(self, path: Path, write: bool) -> None:
        """Collective: the plain model's ``state_dict`` (fictitious players collapsed, eq. 16)
        to ``path`` when ``write``."""
        if write:
            from dgn_dist.game.training import export_model

            export_model(self.model, path)

    def scalars(self) -> dict[str, float]:
        """Collective: per-step time and communication figures of the engine (none here;
        data-parallel byte counts come from the optimizer's reductions)."""
        return {}


class PipelineEngine:
    """Stages sharded over the pipeline ranks (:class:`~dgn_dist.pipeline.runner.PipelineRunner`).

    The runner's step statistics cover the global batch and are identical on every rank.
    """

    stats_are_local = False

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        #: With more than one pipeline rank, the trainer passes the next batch (``next_x``).
        self.runs_ahead: bool = runner.dims.pp > 1
        self.optimizer: Optimizer = runner.optimizer

    def train_step(self, x: Tensor, y: Tensor, next_x: Tensor | None = None) -> StepOutput:
        """``next_x``: the next call's batch, when known: the ranks before the last then run
        its forward while the last rank finishes this step (:mod:`dgn_dist.pipeline.lookahead`)."""
        res = self.runner.train_step(x, y, next_x)
        return StepOutput(torch.tensor(res.loss, dtype=torch.float64),
                          torch.tensor(res.correct, dtype=torch.int64), res.count)

    def predict(self, x: Tensor) -> Tensor:
        return self.runner.predict(x)

    def model_state(self) -> dict[str, Tensor]:
        return self.runner.full_state_dict()

    def load_model_state(self, state: dict[str, Tensor]) -> None:
        self.runner.load_full_state_dict(state)

    def optimizer_state(self) -> dict[str, Any]:
        return self.runner.optimizer_state_dict()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.runner.load_optimizer_state_dict(state)

    def export(self, path: Path, write: bool) -> None:
        state = self.runner.full_state_dict()
        if write:
            from dgn_dist.checkpoint import atomic_write_bytes

            atomic_write_bytes(path, lambda handle: torch.save(state, handle))

    def scalars(self) -> dict[str, float]:
        """``time/{forward,sweep,update}``, ``comm/*_bytes``, ``memory/*`` (max / sum over
        ranks, and per rank)."""
        return self.runner.comm_stats()
