"""The per-module tangent rules (dgn_dist.dgnopt.tangents) equal torch.func's forward mode.

Float64, every stage of games that cover each rule: Linear/Tanh/Sigmoid chains, conv + BatchNorm
(batch and running statistics) + in-place ReLU residual blocks with 1x1-conv shortcuts under
both alignments, torchvision's ResNet-18 (max pooling through the generic rule), fictitious
players and a cooperative pair (sums), a LayerNorm player and an in-place LeakyReLU (generic
rule), and a stage without ``flow`` (whole-stage fallback).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dgn_dist.dgnopt.autodiff import jvp_params, jvp_state, vjp
from dgn_dist.dgnopt.capture import frozen_batchnorm
from dgn_dist.dgnopt.tangents import Linearization, forward_with_tangent
from dgn_dist.game import ChainStage, Game, Player, Stage, State, build_game
from dgn_dist.game.fictitious import split_players
from dgn_dist.models.blocks import CooperativePair, ResidualBlock


def _bn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3),
                         nn.ReLU(inplace=True),
                         ResidualBlock(3, 4, nn.ReLU, stride=2,
                                       batch_norm=True),
                         ResidualBlock(4, 4, nn.ReLU, batch_norm=True),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def _mixed_net() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.Sigmoid(), nn.Linear(6, 6),
                         nn.LeakyReLU(0.1, inplace=True),
                         CooperativePair.linear(6, 4), nn.Tanh(), nn.Linear(4, 3))


def _layer_norm_game(alignment: str) -> Game:
    """A parametrised module without a rule of its own (LayerNorm, a diagonal player)."""
    lin, norm, head = nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 3)
    return Game([ChainStage("ln", [("lin", lin), ("norm", norm), ("act", nn.Tanh())],
                            [Player("lin", lin, "kron"), Player("norm", norm, "diag")]),
                 ChainStage("head", [("head", head)], [Player("head", head, "kron")])])


def _fictitious_net() -> nn.Module:
    return split_players(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(),
                                       nn.Flatten(), nn.Linear(3 * 6 * 6, 3)), 3)


def _torchvision_resnet() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.resnet18(num_classes=3)


CASES = {
    "bn_first": (_bn_net, "first", (2, 6, 6), True),
    "bn_second": (_bn_net, "second", (2, 6, 6), True),
    "bn_running_stats": (_bn_net, "second", (2, 6, 6), False),
    "mixed": (_mixed_net, "second", (5,), True),
    "layer_norm": (_layer_norm_game, "second", (5,), True),
    "fictitious": (_fictitious_net, "second", (2, 6, 6), True),
    "torchvision_resnet18": (_torchvision_resnet, "second", (3, 16, 16), True),
}


def _states(game: Game, x: torch.Tensor) -> list[State]:
    with torch.no_grad():
        return game.trajectory(x)


def _reference(stage: Stage, state: State, dx: State | None, params: list[nn.Parameter],
               dirs: list[torch.Tensor]) -> State:
    parts = []
    if dx is not None:
        parts.append(jvp_state(stage, state, dx))
    if params:
        parts.append(jvp_params(stage, params, state, dirs))
    return tuple(sum(p[i] for p in parts) for i in range(len(parts[0])))


@pytest.mark.parametrize("case", sorted(CASES))
def test_linearization_equals_torch_forward_mode(case: str) -> None:
    make, alignment, shape, training = CASES[case]
    torch.manual_seed(0)
    model = make(alignment) if make is _layer_norm_game else make()
    model = model.double().train(training)
    if not training:  # running statistics that are not the batch's
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    game = model if isinstance(model, Game) else build_game(model, alignment)
    x = torch.randn(4, *shape, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    with frozen_batchnorm(game):
        states = _states(game, x)
        for t, stage in enumerate(game.stage_list()):
            lin = Linearization(stage, states[t])
            lin.record()
            assert lin.calls is not None, stage.name
            dx = tuple(torch.randn(s.shape, generator=gen, dtype=s.dtype) for s in states[t])
            params = [p for p in stage.parameters()]
            # every other parameter: the product must start at the right module
            chosen = params[t % 2::2]
            dirs = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in chosen]
            for args in ((dx, [], []), (None, chosen, dirs), (dx, chosen, dirs),
                         (None, params, [torch.randn_like(p) for p in params])):
                if args[0] is None and not args[1]:
                    continue
                got = lin.jvp(args[0], args[1], args[2])
                want = _reference(stage, states[t], *args)
                for g, w in zip(got, want, strict=True):
                    torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10,
                                               msg=f"{case} stage {stage.name}")


@pytest.mark.parametrize("case", ["bn_second", "mixed", "torchvision_resnet18"])
def test_forward_with_tangent_gives_primal_graph_and_tangent(case: str) -> None:
    make, alignment, shape, _ = CASES[case]
    torch.manual_seed(0)
    model = make().double()
    game = build_game(model, alignment)
    x = torch.randn(4, *shape, dtype=torch.float64)
    with frozen_batchnorm(game):
        states = _states(game, x)
        for t, stage in enumerate(game.stage_list()):
            dx = tuple(torch.randn_like(s) for s in states[t])
            params = list(stage.parameters())
            with torch.enable_grad():
                out, tangent = forward_with_tangent(stage, states[t], dx)
                want_out = stage(states[t])
                cot = tuple(torch.randn_like(o) for o in out)
                got_grads = vjp(out, cot, params)
                want_grads = vjp(want_out, cot, params)
            for o, w in zip(out, want_out, strict=True):
                torch.testing.assert_close(o, w, rtol=0, atol=0)
            for g, w in zip(tangent, jvp_state(stage, states[t], dx), strict=True):
                torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)
            for g, w in zip(got_grads, want_grads, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


class _Opaque(Stage):
    """A stage without ``flow``: differentiated as a whole."""

    def __init__(self) -> None:
        super().__init__("opaque")
        self.lin = nn.Linear(3, 3).double()
        self.players = [Player("lin", self.lin, "kron")]

    def forward(self, state: State) -> State:
        return (torch.tanh(self.lin(state[0])) * 2,)


def test_stage_without_flow_falls_back_to_torch_func() -> None:
    stage = _Opaque()
    x = (torch.randn(4, 3, dtype=torch.float64),)
    dx = (torch.randn(4, 3, dtype=torch.float64),)
    with pytest.raises(NotImplementedError, match="_Opaque does not expose its data flow"):
        stage.flow(x, lambda ops, value: value)
    lin = Linearization(stage, x)
    lin.record()
    assert lin.calls is None
    params = [stage.lin.weight]
    dirs = [torch.randn_like(stage.lin.weight)]
    torch.testing.assert_close(lin.jvp(dx, params, dirs)[0],
                               _reference(stage, x, dx, params, dirs)[0])
    out, tangent = forward_with_tangent(stage, x, dx)
    torch.testing.assert_close(out[0], stage(x)[0])
    torch.testing.assert_close(tangent[0], jvp_state(stage, x, dx)[0])


def test_in_place_modules_in_a_hand_built_stage() -> None:
    """The builder makes modules out of place; a hand-built stage may not: the recorded
    BatchNorm output stays the pre-activation, and both products still equal torch.func."""
    torch.manual_seed(0)
    conv, norm = nn.Conv2d(2, 3, 3, padding=1).double(), nn.BatchNorm2d(3).double()
    stage = ChainStage("s", [("conv", conv), ("norm", norm), ("relu", nn.ReLU(inplace=True)),
                             ("leaky", nn.LeakyReLU(0.2, inplace=True))],
                       [Player("conv", conv, "kron"), Player("norm", norm, "diag")])
    x = (torch.randn(4, 2, 5, 5, dtype=torch.float64),)
    dx = (torch.randn_like(x[0]),)
    params = list(stage.parameters())
    dirs = [torch.randn_like(p) for p in params]
    with frozen_batchnorm(stage):
        lin = Linearization(stage, x)
        lin.record()
        assert lin.calls is not None
        bn_call = next(c for c in lin.calls if c.module is norm)
        assert bn_call.y is not None and bool((bn_call.y < 0).any())
        torch.testing.assert_close(lin.jvp(dx, params, dirs)[0],
                                   _reference(stage, x, dx, params, dirs)[0])
        with torch.enable_grad():
            out, tangent = forward_with_tangent(stage, x, dx)
        torch.testing.assert_close(out[0], stage(x)[0])
        torch.testing.assert_close(tangent[0], jvp_state(stage, x, dx)[0])
