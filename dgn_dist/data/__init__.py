"""Data sets of the paper (App. E.1) as in-memory tensor datasets: ``build_data(cfg, seed)``.

``digits`` ships with scikit-learn; ``mnist``, ``svhn``, ``cifar10``, ``cifar100`` are read
from ``data.root`` in torchvision's layout (:mod:`.vision`); ``synthetic`` is generated. With
``data.loader = "ffcv"`` the splits come from ``.beton`` files instead (:mod:`.ffcv`).
"""

from dgn_dist.data.common import (
    DataBundle,
    DataError,
    ImageTensorDataset,
    channel_stats,
    random_crop_flip,
    stratified_split,
)
from dgn_dist.data.ffcv import BetonBundle, BetonSplit
from dgn_dist.data.registry import DATASET_NAMES, build_data, resolve_augment

__all__ = ["DATASET_NAMES", "BetonBundle", "BetonSplit", "DataBundle", "DataError",
           "ImageTensorDataset", "build_data", "channel_stats", "random_crop_flip",
           "resolve_augment", "stratified_split"]
