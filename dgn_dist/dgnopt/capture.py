"""Running one stage of the game with its player modules tapped (DESIGN.md section 3).

Every player module is called exactly once per stage forward (see ``dgn_dist.game.core``), so
a forward hook sees that player's input (for the Kronecker input factor and per-sample
gradients) and its output (a graph node whose gradient is the output-side vector ``g``).
BatchNorm running statistics are frozen while the optimizer re-runs stages: the trainer's own
forward already updated them once for this step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from dgn_dist.dgnopt.dots import combine, state_dots
from dgn_dist.game.core import Player, State


@contextmanager
def frozen_batchnorm(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers in training mode use batch statistics but do not update the running
    ones (``track_running_stats`` is switched off for the duration, then restored)."""
    switched = [m for m in module.modules()
                if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for m in switched:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in switched:
            m.track_running_stats = True


def running_buffers(modules: Sequence[nn.Module]) -> list[Tensor]:
    """The buffers a training forward changes: BatchNorm running statistics and counts."""
    return [b for m in modules for sub in m.modules() if isinstance(sub, _BatchNorm)
            for b in sub.buffers()]


def snapshot(buffers: Sequence[Tensor]) -> list[Tensor]:
    """Copies of ``buffers`` (for :func:`load` after a skipped step)."""
    return [b.detach().clone() for b in buffers]


def load(buffers: Sequence[Tensor], values: Sequence[Tensor]) -> None:
    """Copy ``values`` into ``buffers`` in place."""
    with torch.no_grad():
        for b, v in zip(buffers, values, strict=True):
            b.copy_(v)


class PlayerTap:
    """Forward hooks recording each player's input tensor and output tensor for one call.

    Use as a context manager around exactly one stage forward; ``inputs[n]`` / ``outputs[n]``
    then hold player ``n``'s (first) input and its output. With ``clone_outputs`` the stage
    continues with a copy of each output, so an in-place operation after the player (e.g.
    ``ReLU(inplace=True)`` after BatchNorm) cannot overwrite the recorded graph node.
    """

    def __init__(self, players: Sequence[Player], clone_outputs: bool = False) -> None:
        self.players = list(players)
        self.clone_outputs = clone_outputs
        self.inputs: list[Tensor | None] = [None] * len(self.players)
        self.outputs: list[Tensor | None] = [None] * len(self.players)
        self._handles: list[Any] = []

    def _hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
            if self.outputs[index] is not None:
                raise RuntimeError(
                    f"player {self.players[index].name} was called twice in one stage forward; "
                    "a player module must be called exactly once per stage")
            self.inputs[index] = args[0]
            self.outputs[index] = output
            return output.clone() if self.clone_outputs else None
        return hook

    def __enter__(self) -> PlayerTap:
        self._handles = [p.module.register_forward_hook(self._hook(i))
                         for i, p in enumerate(self.players)]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def clear(self) -> None:
        """Drop the recorded tensors (memory: with ``clone_outputs`` the outputs are copies
        the stage no longer holds)."""
        self.inputs = [None] * len(self.players)
        self.outputs = [None] * len(self.players)

    def input(self, index: int) -> Tensor:
        value = self.inputs[index]
        if value is None:
            raise RuntimeError(f"player {self.players[index].name} was not called by its stage")
        return value

    def output(self, index: int) -> Tensor:
        value = self.outputs[index]
        if value is None:
            raise RuntimeError(f"player {self.players[index].name} was not called by its stage")
        return value


def leaves(state: State) -> State:
    """Detached copies of the state tensors that require grad (roots of a VJP)."""
    return tuple(s.detach().requires_grad_(True) for s in state)


def repeat_samples(state: State, r: int) -> State:
    """Each sample repeated ``r`` times, sample-major: ``[B, ...] -> [B*r, ...]``."""
    return tuple(s.detach().repeat_interleave(r, dim=0) for s in state)


def flat_factors(factors: State) -> State:
    """``[B, r, *shape] -> [B*r, *shape]`` (the layout of :func:`repeat_samples`)."""
    return tuple(u.reshape(u.shape[0] * u.shape[1], *u.shape[2:]) for u in factors)


def per_sample_dot(a: State, b: State) -> Tensor:
    """``<a_b, b_b>`` summed over the state tensors, one value per leading index."""
    total: Tensor | None = None
    for x, y in zip(a, b, strict=False):
        d = (x * y).reshape(x.shape[0], -1).sum(1)
        total = d if total is None else total + d
    if total is None:
        raise ValueError("empty state tuple")
    return total


def contract_factors(factors: State, tangent: State) -> State:
    """``sum_i u_{b,i} <u_{b,i}, tangent_b>`` for factors ``[B, r, *s]``, tangent ``[B, *s]``:
    the action of the factorised ``V_xx`` on a stacked state vector."""
    coef: Tensor | None = None
    for u, v in zip(factors, tangent, strict=False):
        c = state_dots(u, v)
        coef = c if coef is None else coef + c
    if coef is None:
        raise ValueError("empty state tuple")
    return tuple(combine(coef, u) for u in factors)
