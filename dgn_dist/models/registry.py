"""Model registry: ``build_model(cfg, input_shape, num_classes)`` by name (App. E.1)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from torch import nn

from dgn_dist.config.schema import ModelConfig
from dgn_dist.models import small
from dgn_dist.models.blocks import ActivationFactory
from dgn_dist.models.resnet import resnet18
from dgn_dist.models.shortcut import conv_shortcuts

Builder = Callable[[tuple[int, int, int], int, ActivationFactory, int], nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry.

    Attributes:
        builder: ``(input_shape, num_classes, activation, width) -> nn.Module``.
        activation: the paper's activation (used for ``model.activation = "auto"``).
        width: the paper's feature maps / hidden units (used for ``model.width = 0``).
        fixed: the architecture is torchvision's and ignores activation and width.
    """

    builder: Builder
    activation: str
    width: int
    fixed: bool = False


def _resnet18(input_shape: tuple[int, int, int], num_classes: int,
              activation: ActivationFactory, width: int) -> nn.Module:
    del activation, width  # torchvision's architecture: ReLU, 64 base maps
    return resnet18(input_shape, num_classes)


_REGISTRY: dict[str, ModelSpec] = {
    "digits_resnet": ModelSpec(small.digits_resnet, "tanh", 5),
    "mnist_resnet": ModelSpec(small.residual_net, "relu", 12),
    "svhn_resnet": ModelSpec(small.residual_net, "relu", 16),
    "table3_cnn": ModelSpec(small.table3_cnn, "relu", 32),
    "coop_cnn": ModelSpec(small.coop_cnn, "relu", 12),
    "resnet18": ModelSpec(_resnet18, "relu", 64, fixed=True),
    "mlp": ModelSpec(small.mlp, "tanh", 32),
}

#: Names accepted by :func:`build_model` (the choices of ``ModelConfig.name``).
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)

_ACTIVATIONS: dict[str, ActivationFactory] = {
    "tanh": nn.Tanh,
    "relu": partial(nn.ReLU, inplace=False),
}


def build_model(cfg: ModelConfig, input_shape: tuple[int, int, int],
                num_classes: int) -> nn.Module:
    """Build the model ``cfg.name`` for inputs of shape ``(C, H, W)``.

    Args:
        cfg: model config; ``activation = "auto"`` and ``width = 0`` select the paper's values.
        input_shape: shape of one input image ``(C, H, W)``.
        num_classes: number of output logits.

    Returns:
        The model, in float32 on the CPU with PyTorch's default initialisation.

    Raises:
        ValueError: unknown name, bad shape or class count, or activation/width given for
            ``resnet18`` (whose architecture is torchvision's).
    """
    spec = _REGISTRY.get(cfg.name)
    if spec is None:
        raise ValueError(f"model.name '{cfg.name}' is unknown; valid choices: "
                         f"{', '.join(MODEL_NAMES)}")
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W) with positive entries, got "
                         f"{tuple(input_shape)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    activation = spec.activation if cfg.activation == "auto" else cfg.activation
    if activation not in _ACTIVATIONS:
        raise ValueError(f"model.activation '{cfg.activation}' is unknown; valid choices: "
                         f"auto, {', '.join(_ACTIVATIONS)}")
    if cfg.width < 0:
        raise ValueError(f"model.width must be >= 0 (0 = the paper's value), got {cfg.width}")
    if spec.fixed and (activation != spec.activation or cfg.width not in (0, spec.width)):
        raise ValueError(f"model '{cfg.name}' is torchvision's architecture ({spec.activation},"
                         f" width {spec.width}); leave model.activation = auto and "
                         f"model.width = 0")
    width = cfg.width or spec.width
    model = spec.builder((shape[0], shape[1], shape[2]), num_classes,
                         _ACTIVATIONS[activation], width)
    shortcut = cfg.shortcut
    if shortcut == "conv":
        model = conv_shortcuts(model)
    elif shortcut != "identity":
        raise ValueError(f"model.shortcut '{shortcut}' is unknown; valid choices: identity, conv")
    return model
