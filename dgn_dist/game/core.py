"""The dynamic game a network defines (DESIGN.md section 2).

A :class:`Game` is a sequence of :class:`Stage` modules. Stage ``t`` maps the state tuple
``x_t`` (one tensor per live path: main path, carried skip path, ...) to ``x_{t+1}``. The
players of a stage are the parametrised modules it calls; parameterless paths (identity
shortcut, carried skip tensor) are dummy players and are not listed. Stages *reference* the
model's modules (they never copy them), so updating a player updates the model, and
``game(x)`` equals ``model(x)``.

Every player module is called exactly once per stage forward, so module hooks see one input
and one output per call (Kronecker factors are captured that way).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

State = tuple[Tensor, ...]
CurvatureForm = Literal["kron", "diag"]


@dataclass(eq=False)
class Player:
    """One player: a parametrised module of a stage.

    Attributes:
        name: dotted module name in the model (``"block1.conv2"``).
        module: the module itself (Linear / Conv2d get Kronecker curvature; BatchNorm and
            any other parametrised module get diagonal curvature).
        curvature: ``"kron"`` or ``"diag"``.
        output_group: players of one stage whose outputs are *added* into one tensor share a
            group (Fig. 3a cooperative block, a shortcut aligned with the layer it joins,
            fictitious players); players writing separate outputs have distinct groups.
    """

    name: str
    module: nn.Module
    curvature: CurvatureForm
    output_group: int = 0

    def parameters(self) -> list[nn.Parameter]:
        """The trainable parameters, in ``module.parameters()`` order (the order in which
        a player's parameter vector ``theta_{t,n}`` is flattened and concatenated)."""
        return [p for p in self.module.parameters(recurse=False) if p.requires_grad]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(model-level dotted name, parameter)`` pairs, e.g. ``("block1.conv2.weight", w)``."""
        return [(f"{self.name}.{n}" if self.name else n, p)
                for n, p in self.module.named_parameters(recurse=False) if p.requires_grad]

    def numel(self) -> int:
        """Size of the player's parameter vector."""
        return sum(p.numel() for p in self.parameters())


class Stage(nn.Module):
    """Dynamics ``F_t``: a state tuple in, a state tuple out.

    Subclasses implement :meth:`forward`; ``players`` lists the player modules it calls.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.players: list[Player] = []

    def forward(self, state: State) -> State:  # pragma: no cover - overridden
        raise TypeError(f"{type(self).__name__} must override forward(state)")

    def flow(self, state: tuple[Any, ...], apply: Any) -> tuple[Any, ...]:
        """``forward`` with every module list run through ``apply(ops, value)`` and the sums
        left to the values' ``+``: the same code then carries tensors (``forward``) or
        primal-tangent pairs (:mod:`dgn_dist.dgnopt.tangents`)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its data flow")

    def dynamics(self) -> str:
        """A short text of what ``forward`` computes (module names in call order)."""
        return type(self).__name__

    def describe(self) -> str:
        """One line for ``dgn-train --print-game``."""
        names = ", ".join(f"{p.name}[{p.curvature}, g{p.output_group}, {p.numel()}]"
                          for p in self.players)
        return (f"{self.name}: {type(self).__name__} players=({names or 'dummy only'}) "
                f"F: {self.dynamics()}")


class Game(nn.Module):
    """The stages of a network in order; ``forward(x)`` returns the logits."""

    def __init__(self, stages: list[Stage]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def initial_state(self, x: Tensor) -> State:
        return (x,)

    def trajectory(self, x: Tensor) -> list[State]:
        """All states ``[x_0, ..., x_T]`` of one forward pass."""
        states = [self.initial_state(x)]
        for stage in self.stages:
            states.append(stage(states[-1]))
        return states

    def forward(self, x: Tensor) -> Tensor:
        state = self.initial_state(x)
        for stage in self.stages:
            state = stage(state)
        if len(state) != 1:
            raise RuntimeError(f"the last stage must return one tensor (logits), got {len(state)}")
        return state[0]

    def stage_list(self) -> list[Stage]:
        """The stages, typed (``self.stages`` is an ``nn.ModuleList``)."""
        return [cast(Stage, s) for s in self.stages]

    def players(self) -> Iterator[tuple[int, Player]]:
        """``(stage index, player)`` for every player, in stage order."""
        for t, stage in enumerate(self.stage_list()):
            for player in stage.players:
                yield t, player

    def describe(self, example: Tensor | None = None) -> str:
        """Stages, players (``name[curvature, output group, size]``), each stage's dynamics
        and, given an example input, the state shapes ``x_t -> x_{t+1}``."""
        lines = []
        shapes: list[list[tuple[int, ...]]] = []
        if example is not None:
            # Eval mode: shapes do not depend on it, BatchNorm then accepts a batch of one
            # and printing leaves the running statistics alone.
            modes = [(m, m.training) for m in self.modules()]
            self.eval()
            try:
                with torch.no_grad():
                    shapes = [[tuple(s.shape) for s in st] for st in self.trajectory(example)]
            finally:
                for module, mode in modes:
                    module.training = mode
        for t, stage in enumerate(self.stage_list()):
            line = f"stage {t:2d}  {stage.describe()}"
            if shapes:
                line += f"  state {shapes[t]} -> {shapes[t + 1]}"
            lines.append(line)
        return "\n".join(lines)
