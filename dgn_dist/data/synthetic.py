"""Synthetic class-conditional images of any shape (tests and benchmarks).

Each class has a smooth template: a coarse Gaussian grid (at most 4x4 per channel) upsampled
bilinearly to ``H x W``. An image is its class template plus white Gaussian noise, scaled to
unit variance per pixel, so a convolutional or linear model can learn the classes quickly
while individual pixels stay noisy. Everything is drawn from a generator seeded by the seed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from dgn_dist.config.schema import DataConfig
from dgn_dist.data.common import DataBundle, DataError, ImageTensorDataset, split_train_val

#: Standard deviation of the per-pixel noise relative to the unit-variance templates.
NOISE_STD = 1.0
#: Largest side of the coarse template grid.
TEMPLATE_GRID = 4


def class_templates(shape: tuple[int, int, int], classes: int, gen: torch.Generator) -> Tensor:
    """``[classes, C, H, W]`` smooth templates with roughly unit variance per pixel."""
    c, h, w = shape
    coarse = torch.randn(classes, c, min(h, TEMPLATE_GRID), min(w, TEMPLATE_GRID),
                         generator=gen)
    smooth = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)
    return smooth / smooth.std(correction=0).clamp_min(1e-6)


def sample_images(templates: Tensor, count: int,
                  gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``count`` images with balanced labels in random order: template + noise."""
    classes = templates.shape[0]
    labels = (torch.arange(count) % classes)[torch.randperm(count, generator=gen)]
    noise = torch.randn((count, *templates.shape[1:]), generator=gen)
    images = (templates[labels] + NOISE_STD * noise) / math.sqrt(1.0 + NOISE_STD**2)
    return images, labels


def build_synthetic(cfg: DataConfig, seed: int) -> DataBundle:
    """Train/test images from ``seed`` (same seed, identical tensors); a stratified
    validation split of ``cfg.val_fraction`` is carved from the training images. The data
    are already standardised by construction (no further normalisation)."""
    if len(cfg.synthetic_shape) != 3 or min(cfg.synthetic_shape) < 1:
        raise DataError(f"data.synthetic_shape must be [C, H, W] with positive entries, got "
                        f"{cfg.synthetic_shape}")
    if cfg.synthetic_classes < 2:
        raise DataError(f"data.synthetic_classes must be >= 2, got {cfg.synthetic_classes}")
    if cfg.synthetic_train_size < 1 or cfg.synthetic_test_size < 1:
        raise DataError("data.synthetic_train_size and data.synthetic_test_size must be >= 1")
    c, h, w = (int(s) for s in cfg.synthetic_shape)
    gen = torch.Generator().manual_seed(seed)
    templates = class_templates((c, h, w), cfg.synthetic_classes, gen)
    train_x, train_y = sample_images(templates, cfg.synthetic_train_size, gen)
    test_x, test_y = sample_images(templates, cfg.synthetic_test_size, gen)
    (train_x, train_y), (val_x, val_y) = split_train_val(train_x, train_y, cfg.val_fraction,
                                                         seed)
    zero, one = [0.0] * c, [1.0] * c
    return DataBundle(
        train=ImageTensorDataset(train_x, train_y, zero, one),
        val=ImageTensorDataset(val_x, val_y, zero, one),
        test=ImageTensorDataset(test_x, test_y, zero, one),
        input_shape=(c, h, w),
        num_classes=cfg.synthetic_classes,
        name="synthetic",
    )
