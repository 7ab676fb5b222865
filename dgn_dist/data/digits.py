"""DIGITS: the 1797 8x8 handwritten digits that ship with scikit-learn (no download)."""

from __future__ import annotations

import torch

from dgn_dist.config.schema import DataConfig
from dgn_dist.data.common import (
    DataBundle,
    ImageTensorDataset,
    channel_stats,
    split_train_val,
    stratified_split,
)

#: Offset between the seeds of the train/test split and the train/val split.
VAL_SEED_OFFSET = 7919


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 images as float32 ``[N, 1, 8, 8]`` (pixel values 0..16) and int64 labels."""
    from sklearn.datasets import load_digits  # deferred: sklearn is slow to import

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    return images, labels


def build_digits(cfg: DataConfig, seed: int) -> DataBundle:
    """Stratified train/test split (``cfg.test_fraction``) from ``seed``, a stratified
    validation split (``cfg.val_fraction``) of the training part, and standardisation with
    the mean and std over all pixels of the final training split (App. E.1: "we
    preprocessed all datasets with standardization"); val and test use the same statistics.
    """
    images, labels = load_digits_tensors()
    train_idx, test_idx = stratified_split(labels, cfg.test_fraction, seed)
    (train_x, train_y), (val_x, val_y) = split_train_val(
        images[train_idx], labels[train_idx], cfg.val_fraction, seed + VAL_SEED_OFFSET)
    mean, std = channel_stats(train_x)
    return DataBundle(
        train=ImageTensorDataset(train_x, train_y, mean, std),
        val=ImageTensorDataset(val_x, val_y, mean, std),
        test=ImageTensorDataset(images[test_idx], labels[test_idx], mean, std),
        input_shape=(1, 8, 8),
        num_classes=10,
        name="digits",
    )
