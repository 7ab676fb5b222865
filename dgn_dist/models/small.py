"""The paper's small networks (App. E.1) as plain ``nn.Sequential`` models.

Every model here is an ``nn.Sequential`` of Conv2d / Linear layers, parameterless modules
(activations, pooling, ``nn.Flatten``), :class:`ResidualBlock` and :class:`CooperativePair`,
so the game builder can walk it without reading forward code. Builders take the resolved
activation factory and width; :mod:`dgn_dist.models.registry` fills in the paper's defaults.
"""

from __future__ import annotations

from torch import nn

from dgn_dist.models.blocks import ActivationFactory, CooperativePair, ResidualBlock

Shape = tuple[int, int, int]

#: Spatial size of the pooled feature map in front of the affine head of the MNIST/SVHN nets.
HEAD_POOL = 4
#: Hidden units of the first fully connected layer of the Table-3 net.
TABLE3_HIDDEN = 64


def _stem(in_channels: int, width: int, activation: ActivationFactory) -> list[nn.Module]:
    """3x3 conv (padding 1) from the input channels to ``width`` maps, then the activation."""
    return [nn.Conv2d(in_channels, width, 3, padding=1), activation()]


def digits_resnet(input_shape: Shape, num_classes: int, activation: ActivationFactory,
                  width: int) -> nn.Sequential:
    """DIGITS net: stem conv, one residual block (identity shortcut, no BN), affine head.

    App. E.1: 1 residual block, 5 feature maps, 3x3 kernels, Tanh, "an affine mapping at the
    end" (here on the flattened ``width x H x W`` feature map, 320 inputs for 8x8 digits).
    """
    c, h, w = input_shape
    return nn.Sequential(
        *_stem(c, width, activation),
        ResidualBlock(width, width, activation),
        nn.Flatten(),
        nn.Linear(width * h * w, num_classes),
    )


def residual_net(input_shape: Shape, num_classes: int, activation: ActivationFactory,
                 width: int, blocks: int = 3) -> nn.Sequential:
    """MNIST / SVHN net: stem conv, ``blocks`` residual blocks (identity shortcut, no BN).

    App. E.1 fixes 3 blocks of 3x3 convs with 12 (MNIST) / 16 (SVHN) maps and ReLU but does
    not specify the head. We average-pool to ``HEAD_POOL x HEAD_POOL`` before the affine
    head so that its input (``width * 16``) and hence its Kronecker factor stay small.
    """
    c, _, _ = input_shape
    layers: list[nn.Module] = _stem(c, width, activation)
    layers += [ResidualBlock(width, width, activation) for _ in range(blocks)]
    layers += [nn.AdaptiveAvgPool2d(HEAD_POOL), nn.Flatten(),
               nn.Linear(width * HEAD_POOL * HEAD_POOL, num_classes)]
    return nn.Sequential(*layers)


def _conv_out(size: int, stride: int) -> int:
    """Output size of a 3x3 conv with padding 1."""
    return (size + 2 - 3) // stride + 1


def table3_cnn(input_shape: Shape, num_classes: int, activation: ActivationFactory,
               width: int) -> nn.Sequential:
    """Table-3 / Fig.-7 net: 4 conv 3x3 (``width`` = 32 maps), 2 fully connected, ReLU.

    App. E.1 does not give strides or the hidden size; we use stride 2 on the 2nd and 4th
    conv (32x32 -> 8x8, so the first FC layer has 2048 inputs) and ``TABLE3_HIDDEN`` units.
    """
    c, h, w = input_shape
    layers: list[nn.Module] = []
    in_ch = c
    for stride in (1, 2, 1, 2):
        layers += [nn.Conv2d(in_ch, width, 3, stride=stride, padding=1), activation()]
        in_ch = width
        h, w = _conv_out(h, stride), _conv_out(w, stride)
    layers += [nn.Flatten(), nn.Linear(width * h * w, TABLE3_HIDDEN), activation(),
               nn.Linear(TABLE3_HIDDEN, num_classes)]
    return nn.Sequential(*layers)


def coop_cnn(input_shape: Shape, num_classes: int, activation: ActivationFactory,
             width: int) -> nn.Sequential:
    """Fig.-3a cooperative-block net: pairs of parallel layers sharing input and output.

    Stem conv, two :class:`CooperativePair` 3x3 conv blocks (each followed by the
    activation), average pooling to ``HEAD_POOL x HEAD_POOL`` and a cooperative pair of
    Linear layers into the classes. The paper gives no sizes; these keep the net small.
    """
    c, _, _ = input_shape
    return nn.Sequential(
        *_stem(c, width, activation),
        CooperativePair.conv2d(width, width), activation(),
        CooperativePair.conv2d(width, width), activation(),
        nn.AdaptiveAvgPool2d(HEAD_POOL),
        nn.Flatten(),
        CooperativePair.linear(width * HEAD_POOL * HEAD_POOL, num_classes),
    )


def mlp(input_shape: Shape, num_classes: int, activation: ActivationFactory,
        width: int) -> nn.Sequential:
    """Tiny two-hidden-layer perceptron (for tests and smoke runs; not from the paper)."""
    c, h, w = input_shape
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(c * h * w, width), activation(),
        nn.Linear(width, width), activation(),
        nn.Linear(width, num_classes),
    )
