"""Shared pieces of the data sets: the bundle, the error, the in-memory dataset, splits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import Dataset

#: Padding of the random crop (App. E.1 augmentation of CIFAR-100).
CROP_PADDING = 4


class DataError(ValueError):
    """A data set cannot be built: missing or malformed files, or an invalid setting."""


class ImageTensorDataset(Dataset[tuple[Tensor, Tensor]]):
    """Images held in memory, normalised per channel on access.

    Item ``i`` is ``((images[i] * scale [augmented] - mean) / std, labels[i])`` as a float32
    ``[C, H, W]`` tensor and an int64 scalar tensor. Keeping ``uint8`` images with
    ``scale = 1/255`` stores CIFAR in a quarter of the float memory.

    Args:
        images: ``[N, C, H, W]`` tensor (any real dtype).
        labels: ``[N]`` integer labels.
        mean: per-channel means ``[C]`` of the scaled images (subtracted).
        std: per-channel standard deviations ``[C]`` (divided by).
        scale: factor applied to the stored values before normalisation.
        augment: random crop (padding ``CROP_PADDING``, zeros, i.e. black before
            normalisation) and horizontal flip, drawn from torch's global RNG so that a
            checkpointed RNG state reproduces the same augmented batches.
    """

    def __init__(self, images: Tensor, labels: Tensor, mean: Sequence[float] | Tensor,
                 std: Sequence[float] | Tensor, scale: float = 1.0,
                 augment: bool = False) -> None:
        if images.dim() != 4 or labels.shape != (images.shape[0],):
            raise DataError(f"images must be [N, C, H, W] and labels [N]; got "
                            f"{tuple(images.shape)} and {tuple(labels.shape)}")
        channels = images.shape[1]
        self.images = images
        self.labels = labels.to(torch.int64)
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(channels, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(channels, 1, 1)
        if bool((self.std <= 0).any()):
            raise DataError(f"per-channel std must be positive, got {self.std.flatten()}")
        self.scale = float(scale)
        self.augment = augment

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x = self.images[index].to(torch.float32) * self.scale
        if self.augment:
            x = random_crop_flip(x)
        return (x - self.mean) / self.std, self.labels[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Tensor]]:
        """Batched fetch used by ``DataLoader``: one normalisation for the whole batch.

        Draws the augmentation in the same order as ``[self[i] for i in indices]``, so both
        paths give identical tensors from the same RNG state.
        """
        index = torch.as_tensor(indices, dtype=torch.int64)
        x = self.images[index].to(torch.float32) * self.scale
        if self.augment:
            x = torch.stack([random_crop_flip(img) for img in x])
        x = (x - self.mean) / self.std
        return list(zip(x.unbind(0), self.labels[index].unbind(0), strict=True))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        _, c, h, w = self.images.shape
        return int(c), int(h), int(w)


def random_crop_flip(x: Tensor, padding: int = CROP_PADDING) -> Tensor:
    """Zero-pad ``x`` [C, H, W] by ``padding``, crop back to ``H x W`` at a random offset,
    then flip horizontally with probability 1/2 (torchvision's RandomCrop + RandomHorizontal
    Flip), drawing from torch's global RNG."""
    _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    top = int(torch.randint(0, 2 * padding + 1, (1,)))
    left = int(torch.randint(0, 2 * padding + 1, (1,)))
    out = padded[:, top:top + h, left:left + w]
    if bool(torch.rand(()) < 0.5):
        out = out.flip(-1)
    return out


@dataclass
class DataBundle:
    """The splits of one data set and what a model needs to know about it.

    Attributes:
        train: training split (augmented when the config asks for it).
        val: validation split carved from the training data (may be empty).
        test: test split.
        input_shape: ``(C, H, W)`` of one image.
        num_classes: number of classes (labels are ``0 .. num_classes - 1``).
        name: data set name (``DataConfig.dataset``).
    """

    train: ImageTensorDataset
    val: ImageTensorDataset
    test: ImageTensorDataset
    input_shape: tuple[int, int, int]
    num_classes: int
    name: str


def stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Split indices into ``(keep, held)`` with ``held`` a stratified ``fraction``.

    The held-out size is ``round(fraction * N)``, allocated to the classes in proportion to
    their counts (largest remainder), and the members of each class are drawn at random
    from ``seed``. Both index tensors are sorted.

    Raises:
        DataError: ``fraction`` outside ``[0, 1)``.
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"split fraction must be in [0, 1), got {fraction}")
    labels = labels.to(torch.int64)
    n = labels.numel()
    classes, counts = torch.unique(labels, return_counts=True)
    quota = counts.to(torch.float64) * fraction
    take = quota.floor().to(torch.int64)
    short = round(fraction * n) - int(take.sum())
    if short > 0:  # largest remainders first, ties to the smaller class label
        order = torch.argsort(quota - take, descending=True, stable=True)
        take[order[:short]] += 1
    gen = torch.Generator().manual_seed(seed)
    held: list[Tensor] = []
    for cls, k in zip(classes.tolist(), take.tolist(), strict=True):
        members = torch.nonzero(labels == cls).flatten()
        held.append(members[torch.randperm(members.numel(), generator=gen)[:k]])
    held_idx = torch.sort(torch.cat(held)).values if held else torch.empty(0, dtype=torch.int64)
    mask = torch.ones(n, dtype=torch.bool)
    mask[held_idx] = False
    return torch.nonzero(mask).flatten(), held_idx


def channel_stats(images: Tensor, scale: float = 1.0,
                  chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of ``images * scale`` over N, H and W.

    Accumulates in float64 over chunks of images, so 50k CIFAR images need little memory.

    Raises:
        DataError: no images, or a channel with zero variance.
    """
    if images.shape[0] == 0:
        raise DataError("cannot compute normalisation statistics of an empty training split")
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for start in range(0, images.shape[0], chunk):
        x = images[start:start + chunk].to(torch.float64) * scale
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0.0)
    if bool((var <= 0).any()):
        raise DataError("a channel of the training images is constant; cannot standardise")
    return mean.tolist(), var.sqrt().tolist()


def split_train_val(images: Tensor, labels: Tensor, val_fraction: float,
                    seed: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Carve a stratified validation split of ``val_fraction`` from the training data."""
    keep, held = stratified_split(labels, val_fraction, seed)
    return (images[keep], labels[keep]), (images[held], labels[held])
