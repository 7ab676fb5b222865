"""The FFCV loaders (``data.loader = "ffcv"``) over the ``.beton`` files of :mod:`.beton`.

Pipelines: decode, then for training with augmentation a random horizontal flip and a random
translation by up to 4 pixels with black fill (= torchvision's ``RandomCrop(32, padding=4)``,
App. E.1), then normalisation with the training split's statistics. On CPU the normalisation
is FFCV's JIT-compiled ``NormalizeImage``; under CUDA the uint8 batch is moved with
``ToDevice`` and converted and normalised on the GPU. Training order is FFCV's ``RANDOM``
order seeded by ``run.seed`` and the epoch; under an initialised ``torch.distributed`` process
group each rank reads its own shard (FFCV's ``distributed=True``, which follows torch's
``DistributedSampler``: rank and world size come from the process group; like it, the last
round is padded with repeated samples when the split does not divide by the world size).
Augmentation draws from numba's RNG, so unlike the torch path it is not bit-reproducible.
Numba compiles each pipeline once per process (seconds; ~20 s for the first).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from dgn_dist.config.schema import DataConfig
from dgn_dist.data.beton import (
    FFCV_DATASETS,
    BetonMeta,
    beton_labels,
    default_beton_path,
    keep_torch_threads,
    read_meta,
    require_ffcv,
)
from dgn_dist.data.common import CROP_PADDING, DataError, stratified_split


def image_pipeline(meta: BetonMeta, augment: bool, device: torch.device,
                   normalise: bool = True) -> list[Any]:
    """FFCV operations of the image field.

    Args:
        meta: the side-car (mean and std of the training split).
        augment: random flip + random translation by ``CROP_PADDING`` (black fill).
        device: ``cuda``: ``ToDevice`` and normalisation on the GPU; else CPU.
        normalise: False gives the raw uint8 ``[B, 3, H, W]`` pixels (tests, inspection).
    """
    from ffcv.fields.decoders import SimpleRGBImageDecoder
    from ffcv.transforms import (
        Convert,
        NormalizeImage,
        RandomHorizontalFlip,
        RandomTranslate,
        ToDevice,
        ToTensor,
        ToTorchImage,
    )

    ops: list[Any] = [SimpleRGBImageDecoder()]
    if augment:  # App. E.1: random crop with 4-pixel zero padding, horizontal flip
        ops += [RandomHorizontalFlip(), RandomTranslate(padding=CROP_PADDING, fill=(0, 0, 0))]
    mean = np.asarray(meta.mean, dtype=np.float64) * 255.0
    std = np.asarray(meta.std, dtype=np.float64) * 255.0
    if device.type == "cuda":
        ops += [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage()]
        if normalise:
            ops += [Convert(torch.float32), _Normalize(mean, std)]
        return ops
    if normalise:
        ops.append(NormalizeImage(mean, std, np.dtype(np.float32)))
    return ops + [ToTensor(), ToTorchImage(channels_last=False)]


class _Normalize(torch.nn.Module):
    """``(x - mean) / std`` per channel of a ``[B, C, H, W]`` batch (the GPU normalisation)."""

    def __init__(self, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__()
        self.mean: Tensor = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std: Tensor = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.mean.device != x.device:  # moved once, on the first batch
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        return (x - self.mean) / self.std


def label_pipeline(device: torch.device) -> list[Any]:
    """FFCV operations of the label field: int64 ``[B]`` on ``device``."""
    from ffcv.fields.decoders import IntDecoder
    from ffcv.transforms import Squeeze, ToDevice, ToTensor

    ops: list[Any] = [IntDecoder(), ToTensor(), Squeeze(1)]
    return ops + [ToDevice(device, non_blocking=True)] if device.type == "cuda" else ops


def distributed_world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group, ``(0, 1)`` without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EpochLoader:
    """One epoch of an FFCV loader that is compiled once and shared by all epochs.

    Args:
        loader: the ``ffcv.loader.Loader``.
        epoch: the epoch (with the loader's seed it fixes the order).
        skip: batches at the start of the epoch to skip (already trained on before a resume).
    """

    def __init__(self, loader: Any, epoch: int = 0, skip: int = 0) -> None:
        self.loader, self.epoch, self.skip = loader, epoch, skip

    def with_epoch(self, epoch: int, skip: int = 0) -> EpochLoader:
        """The same compiled loader for another epoch (and start position)."""
        return EpochLoader(self.loader, epoch, skip)

    def __len__(self) -> int:
        return max(len(self.loader) - self.skip, 0)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self.loader.next_epoch = self.epoch
        with keep_torch_threads():
            batches = iter(self.loader)
        return itertools.islice(batches, self.skip, None) if self.skip else batches


class BetonSplit(Dataset[tuple[Tensor, Tensor]]):
    """One split of a ``.beton``: a file, a subset of its indices and the augmentation flag.

    Args:
        path: the ``.beton``.
        meta: its checked side-car (normalisation statistics of the training split).
        indices: the samples of this split (``None`` = all).
        augment: training augmentation.
    """

    def __init__(self, path: Path, meta: BetonMeta, indices: np.ndarray | None = None,
                 augment: bool = False) -> None:
        self.path, self.meta, self.augment = path, meta, augment
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        self._loaders: dict[tuple[Any, ...], EpochLoader] = {}

    def __len__(self) -> int:
        return self.meta.num_images if self.indices is None else int(self.indices.shape[0])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.meta.shape

    def loader(self, batch_size: int, device: torch.device, *, train: bool, seed: int = 0,
               num_workers: int = 0, normalise: bool = True) -> EpochLoader:
        """The (cached) loader of this split.

        ``train``: random order from ``seed`` and the epoch, sharded across the ranks of an
        initialised process group, augmentation as configured; else sequential, unsharded
        (every rank sees the whole split) and without augmentation.
        """
        key = (batch_size, str(device), train, seed, num_workers, normalise)
        if key not in self._loaders:
            from ffcv.loader import Loader, OrderOption

            distributed = train and distributed_world()[1] > 1
            pipelines = {
                "image": image_pipeline(self.meta, self.augment and train, device, normalise),
                "label": label_pipeline(device)}
            with keep_torch_threads():
                loader = Loader(str(self.path), batch_size=batch_size, num_workers=num_workers,
                                order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL,
                                distributed=distributed, seed=seed,
                                indices=None if self.indices is None else self.indices.tolist(),
                                pipelines=pipelines, drop_last=False)
            self._loaders[key] = EpochLoader(loader)
        return self._loaders[key]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """One normalised image and its label (slow: compiles a loader; for inspection)."""
        from ffcv.loader import Loader, OrderOption

        sample = int(index if self.indices is None else self.indices[index])
        cpu = torch.device("cpu")
        with keep_torch_threads():
            loader = Loader(str(self.path), batch_size=1, num_workers=1,
                            order=OrderOption.SEQUENTIAL, indices=[sample], drop_last=False,
                            pipelines={"image": image_pipeline(self.meta, False, cpu),
                                       "label": label_pipeline(cpu)})
            x, y = next(iter(loader))
        return x[0].clone(), y[0].clone()


@dataclass
class BetonBundle:
    """The splits of a ``.beton`` data set (the ffcv counterpart of ``DataBundle``)."""

    train: BetonSplit
    val: BetonSplit
    test: BetonSplit
    input_shape: tuple[int, int, int]
    num_classes: int
    name: str


def build_ffcv_data(cfg: DataConfig, seed: int, augment: bool) -> BetonBundle:
    """Train / val / test splits from ``data.beton_train`` and ``data.beton_test``.

    The validation split is a stratified ``cfg.val_fraction`` of the training file drawn
    from ``seed`` (as the torch path does); both files are checked (size, checksum, format).

    Raises:
        DataError: data set without a .beton writer, ffcv missing, files missing, corrupt
            or not belonging together.
    """
    if cfg.dataset not in FFCV_DATASETS:
        raise DataError(f"data.loader=ffcv supports data.dataset in {', '.join(FFCV_DATASETS)}; "
                        f"got '{cfg.dataset}' (use data.loader=torch)")
    require_ffcv()
    paths = {split: Path(given).expanduser() if given else
             default_beton_path(cfg.root, cfg.dataset, split)
             for split, given in (("train", cfg.beton_train), ("test", cfg.beton_test))}
    metas = {split: read_meta(p, dataset=cfg.dataset, split=split) for split, p in paths.items()}
    for split, meta in metas.items():
        if meta.dataset != cfg.dataset or meta.split != split:
            raise DataError(f"{paths[split]} holds the {meta.split} split of {meta.dataset}, "
                            f"expected the {split} split of {cfg.dataset} (data.dataset)")
    train, test = metas["train"], metas["test"]
    if (train.shape, train.num_classes, train.mean, train.std) != (
            test.shape, test.num_classes, test.mean, test.std):
        raise DataError(f"{paths['train']} and {paths['test']} do not belong together (image "
                        "shape, classes or normalisation differ); write both with the same "
                        "`dgn-data write-beton` settings")
    labels = torch.from_numpy(beton_labels(paths["train"]))
    keep, held = stratified_split(labels, cfg.val_fraction, seed)
    return BetonBundle(
        train=BetonSplit(paths["train"], train, keep.numpy(), augment=augment),
        val=BetonSplit(paths["train"], train, held.numpy()),
        test=BetonSplit(paths["test"], test),
        input_shape=train.shape, num_classes=train.num_classes, name=cfg.dataset)


def ffcv_loader(dataset: Dataset[Any], batch_size: int, device: torch.device, *, seed: int,
                num_workers: int, epoch: int | None = None, start: int = 0) -> EpochLoader:
    """The loader the trainer iterates for a :class:`BetonSplit`.

    Args:
        dataset: a split of :func:`build_ffcv_data`.
        batch_size: batch size of this process.
        device: where batches are produced (``cuda``: on the GPU).
        seed: order seed (``run.seed``).
        num_workers: FFCV threads (0 = all cores).
        epoch: the training epoch (training loader: random order, sharded); ``None`` for an
            evaluation loader (sequential, whole split).
        start: samples of the epoch already trained on (resume); whole batches are skipped.
    """
    if not isinstance(dataset, BetonSplit):
        raise DataError(f"data.loader=ffcv needs .beton splits, got {type(dataset).__name__}")
    train = epoch is not None
    loader = dataset.loader(batch_size, device, train=train, seed=seed, num_workers=num_workers)
    return loader.with_epoch(epoch or 0, start // batch_size if train else 0)
