"""Concrete stage dynamics ``F_t`` (DESIGN.md section 2, Fig. 2, Fig. 3a, Fig. 8a).

Each stage holds the model's own modules (registered as submodules, never copied) in the
order the model's forward calls them, so ``game(x)`` reproduces ``model(x)`` bit for bit:

* :class:`ChainStage` ``(z,) -> (ops(z),)``: one parametrised layer of an ``nn.Sequential``
  (optionally its BatchNorm) with the parameterless modules around it.
* :class:`BranchStage` ``(z,) -> (main(z), carry(z))``: the first layer of a residual block;
  ``carry`` is the shortcut (alignment "first") or empty (the skip tensor is carried by a
  dummy player).
* :class:`ThroughStage` ``(h, s) -> (main(h), s)``: a middle layer of a deeper residual block
  (torchvision's Bottleneck); the skip path is carried unchanged.
* :class:`MergeStage` ``(h, s) -> (post(main(h) + shortcut(s)),)``: the layer where the
  residual block joins its shortcut (alignment "second" puts the shortcut's players here).
* :class:`SumStage` ``(z,) -> (post(branch_1(z) + ... + branch_N(z)),)``: parallel layers
  adding into one output (cooperative block, fictitious players).

``ops`` entries are ``(dotted_name, module)`` pairs; the names are kept for ``describe``.
Each stage writes its dynamics once, in ``flow``; ``forward`` is ``flow`` on tensors, and
forward-mode products run the same ``flow`` on primal-tangent pairs
(:mod:`dgn_dist.dgnopt.tangents`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

from torch import Tensor, nn

from dgn_dist.game.core import Player, Stage, State

Op = tuple[str, nn.Module]
#: How :meth:`Stage.flow` runs one ``_Ops`` on one value (a tensor, or a primal-tangent pair).
Apply = Callable[["_Ops", Any], Any]


def _call(ops: _Ops, x: Tensor) -> Tensor:
    return cast(Tensor, ops(x))


class _Ops(nn.Module):
    """An ordered list of modules applied one after the other (names kept for printing)."""

    def __init__(self, ops: Sequence[Op]) -> None:
        super().__init__()
        self.names = [name for name, _ in ops]
        self.mods = nn.ModuleList([module for _, module in ops])

    def forward(self, x: Tensor) -> Tensor:
        for module in self.mods:
            x = module(x)
        return x

    def __len__(self) -> int:
        return len(self.mods)

    def summary(self) -> str:
        return " -> ".join(self.names) if self.names else "identity"


def _check_arity(stage: Stage, state: State, expected: int) -> None:
    if len(state) != expected:
        raise ValueError(f"stage {stage.name} ({type(stage).__name__}) expects a state tuple "
                         f"of {expected} tensor(s), got {len(state)}")


class ChainStage(Stage):
    """``(z,) -> (ops(z),)``: a segment of a sequential network.

    Args:
        name: stage name (the dotted name of its parametrised layer).
        ops: the modules in call order.
        players: the parametrised modules among ``ops``.
    """

    def __init__(self, name: str, ops: Sequence[Op], players: list[Player]) -> None:
        super().__init__(name)
        self.ops = _Ops(ops)
        self.players = players

    def forward(self, state: State) -> State:
        return cast(State, self.flow(state, _call))

    def flow(self, state: tuple[Any, ...], apply: Apply) -> tuple[Any, ...]:
        _check_arity(self, state, 1)
        return (apply(self.ops, state[0]),)

    def dynamics(self) -> str:
        return self.ops.summary()


class BranchStage(Stage):
    """``(z,) -> (main(pre(z)), carry(pre(z)))``: entry of a residual block (Fig. 2).

    Args:
        name: stage name.
        pre: parameterless modules applied before the block (only for a network's first
            stage), the result being the block input ``z``.
        main: the block's first layer (conv, BN, activation).
        carry: the shortcut (alignment "first"), or empty to carry ``z`` itself.
        players: players of ``main`` then of ``carry``.
    """

    def __init__(self, name: str, pre: Sequence[Op], main: Sequence[Op], carry: Sequence[Op],
                 players: list[Player]) -> None:
        super().__init__(name)
        self.pre = _Ops(pre)
        self.main = _Ops(main)
        self.carry = _Ops(carry)
        self.players = players

    def forward(self, state: State) -> State:
        return cast(State, self.flow(state, _call))

    def flow(self, state: tuple[Any, ...], apply: Apply) -> tuple[Any, ...]:
        _check_arity(self, state, 1)
        z = apply(self.pre, state[0])
        return apply(self.main, z), apply(self.carry, z)

    def dynamics(self) -> str:
        pre = f"{self.pre.summary()} -> " if len(self.pre) else ""
        return f"{pre}({self.main.summary()} | {self.carry.summary()})"


class ThroughStage(Stage):
    """``(h, s) -> (main(h), s)``: a middle layer of a residual block; ``s`` is carried."""

    def __init__(self, name: str, main: Sequence[Op], players: list[Player]) -> None:
        super().__init__(name)
        self.main = _Ops(main)
        self.players = players

    def forward(self, state: State) -> State:
        return cast(State, self.flow(state, _call))

    def flow(self, state: tuple[Any, ...], apply: Apply) -> tuple[Any, ...]:
        _check_arity(self, state, 2)
        return apply(self.main, state[0]), state[1]

    def dynamics(self) -> str:
        return f"({self.main.summary()} | identity)"


class MergeStage(Stage):
    """``(h, s) -> (post(main(h) + shortcut(s)),)``: the residual block's join.

    Args:
        name: stage name.
        main: the block's last layer (conv, BN).
        shortcut: the shortcut (alignment "second"), or empty when it ran in an earlier stage
            or is the identity.
        post: the block's final activation and the parameterless modules after the block.
        players: players of ``main`` then of ``shortcut``.
    """

    def __init__(self, name: str, main: Sequence[Op], shortcut: Sequence[Op], post: Sequence[Op],
                 players: list[Player]) -> None:
        super().__init__(name)
        self.main = _Ops(main)
        self.shortcut = _Ops(shortcut)
        self.post = _Ops(post)
        self.players = players

    def forward(self, state: State) -> State:
        return cast(State, self.flow(state, _call))

    def flow(self, state: tuple[Any, ...], apply: Apply) -> tuple[Any, ...]:
        _check_arity(self, state, 2)
        return (apply(self.post, apply(self.main, state[0]) + apply(self.shortcut, state[1])),)

    def dynamics(self) -> str:
        return f"({self.main.summary()} + {self.shortcut.summary()}) -> {self.post.summary()}"


class SumStage(Stage):
    """``(z,) -> (post(b_1(pre(z)) + ... + b_N(pre(z))),)``: parallel layers, one output.

    The sum runs left to right, as ``first(x) + second(x)`` does (Fig. 3a).
    """

    def __init__(self, name: str, pre: Sequence[Op], branches: Sequence[Sequence[Op]],
                 post: Sequence[Op], players: list[Player]) -> None:
        super().__init__(name)
        if len(branches) < 1:
            raise ValueError(f"SumStage {name} needs at least one branch")
        self.pre = _Ops(pre)
        self.branches = nn.ModuleList([_Ops(b) for b in branches])
        self.post = _Ops(post)
        self.players = players

    def forward(self, state: State) -> State:
        return cast(State, self.flow(state, _call))

    def flow(self, state: tuple[Any, ...], apply: Apply) -> tuple[Any, ...]:
        _check_arity(self, state, 1)
        z = apply(self.pre, state[0])
        out = apply(cast(_Ops, self.branches[0]), z)
        for branch in self.branches[1:]:
            out = out + apply(cast(_Ops, branch), z)
        return (apply(self.post, out),)

    def dynamics(self) -> str:
        pre = f"{self.pre.summary()} -> " if len(self.pre) else ""
        summed = " + ".join(cast(_Ops, b).summary() for b in self.branches)
        return f"{pre}({summed}) -> {self.post.summary()}"
