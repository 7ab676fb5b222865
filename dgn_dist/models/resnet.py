"""torchvision's ResNet-18 with the CIFAR stem (App. E.1, CIFAR-10/100 in Table 2).

The paper uses "the standard implementation of ResNet18" from PyTorch Hub. For 32x32 inputs
we replace the ImageNet stem (7x7 stride-2 conv + max-pool) by a 3x3 stride-1 conv and no
max-pool, the usual CIFAR variant, so the last stage still sees 4x4 feature maps.
"""

from __future__ import annotations

from torch import nn


def resnet18(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """``torchvision.models.resnet18`` (random init) with the CIFAR stem.

    Args:
        input_shape: ``(C, H, W)``; ``C`` sets the first conv's input channels.
        num_classes: outputs of the final ``fc`` layer.
    """
    import torchvision  # deferred: the small models do not need it

    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model
