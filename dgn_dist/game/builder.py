"""Build the dynamic game of a model automatically (DESIGN.md section 2, Fig. 2, 3a, 8a).

:func:`build_game` walks the model's module tree (never its forward code) and maps it onto
stages from :mod:`dgn_dist.game.stages`:

* ``nn.Sequential`` (nested ones are flattened): each ``Linear``/``Conv2d`` starts a stage;
  a BatchNorm directly after it joins that stage as a ``diag`` player; parameterless modules
  (activations, pooling, ``Flatten``, ``Identity``) join the stage before them, or the first
  stage when they come before any parametrised layer. A BatchNorm anywhere else is a stage
  of its own.
* residual blocks (:class:`dgn_dist.models.ResidualBlock`, torchvision's ``BasicBlock`` and
  ``Bottleneck``): one stage per main-path layer with the state tuple ``(h, s)`` in between.
  The shortcut's players sit with the block's first layer (alignment ``"first"``, separate
  output group, eq. 27) or with the layer it joins (``"second"``, same output group); an
  identity shortcut is a dummy player (the carried tensor).
* :class:`dgn_dist.models.CooperativePair`: one stage, both layers in one output group.
* torchvision ``ResNet``: its forward as an ordered list (stem, layers, pool, flatten, fc).
* :class:`dgn_dist.game.fictitious.FictitiousLayer` (eq. 16, from ``split_players``) stands
  wherever a Linear/Conv2d may: it stays one operation of its stage and contributes its ``N``
  copies as ``N`` Kronecker players in the output group the layer would have had.

Anything else raises :class:`GameBuildError` naming the module. Parametrised modules are
referenced, never copied; only parameterless in-place modules get an out-of-place copy.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from dgn_dist.game.core import Game, Player, Stage
from dgn_dist.game.fictitious import FictitiousLayer
from dgn_dist.game.stages import BranchStage, ChainStage, MergeStage, Op, SumStage, ThroughStage
from dgn_dist.models.blocks import CooperativePair, ResidualBlock

Alignment = Literal["first", "second"]
ALIGNMENTS: tuple[str, ...] = ("first", "second")

KRON_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
DIAG_LAYERS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)
#: Modules that make Kronecker players: a layer, or a layer split into fictitious players.
LAYER_MODULES: tuple[type[nn.Module], ...] = KRON_LAYERS + (FictitiousLayer,)

SUPPORTED = (
    "supported: nn.Sequential (nested), nn.Linear / nn.Conv2d (Kronecker players), BatchNorm "
    "(diagonal players), parameterless modules (activations, pooling, Flatten, Identity), "
    "dgn_dist.models.ResidualBlock, dgn_dist.models.CooperativePair, torchvision ResNet / "
    "BasicBlock / Bottleneck, FictitiousLayer (split_players)")


class GameBuildError(ValueError):
    """The model contains a module the game builder cannot place."""


def _display(name: str) -> str:
    return name or "<model>"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _uses_forward_of(module: nn.Module, cls: type[nn.Module]) -> bool:
    """``module`` is a ``cls`` whose forward is ``cls.forward`` (not overridden)."""
    return isinstance(module, cls) and type(module).forward is cls.forward


def _torchvision_resnet() -> tuple[type[nn.Module], ...]:
    """``(ResNet, BasicBlock, Bottleneck)`` from torchvision, or empty if unavailable."""
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return ()
    return ResNet, BasicBlock, Bottleneck


def _child(module: nn.Module, attr: str) -> nn.Module:
    child = getattr(module, attr)
    if not isinstance(child, nn.Module):
        raise _unplaceable(attr, module, f"attribute {attr!r} is not a module")
    return child


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _unplaceable(name: str, module: nn.Module, why: str) -> GameBuildError:
    return GameBuildError(f"cannot place module '{_display(name)}' ({type(module).__name__}) "
                          f"in the game: {why}; {SUPPORTED}")


def _expand(name: str, module: nn.Module) -> list[Op]:
    """The model as an ordered list of ``(dotted name, module)`` items in forward order.

    Sequentials are flattened, torchvision's ResNet is unrolled; blocks stay whole items.
    """
    if type(module) is nn.Sequential or _uses_forward_of(module, nn.Sequential):
        ops: list[Op] = []
        # _modules, not named_children(): the latter hides a module listed twice.
        for child_name, child in module._modules.items():
            if child is not None:
                ops += _expand(_join(name, child_name), child)
        return ops
    tv = _torchvision_resnet()
    if tv and _uses_forward_of(module, tv[0]):
        ops = []
        for attr in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4",
                     "avgpool"):
            ops += _expand(_join(name, attr), _child(module, attr))
        # torchvision's forward calls torch.flatten(x, 1) here; nn.Flatten() is the same op.
        ops.append((_join(name, "<flatten>"), nn.Flatten(1)))
        ops += _expand(_join(name, "fc"), _child(module, "fc"))
        return ops
    return [(name, module)]


def _layer_players(name: str, module: nn.Module, group: int) -> list[Player]:
    """The Kronecker players of a layer: itself, or its fictitious copies (eq. 16), all in
    ``group`` since the copies add into the layer's one output (Fig. 3a)."""
    if isinstance(module, FictitiousLayer):
        return [Player(_join(name, f"players.{i}"), layer, "kron", group)
                for i, layer in enumerate(module.players)]
    return [Player(name, module, "kron", group)]


def _classify(ops: Sequence[Op], group: int) -> list[Player]:
    """Players among a block's inner modules; parameterless ones are plain operations."""
    players = []
    for name, module in ops:
        if isinstance(module, LAYER_MODULES):
            players += _layer_players(name, module, group)
        elif isinstance(module, DIAG_LAYERS):
            players.append(Player(name, module, "diag", group))
        elif _has_params(module):
            raise _unplaceable(name, module, "parametrised module of an unsupported type")
        elif isinstance(module, nn.modules.dropout._DropoutNd):
            raise _unplaceable(name, module, "dropout makes the dynamics random (the update "
                               "pass re-runs each stage); remove it or use nn.Identity")
    return players


def _inner(name: str, module: nn.Module | None) -> list[Op]:
    """The modules of a block part (``None`` / ``Identity`` -> none, Sequential -> flat)."""
    if module is None or type(module) is nn.Identity:
        return []
    ops = _expand(name, module)
    for op_name, op in ops:
        if not isinstance(op, LAYER_MODULES + DIAG_LAYERS) and _has_params(op):
            raise _unplaceable(op_name, op, "parametrised module of an unsupported type")
    return ops


@dataclass
class _Draft:
    """A stage under construction; ``tail`` receives the parameterless modules that follow."""

    kind: str
    name: str
    players: list[Player]
    parts: dict[str, list[Op]] = field(default_factory=dict)
    tail_part: str = ""

    def add_tail(self, op: Op) -> None:
        self.parts[self.tail_part].append(op)

    def build(self) -> Stage:
        p = {key: [_out_of_place(op) for op in ops] for key, ops in self.parts.items()}
        if self.kind == "chain":
            return ChainStage(self.name, p["ops"], self.players)
        if self.kind == "branch":
            return BranchStage(self.name, p["pre"], p["main"], p["carry"], self.players)
        if self.kind == "through":
            return ThroughStage(self.name, p["main"], self.players)
        if self.kind == "merge":
            return MergeStage(self.name, p["main"], p["shortcut"], p["post"], self.players)
        return SumStage(self.name, p["pre"], [p[k] for k in sorted(p) if k.startswith("b")],
                        p["post"], self.players)


def _out_of_place(op: Op) -> Op:
    """A parameterless in-place module (torchvision's ``ReLU(inplace=True)``) is replaced by
    an out-of-place shallow copy: same values, but a player's output seen by a hook or kept
    for autograd / JVP is never overwritten. Parametrised modules are always the model's."""
    name, module = op
    if getattr(module, "inplace", False) is True and not _has_params(module):
        module = copy.copy(module)
        setattr(module, "inplace", False)  # noqa: B010 - nn.Module attribute typing
    return name, module


def _residual_parts(name: str, block: nn.Module) -> tuple[list[list[Op]], list[Op], list[Op]]:
    """(main-path segments, shortcut ops, final ops) of a supported residual block."""
    def ops(*attrs: str) -> list[Op]:
        return [(_join(name, a), _child(block, a)) for a in attrs]

    if _uses_forward_of(block, ResidualBlock):
        return ([ops("conv1", "bn1", "act1"), ops("conv2", "bn2")],
                _inner(_join(name, "shortcut"), _child(block, "shortcut")), ops("act2"))
    tv = _torchvision_resnet()
    shortcut = _inner(_join(name, "downsample"), getattr(block, "downsample", None))
    if _uses_forward_of(block, tv[1]):  # BasicBlock: relu is used twice
        return [ops("conv1", "bn1", "relu"), ops("conv2", "bn2")], shortcut, ops("relu")
    return ([ops("conv1", "bn1", "relu"), ops("conv2", "bn2", "relu"), ops("conv3", "bn3")],
            shortcut, ops("relu"))


def _residual_drafts(name: str, block: nn.Module, pre: list[Op],
                     alignment: Alignment) -> list[_Draft]:
    """Stages of a residual block under an alignment (Fig. 2, Fig. 8a)."""
    segments, shortcut, final = _residual_parts(name, block)
    first = alignment == "first"
    label = _display(name)
    drafts = [_Draft("branch", f"{label}:1", _classify(segments[0], 0) + (
        _classify(shortcut, 1) if first else []),
        {"pre": list(pre), "main": segments[0], "carry": shortcut if first else []})]
    for i, seg in enumerate(segments[1:-1], start=2):
        drafts.append(_Draft("through", f"{label}:{i}", _classify(seg, 0), {"main": seg}))
    drafts.append(_Draft("merge", f"{label}:{len(segments)}", _classify(segments[-1], 0) + (
        [] if first else _classify(shortcut, 0)),
        {"main": segments[-1], "shortcut": [] if first else shortcut, "post": list(final)},
        tail_part="post"))
    return drafts


def _is_residual(module: nn.Module) -> bool:
    tv = _torchvision_resnet()
    return _uses_forward_of(module, ResidualBlock) or bool(
        tv and (_uses_forward_of(module, tv[1]) or _uses_forward_of(module, tv[2])))


def build_game(model: nn.Module, alignment: Alignment = "second") -> Game:
    """Map ``model`` onto a :class:`Game` whose stages reference the model's modules.

    Args:
        model: an ``nn.Sequential`` of supported modules, a supported block, or torchvision's
            ResNet (see the module docstring).
        alignment: where a residual block's shortcut players go: with the block's ``"first"``
            layer (separate output) or its ``"second"`` (joining) layer (Fig. 8a).

    Returns:
        The game; ``game(x)`` equals ``model(x)`` bit for bit and its players hold the very
        parameter objects of ``model``. Player names are the modules' dotted names.

    Raises:
        ValueError: ``alignment`` is not one of ``"first"``, ``"second"``.
        GameBuildError: a module cannot be placed, a module would be a player twice (shared
            weights), or the model has no parametrised layer.
    """
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {', '.join(ALIGNMENTS)}; got {alignment!r}")
    drafts: list[_Draft] = []
    pre: list[Op] = []  # parameterless modules before the first stage
    for name, module in _expand("", model):
        last = drafts[-1] if drafts else None
        if _is_residual(module):
            drafts += _residual_drafts(name, module, pre, alignment)
            pre = []
        elif _uses_forward_of(module, CooperativePair):
            branches = {f"b{i}": [(_join(name, a), _child(module, a))]
                        for i, a in enumerate(("first", "second"))}
            players = _classify(branches["b0"], 0) + _classify(branches["b1"], 0)
            drafts.append(_Draft("sum", _display(name), players,
                                 {"pre": pre, "post": [], **branches}, tail_part="post"))
            pre = []
        elif isinstance(module, LAYER_MODULES):
            drafts.append(_Draft("chain", name, _layer_players(name, module, 0),
                                 {"ops": pre + [(name, module)]}, tail_part="ops"))
            pre = []
        elif isinstance(module, DIAG_LAYERS):
            follows_layer = (last is not None and last.kind == "chain"
                             and isinstance(last.parts["ops"][-1][1], LAYER_MODULES))
            if follows_layer and last is not None:
                last.players.append(Player(name, module, "diag", 0))
                last.add_tail((name, module))
            else:
                drafts.append(_Draft("chain", name, [Player(name, module, "diag", 0)],
                                     {"ops": pre + [(name, module)]}, tail_part="ops"))
                pre = []
        else:
            _classify([(name, module)], 0)  # raises for parametrised / random modules
            if last is None:
                pre.append((name, module))
            else:
                last.add_tail((name, module))
    if not drafts:
        raise GameBuildError(f"model {type(model).__name__} has no parametrised layer, so the "
                             f"game has no players; {SUPPORTED}")
    _check_unique(drafts)
    return Game([d.build() for d in drafts])


def _check_unique(drafts: Sequence[_Draft]) -> None:
    seen: dict[int, str] = {}
    for player in (p for d in drafts for p in d.players):
        if id(player.module) in seen:
            raise GameBuildError(
                f"module '{player.name}' ({type(player.module).__name__}) is called more than "
                f"once (shared weights, first seen as '{seen[id(player.module)]}'); a player "
                "must own its parameters: give each use its own module")
        seen[id(player.module)] = player.name
