"""A deterministic, resumable data order.

The order of epoch ``e`` is a permutation drawn from ``(seed, e)`` alone, independent of the
global random state, so a run resumed from a checkpoint that stored ``(epoch, position)``
visits exactly the samples an uninterrupted run would have visited, in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch: a permutation of ``range(num_samples)``."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


class ResumableSampler(Sampler[int]):
    """Yields the indices of one epoch, starting from a given offset.

    Args:
        num_samples: size of the data set.
        seed: run seed; with the epoch number it fixes the order.
    """

    def __init__(self, num_samples: int, seed: int) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and skip its first ``start`` samples (already trained on)."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start must be in [0, {self.num_samples}], got {start}")
        self.epoch = epoch
        self.start = start

    def __iter__(self) -> Iterator[int]:
        order = epoch_permutation(self.num_samples, self.seed, self.epoch)
        return iter(order[self.start:].tolist())

    def __len__(self) -> int:
        return self.num_samples - self.start
