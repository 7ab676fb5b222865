"""The paper's models (App. E.1) in a registry selectable by ``model.name``.

All models except ``resnet18`` (torchvision's) are ``nn.Sequential`` of layers, parameterless
modules, :class:`ResidualBlock` and :class:`CooperativePair`; see :mod:`.blocks`.
"""

from dgn_dist.models.blocks import ActivationFactory, CooperativePair, ResidualBlock
from dgn_dist.models.registry import MODEL_NAMES, build_model

__all__ = ["MODEL_NAMES", "ActivationFactory", "CooperativePair", "ResidualBlock",
           "build_model"]
