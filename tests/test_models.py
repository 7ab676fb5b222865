"""Model registry (App. E.1): shapes, hand-counted parameters, structure the game builder reads."""

from __future__ import annotations

import typing

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from dgn_dist.config.schema import ModelConfig
from dgn_dist.models import MODEL_NAMES, CooperativePair, ResidualBlock, build_model


def conv(cin: int, cout: int, k: int = 3) -> int:
    """Parameters of a conv with bias."""
    return cin * cout * k * k + cout


def lin(fin: int, fout: int) -> int:
    """Parameters of a Linear layer with bias."""
    return fin * fout + fout


# (name, input shape, classes, expected parameters from the architecture of App. E.1)
PAPER_NETS = [
    # stem 1->5, one block of two 5->5 convs, affine head on 5*8*8 maps
    ("digits_resnet", (1, 8, 8), 10, conv(1, 5) + 2 * conv(5, 5) + lin(5 * 8 * 8, 10)),
    # stem 1->12, 3 blocks of two 12->12 convs, head on 12 maps pooled to 4x4
    ("mnist_resnet", (1, 28, 28), 10, conv(1, 12) + 6 * conv(12, 12) + lin(12 * 16, 10)),
    ("svhn_resnet", (3, 32, 32), 10, conv(3, 16) + 6 * conv(16, 16) + lin(16 * 16, 10)),
    # 4 convs with 32 maps (stride 2 on 2nd, 4th: 32 -> 8), FC 2048->64, FC 64->classes
    ("table3_cnn", (3, 32, 32), 10,
     conv(3, 32) + 3 * conv(32, 32) + lin(32 * 8 * 8, 64) + lin(64, 10)),
    # stem, two cooperative conv pairs, cooperative linear pair on 12 maps pooled to 4x4
    ("coop_cnn", (1, 28, 28), 10, conv(1, 12) + 4 * conv(12, 12) + 2 * lin(12 * 16, 10)),
    ("mlp", (1, 8, 8), 10, lin(64, 32) + lin(32, 32) + lin(32, 10)),
]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_names_match_config_choices() -> None:
    choices = typing.get_args(typing.get_type_hints(ModelConfig)["name"])
    assert set(MODEL_NAMES) == set(choices)


@pytest.mark.parametrize(("name", "shape", "classes", "expected"), PAPER_NETS)
def test_parameter_count_matches_architecture(name: str, shape: tuple[int, int, int],
                                              classes: int, expected: int) -> None:
    model = build_model(ModelConfig(name=name), shape, classes)  # type: ignore[arg-type]
    assert n_params(model) == expected


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (3, 15, 17)])
def test_forward_shape(name: str, shape: tuple[int, int, int]) -> None:
    model = build_model(ModelConfig(name=name), shape, 7)  # type: ignore[arg-type]
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


def test_paper_defaults_and_overrides() -> None:
    digits = build_model(ModelConfig(name="digits_resnet"), (1, 8, 8), 10)
    assert isinstance(digits[1], nn.Tanh) and isinstance(digits[2].act1, nn.Tanh)
    assert digits[0].out_channels == 5
    mnist = build_model(ModelConfig(name="mnist_resnet"), (1, 28, 28), 10)
    assert isinstance(mnist[1], nn.ReLU) and not mnist[1].inplace
    assert sum(isinstance(m, ResidualBlock) for m in mnist) == 3
    assert build_model(ModelConfig(name="svhn_resnet"), (3, 32, 32), 10)[0].out_channels == 16
    wide = build_model(ModelConfig(name="digits_resnet", activation="relu", width=7), (1, 8, 8),
                       10)
    assert isinstance(wide[1], nn.ReLU) and wide[0].out_channels == 7
    assert n_params(wide) == conv(1, 7) + 2 * conv(7, 7) + lin(7 * 64, 10)
    for block in (m for m in mnist if isinstance(m, ResidualBlock)):
        assert isinstance(block.shortcut, nn.Identity)
        assert isinstance(block.bn1, nn.Identity) and isinstance(block.bn2, nn.Identity)


def test_resnet18_cifar_stem() -> None:
    model = build_model(ModelConfig(name="resnet18"), (3, 32, 32), 100)
    assert isinstance(model, torchvision.models.ResNet)
    assert model.conv1.weight.shape == (64, 3, 3, 3) and model.conv1.stride == (1, 1)
    assert model.conv1.bias is None
    assert isinstance(model.maxpool, nn.Identity)
    reference = torchvision.models.resnet18(num_classes=100)  # 7x7 stem: 64*3*7*7 weights
    assert n_params(model) == n_params(reference) - 64 * 3 * 7 * 7 + 64 * 3 * 3 * 3
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


ALLOWED = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.Tanh, nn.ReLU, nn.Flatten,
           nn.AdaptiveAvgPool2d, ResidualBlock, CooperativePair)


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n != "resnet18"])
def test_sequential_contract_each_module_called_once(name: str) -> None:
    model = build_model(ModelConfig(name=name), (1, 12, 12), 4)  # type: ignore[arg-type]
    assert isinstance(model, nn.Sequential)
    assert all(isinstance(child, ALLOWED) for child in model), [type(c) for c in model]
    calls: dict[str, int] = {}
    for mod_name, module in model.named_modules():
        if mod_name:
            module.register_forward_hook(
                lambda *_, key=mod_name: calls.__setitem__(key, calls.get(key, 0) + 1))
    model(torch.randn(2, 1, 12, 12))
    assert set(calls) == {n for n, _ in model.named_modules() if n}
    assert set(calls.values()) == {1}
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_residual_block_equals_formula() -> None:
    torch.manual_seed(1)
    block = ResidualBlock(4, 4, nn.Tanh).double()
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    h = torch.tanh(F.conv2d(x, block.conv1.weight, block.conv1.bias, padding=1))
    expected = torch.tanh(F.conv2d(h, block.conv2.weight, block.conv2.bias, padding=1) + x)
    torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-12)


def test_residual_block_projection_with_batchnorm_equals_formula() -> None:
    torch.manual_seed(2)
    block = ResidualBlock(3, 6, nn.ReLU, stride=2, batch_norm=True).double()
    for bn in (block.bn1, block.bn2, block.shortcut[1]):
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)

    def bn(t: torch.Tensor, m: nn.Module) -> torch.Tensor:
        return F.batch_norm(t, None, None, m.weight, m.bias, training=True, eps=m.eps)

    sc_conv = block.shortcut[0]
    assert sc_conv.kernel_size == (1, 1) and sc_conv.stride == (2, 2) and sc_conv.bias is None
    h = F.relu(bn(F.conv2d(x, block.conv1.weight, stride=2, padding=1), block.bn1))
    main = bn(F.conv2d(h, block.conv2.weight, padding=1), block.bn2)
    expected = F.relu(main + bn(F.conv2d(x, sc_conv.weight, stride=2), block.shortcut[1]))
    torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-12)
    assert block(x).shape == (4, 6, 4, 4)


def test_cooperative_pair_sums_parallel_layers() -> None:
    pair = CooperativePair.linear(5, 3).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    weight = pair.first.weight + pair.second.weight
    bias = pair.first.bias + pair.second.bias
    torch.testing.assert_close(pair(x), x @ weight.T + bias, rtol=0, atol=1e-12)
    assert not torch.equal(pair.first.weight, pair.second.weight)  # independent init
    with pytest.raises(ValueError, match="identical shapes"):
        CooperativePair(nn.Linear(5, 3), nn.Linear(5, 4))
    with pytest.raises(ValueError, match="two nn.Conv2d or two nn.Linear"):
        CooperativePair(nn.Linear(5, 3), nn.Conv2d(5, 3, 1))


def test_errors_name_the_choices() -> None:
    with pytest.raises(ValueError, match="model.name 'vgg' is unknown.*digits_resnet"):
        build_model(ModelConfig(name="vgg"), (1, 8, 8), 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="resnet18"):
        build_model(ModelConfig(name="resnet18", activation="tanh"), (3, 32, 32), 10)
    with pytest.raises(ValueError, match="input_shape"):
        build_model(ModelConfig(name="mlp"), (8, 8), 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="in-place"):
        ResidualBlock(2, 2, lambda: nn.ReLU(inplace=True))
