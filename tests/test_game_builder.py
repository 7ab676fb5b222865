"""Game construction (DESIGN.md section 2): the game reproduces the model and owns its modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

from dgn_dist.config.schema import ModelConfig
from dgn_dist.game import (
    BranchStage,
    ChainStage,
    Game,
    GameBuildError,
    MergeStage,
    SumStage,
    build_game,
)
from dgn_dist.models import CooperativePair, ResidualBlock, build_model
from dgn_dist.models.resnet import resnet18

ALIGN = ("first", "second")


def _assert_references(game: Game, model: nn.Module) -> None:
    """Players are the model's own modules (dotted names) and cover every parameter once."""
    modules = dict(model.named_modules())
    players = [p for _, p in game.players()]
    for player in players:
        assert modules[player.name] is player.module
    model_params = {id(p) for p in model.parameters()}
    player_params = [id(p) for pl in players for p in pl.parameters()]
    assert len(player_params) == len(set(player_params))
    assert set(player_params) == model_params
    assert {id(p) for p in game.parameters()} == model_params
    named = dict(model.named_parameters())
    for pl in players:
        for name, p in pl.named_parameters():
            assert named[name] is p


def _groups(game: Game) -> list[list[tuple[str, str, int]]]:
    return [[(p.name, p.curvature, p.output_group) for p in s.players] for s in game.stages]


def test_mlp_sequential_bit_exact() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.Tanh(),
                          nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 3))
    game = build_game(model)
    x = torch.randn(3, 3, 2, 2)
    assert torch.equal(game(x), model(x))
    assert _groups(game) == [[("1", "kron", 0)], [("3.0", "kron", 0)], [("4", "kron", 0)]]
    assert all(isinstance(s, ChainStage) for s in game.stages)
    assert game.stages[0].dynamics() == "0 -> 1 -> 2"  # leading Flatten folds into stage 0
    _assert_references(game, model)


def test_conv_bn_relu_sequential() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 2))
    game = build_game(model)
    x = torch.randn(2, 2, 4, 4)
    for mode in (True, False):
        model.train(mode)
        assert torch.equal(game(x), model(x))
    assert _groups(game) == [[("0", "kron", 0), ("1", "diag", 0)], [("5", "kron", 0)]]
    _assert_references(game, model)


def test_batchnorm_not_after_a_layer_is_its_own_stage() -> None:
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3), nn.Tanh(), nn.BatchNorm1d(3),
                          nn.Linear(3, 2))
    game = build_game(model)
    x = torch.randn(3, 4)
    assert torch.equal(game(x), model(x))
    assert _groups(game) == [[("0", "diag", 0)], [("1", "kron", 0)], [("3", "diag", 0)],
                             [("4", "kron", 0)]]


def _residual_model(shortcut: str, batch_norm: bool) -> nn.Sequential:
    out = 2 if shortcut == "identity" else 3
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(),
                         ResidualBlock(2, out, nn.Tanh, batch_norm=batch_norm),
                         nn.Flatten(), nn.Linear(out * 16, 3))


@pytest.mark.parametrize("alignment", ALIGN)
@pytest.mark.parametrize("shortcut,batch_norm", [("identity", False), ("conv", False),
                                                 ("conv", True)])
def test_residual_block_alignments(alignment: str, shortcut: str, batch_norm: bool) -> None:
    model = _residual_model(shortcut, batch_norm)
    game = build_game(model, alignment=alignment)  # type: ignore[arg-type]
    x = torch.randn(2, 1, 4, 4)
    assert torch.equal(game(x), model(x))
    _assert_references(game, model)
    stage_a, stage_b = game.stages[1], game.stages[2]
    assert isinstance(stage_a, BranchStage) and isinstance(stage_b, MergeStage)
    main_a = [("2.conv1", "kron", 0)] + ([("2.bn1", "diag", 0)] if batch_norm else [])
    main_b = [("2.conv2", "kron", 0)] + ([("2.bn2", "diag", 0)] if batch_norm else [])
    sc = [] if shortcut == "identity" else [("2.shortcut.0", "kron")] + (
        [("2.shortcut.1", "diag")] if batch_norm else [])
    groups = _groups(game)
    if alignment == "first":  # shortcut with conv1, separate output (eq. 27)
        assert groups[1] == main_a + [(n, c, 1) for n, c in sc]
        assert groups[2] == main_b
    else:  # shortcut with conv2, adding into the same output
        assert groups[1] == main_a
        assert groups[2] == main_b + [(n, c, 0) for n, c in sc]
    traj = game.trajectory(x)
    z = traj[1][0]
    assert [tuple(s.shape) for s in traj[2]] == [(2, 2 if shortcut == "identity" else 3, 4, 4),
                                                 (2, 2 if alignment == "second" else
                                                  (2 if shortcut == "identity" else 3), 4, 4)]
    if alignment == "second" or shortcut == "identity":
        assert torch.equal(traj[2][1], z)  # the skip tensor carried by a dummy player
    else:
        assert torch.equal(traj[2][1], model[2].shortcut(z))


def test_cooperative_pair_one_stage_one_group() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), CooperativePair.linear(4, 4), nn.Tanh(),
                          CooperativePair.linear(4, 2))
    game = build_game(model)
    x = torch.randn(3, 3)
    assert torch.equal(game(x), model(x))
    assert isinstance(game.stages[1], SumStage)
    assert _groups(game)[1:] == [[("2.first", "kron", 0), ("2.second", "kron", 0)],
                                 [("4.first", "kron", 0), ("4.second", "kron", 0)]]
    _assert_references(game, model)


def test_resnet18_cifar_bit_exact() -> None:
    model = resnet18((3, 32, 32), 10)
    x = torch.randn(2, 3, 32, 32)
    for alignment in ALIGN:
        game = build_game(model, alignment=alignment)  # type: ignore[arg-type]
        with torch.no_grad():
            assert torch.equal(game(x), model(x))
        _assert_references(game, model)
        assert len(game.stages) == 1 + 2 * 8 + 1
        downsample = [(t, p.output_group) for t, p in game.players()
                      if ".downsample." in p.name]
        assert len(downsample) == 6
        kinds = {t: type(game.stages[t]).__name__ for t, _ in downsample}
        assert set(kinds.values()) == {"BranchStage" if alignment == "first" else "MergeStage"}
        assert {g for _, g in downsample} == {1 if alignment == "first" else 0}
    model.eval()
    with torch.no_grad():
        assert torch.equal(build_game(model)(x), model(x))


def test_torchvision_bottleneck_three_stages() -> None:
    down = nn.Sequential(nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8))
    model = nn.Sequential(Bottleneck(4, 2, downsample=down), nn.Flatten(), nn.Linear(8 * 9, 2))
    x = torch.randn(2, 4, 3, 3)
    for alignment in ALIGN:
        game = build_game(model, alignment=alignment)  # type: ignore[arg-type]
        assert torch.equal(game(x), model(x))
        assert [type(s).__name__ for s in game.stages] == [
            "BranchStage", "ThroughStage", "MergeStage", "ChainStage"]
        _assert_references(game, model)


@pytest.mark.parametrize("name,shape", [("digits_resnet", (1, 8, 8)), ("mlp", (1, 4, 4)),
                                        ("mnist_resnet", (1, 8, 8)), ("coop_cnn", (3, 8, 8)),
                                        ("table3_cnn", (3, 8, 8))])
def test_registry_models_bit_exact(name: str, shape: tuple[int, int, int]) -> None:
    model = build_model(ModelConfig(name=name, width=3), shape, 4)  # type: ignore[arg-type]
    x = torch.randn(2, *shape)
    for alignment in ALIGN:
        game = build_game(model, alignment=alignment)  # type: ignore[arg-type]
        assert torch.equal(game(x), model(x))
        _assert_references(game, model)


def test_each_player_called_once_per_stage() -> None:
    model = _residual_model("conv", batch_norm=True)
    game = build_game(model, alignment="first")
    calls: dict[str, int] = {}
    for _, player in game.players():
        player.module.register_forward_hook(
            lambda m, i, o, n=player.name: calls.__setitem__(n, calls.get(n, 0) + 1))
    game(torch.randn(2, 1, 4, 4))
    assert calls == {p.name: 1 for _, p in game.players()}


def test_describe_prints_stages_players_and_shapes() -> None:
    game = build_game(_residual_model("conv", batch_norm=False), alignment="first")
    text = game.describe(torch.randn(2, 1, 4, 4))
    lines = text.splitlines()
    assert len(lines) == len(game.stages) == 4
    assert "2.shortcut.0[kron, g1, 9]" in lines[1] and "BranchStage" in lines[1]
    assert "[(2, 2, 4, 4)] -> [(2, 3, 4, 4), (2, 3, 4, 4)]" in lines[1]
    assert lines[-1].endswith("[(2, 48)] -> [(2, 3)]")


@pytest.mark.parametrize("model,name,kind", [
    (nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.Tanh(), nn.LSTM(3, 3))), "1.1", "LSTM"),
    (nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Linear(3, 2)), "1", "Dropout"),
    (nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)), "1", "LayerNorm"),
    (nn.Sequential(nn.Linear(3, 3), nn.Bilinear(3, 3, 2)), "1", "Bilinear"),
])
def test_unplaceable_module_is_named(model: nn.Module, name: str, kind: str) -> None:
    with pytest.raises(GameBuildError, match=rf"'{name}' \({kind}\).*supported"):
        build_game(model)


def test_custom_parametrised_module_and_shared_weights_rejected() -> None:
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * 2

    with pytest.raises(GameBuildError, match=r"'0' \(Custom\)"):
        build_game(nn.Sequential(Custom()))
    with pytest.raises(GameBuildError, match=r"'<model>' \(Custom\)"):
        build_game(Custom())
    shared = nn.Linear(3, 3)
    with pytest.raises(GameBuildError, match=r"'2' \(Linear\).*first seen as '0'"):
        build_game(nn.Sequential(shared, nn.Tanh(), shared))
    with pytest.raises(GameBuildError, match="no parametrised layer"):
        build_game(nn.Sequential(nn.Tanh()))
    with pytest.raises(ValueError, match="alignment must be one of first, second"):
        build_game(nn.Linear(2, 2), alignment="third")  # type: ignore[arg-type]
    assert issubclass(GameBuildError, ValueError)


def test_player_outputs_not_overwritten_in_place() -> None:
    """torchvision's ReLU(inplace=True) after a BN player must not overwrite its output."""
    model = resnet18((3, 8, 8), 3)
    game = build_game(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for _, player in game.players():
        player.module.register_forward_hook(
            lambda m, i, o, n=player.name: seen.__setitem__(n, (o, o.detach().clone())))
    with torch.no_grad():
        assert torch.equal(game(x), expected)
    assert len(seen) == 41 and all(torch.equal(out, copy) for out, copy in seen.values())
    assert not any(getattr(m, "inplace", False) for m in game.modules())
    assert model.relu.inplace  # the model itself is untouched


def test_describe_batch_of_one_keeps_train_mode_and_running_stats() -> None:
    model = resnet18((3, 8, 8), 3)
    game = build_game(model)
    before = model.bn1.running_mean.clone()
    text = game.describe(torch.randn(1, 3, 8, 8))
    assert text.splitlines()[-1].endswith("[(1, 512)] -> [(1, 3)]")
    assert model.training and all(m.training for m in game.modules())
    assert torch.equal(model.bn1.running_mean, before)
