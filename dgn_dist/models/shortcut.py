"""1x1-conv shortcuts for the paper's small residual nets (``model.shortcut = "conv"``).

App. E.1's Table-2 nets use identity shortcuts. An identity shortcut is a dummy player, so
both alignments of Fig. 8a give the same game. Table 4 uses "the same architecture as in
Fig. 2" whose block has a shortcut *module*; with a parametrised shortcut the alignment
decides whether that player sits with the block's first layer (a separate output, eq. 27) or
with the layer it joins (a shared output), and DGNOpt's updates differ (Fig. 8a).
"""

from __future__ import annotations

from torch import nn

from dgn_dist.models.blocks import ResidualBlock


def conv_shortcuts(model: nn.Module) -> nn.Module:
    """Replace the identity shortcut of every :class:`ResidualBlock` in ``model`` by a 1x1
    conv (stride of the block's first conv; bias as its convs), in place.

    Blocks that already project keep their shortcut. The new convs get PyTorch's default
    initialisation from the global RNG after the rest of the model was built, so the other
    layers are initialised exactly as with identity shortcuts.

    Returns:
        ``model``.

    Raises:
        ValueError: ``model`` has no :class:`ResidualBlock`.
    """
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    if not blocks:
        raise ValueError(f"model.shortcut='conv' needs a residual net (digits_resnet, "
                         f"mnist_resnet, svhn_resnet); {type(model).__name__} has no "
                         "ResidualBlock: use model.shortcut='identity'")
    for block in blocks:
        if type(block.shortcut) is not nn.Identity:
            continue
        conv1, conv2 = block.conv1, block.conv2
        assert isinstance(conv1, nn.Conv2d) and isinstance(conv2, nn.Conv2d)
        block.shortcut = nn.Sequential(nn.Conv2d(
            conv1.in_channels, conv2.out_channels, 1, stride=(conv1.stride[0], conv1.stride[1]),
            bias=conv1.bias is not None))
    return model
