"""``build_data(cfg, seed)``: the data set named by ``data.dataset``."""

from __future__ import annotations

from dgn_dist.config.schema import DataConfig
from dgn_dist.data.common import DataBundle, DataError
from dgn_dist.data.digits import build_digits
from dgn_dist.data.ffcv import BetonBundle, build_ffcv_data
from dgn_dist.data.synthetic import build_synthetic

#: Names accepted by :func:`build_data` (the choices of ``DataConfig.dataset``).
DATASET_NAMES: tuple[str, ...] = ("digits", "mnist", "svhn", "cifar10", "cifar100",
                                  "synthetic")
_AUGMENT_CHOICES = ("auto", "none", "crop_flip")


def resolve_augment(cfg: DataConfig) -> bool:
    """``auto`` = random crop (padding 4) + horizontal flip for cifar100 only (App. E.1);
    ``crop_flip`` forces it for any data set; ``none`` disables it."""
    if cfg.augment not in _AUGMENT_CHOICES:
        raise DataError(f"data.augment '{cfg.augment}' is unknown; valid choices: "
                        f"{', '.join(_AUGMENT_CHOICES)}")
    if cfg.augment == "auto":
        return cfg.dataset == "cifar100"
    return cfg.augment == "crop_flip"


def build_data(cfg: DataConfig, seed: int) -> DataBundle | BetonBundle:
    """Build train / val / test splits of ``cfg.dataset`` (from ``.beton`` files when
    ``cfg.loader == "ffcv"``, see :mod:`dgn_dist.data.ffcv`).

    Args:
        cfg: the data config.
        seed: seeds the splits (and the synthetic images); augmentation draws from torch's
            global RNG.

    Raises:
        DataError: unknown data set, invalid fractions, missing or malformed files.
    """
    if cfg.dataset not in DATASET_NAMES:
        raise DataError(f"data.dataset '{cfg.dataset}' is unknown; valid choices: "
                        f"{', '.join(DATASET_NAMES)}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.dataset == "digits" and not 0.0 < cfg.test_fraction < 1.0:
        raise DataError(f"data.test_fraction must be in (0, 1), got {cfg.test_fraction}")
    augment = resolve_augment(cfg)
    if cfg.loader == "ffcv":
        return build_ffcv_data(cfg, seed, augment)
    if cfg.dataset == "digits":
        bundle = build_digits(cfg, seed)
    elif cfg.dataset == "synthetic":
        bundle = build_synthetic(cfg, seed)
    else:
        from dgn_dist.data.vision import build_vision  # deferred: imports scipy/torchvision

        return build_vision(cfg.dataset, cfg.root, cfg.download, cfg.val_fraction, seed,
                            augment)
    bundle.train.augment = augment
    return bundle
