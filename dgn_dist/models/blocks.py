"""Building blocks whose structure the game builder reads (DESIGN.md section 2).

Both blocks keep every computation inside named child modules, each called exactly once per
forward, so hooks see one input and one output per call and the game builder can map the
block onto stages without knowing its forward code.

* :class:`ResidualBlock` mirrors torchvision's ``BasicBlock`` attribute names (``conv1``,
  ``bn1``, ``conv2``, ``bn2``, shortcut) so one mapping serves the paper's small residual nets
  and torchvision's ResNet-18. It is the block of Fig. 2; App. E.1 uses it with an identity
  shortcut and without BatchNorm.
* :class:`CooperativePair` is the cooperative block of Fig. 3a: two parallel layers that share
  their input and add their outputs.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

ActivationFactory = Callable[[], nn.Module]


class ResidualBlock(nn.Module):
    """``act2(bn2(conv2(act1(bn1(conv1(x))))) + shortcut(x))`` (Fig. 2).

    Args:
        in_channels: feature maps entering the block.
        out_channels: feature maps leaving the block.
        activation: factory of a fresh parameterless activation module (e.g. ``nn.Tanh``);
            it must not be in-place, since ``x`` is reused by the shortcut.
        stride: stride of ``conv1`` (and of the projection shortcut).
        batch_norm: add BatchNorm after each conv (convs then have no bias); without it
            ``bn1``/``bn2`` are ``nn.Identity`` and the convs carry a bias.

    The shortcut is ``nn.Identity`` when the shape is unchanged, otherwise a 1x1 conv with
    the block's stride (followed by BatchNorm when ``batch_norm``), as in torchvision.
    """

    def __init__(self, in_channels: int, out_channels: int, activation: ActivationFactory,
                 stride: int = 1, batch_norm: bool = False) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1 or stride < 1:
            raise ValueError(
                f"ResidualBlock needs positive in_channels, out_channels and stride; got "
                f"{in_channels}, {out_channels}, {stride}")
        bias = not batch_norm
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1,
                               bias=bias)
        self.bn1: nn.Module = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()
        self.act1 = activation()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=bias)
        self.bn2: nn.Module = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()
        self.shortcut: nn.Module
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 1, stride=stride,
                                                 bias=bias)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_channels))
            self.shortcut = nn.Sequential(*layers)
        self.act2 = activation()
        for act in (self.act1, self.act2):
            if getattr(act, "inplace", False):
                raise ValueError("ResidualBlock activations must not be in-place; pass e.g. "
                                 "nn.ReLU (inplace=False)")

    def forward(self, x: Tensor) -> Tensor:
        main = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(main + self.shortcut(x))


class CooperativePair(nn.Module):
    """``first(x) + second(x)``: two parallel layers sharing input and output (Fig. 3a).

    Args:
        first: a ``nn.Conv2d`` or ``nn.Linear``.
        second: a layer of the same type and the same weight shape (and conv geometry).

    Use :meth:`conv2d` / :meth:`linear` to build a pair of freshly initialised layers.
    """

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        layer_types = (nn.Conv2d, nn.Linear)
        if not (isinstance(first, layer_types) and isinstance(second, layer_types)
                and type(first) is type(second)):
            raise ValueError(
                "CooperativePair needs two nn.Conv2d or two nn.Linear layers; got "
                f"{type(first).__name__} and {type(second).__name__}")
        if first.weight.shape != second.weight.shape or (first.bias is None) != (
                second.bias is None):
            raise ValueError(
                "CooperativePair layers must have identical shapes; got weights "
                f"{tuple(first.weight.shape)} and {tuple(second.weight.shape)}")
        if isinstance(first, nn.Conv2d) and isinstance(second, nn.Conv2d):
            geometry = ("stride", "padding", "dilation", "groups", "padding_mode")
            if any(getattr(first, g) != getattr(second, g) for g in geometry):
                raise ValueError("CooperativePair convs must share stride, padding, dilation, "
                                 "groups and padding_mode")
        self.first = first
        self.second = second

    @classmethod
    def conv2d(cls, in_channels: int, out_channels: int, kernel_size: int = 3,
               stride: int = 1, padding: int = 1) -> CooperativePair:
        """Two parallel ``nn.Conv2d(in_channels, out_channels, kernel_size, ...)``."""
        def make() -> nn.Conv2d:
            return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                             padding=padding)
        return cls(make(), make())

    @classmethod
    def linear(cls, in_features: int, out_features: int) -> CooperativePair:
        """Two parallel ``nn.Linear(in_features, out_features)``."""
        return cls(nn.Linear(in_features, out_features), nn.Linear(in_features, out_features))

    def forward(self, x: Tensor) -> Tensor:
        return self.first(x) + self.second(x)
