"""The FFCV data path: ``.beton`` files and loaders with the paper's augmentation.

A ``.beton`` holds two fields, ``image`` (``RGBImageField``, raw pixels by default) and
``label`` (``IntField``). Beside it, ``<file>.beton.json`` records what FFCV cannot: the data
set, split, image shape, class count, the per-channel mean and std of the *training* split (in
``[0, 1]`` pixel units, used for both splits) and the file's size and BLAKE2b checksum, so a
truncated or modified file is reported before FFCV reads it.

Loaders (``data.loader = "ffcv"``): decode, then for training with augmentation a random
horizontal flip and a random translation by up to 4 pixels with black fill (= torchvision's
``RandomCrop(32, padding=4)``, App. E.1), then normalisation. On CPU the normalisation is
FFCV's JIT-compiled ``NormalizeImage``; under CUDA the uint8 batch is moved with ``ToDevice``
and converted and normalised on the GPU. Training order is FFCV's ``RANDOM`` order seeded by
``run.seed`` and the epoch; under an initialised ``torch.distributed`` process group each rank
reads its own shard (FFCV's ``distributed=True``, which follows torch's ``DistributedSampler``:
the rank and world size come from the process group). Augmentation draws from numba's RNG, so
unlike the torch path it is not bit-reproducible between runs.

``ffcv`` is an optional extra; every entry point raises :class:`DataError` with install
instructions when it is missing.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from dgn_dist.config.schema import DataConfig
from dgn_dist.data.common import CROP_PADDING, DataError, stratified_split

#: Data sets that ``dgn-data write-beton`` writes and the ffcv loader reads.
FFCV_DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "svhn", "synthetic")
#: Version of the side-car JSON layout.
META_FORMAT = 1
INSTALL_HINT = (
    "ffcv is not installed or its native libraries are missing. Install it with "
    "`./bootstrap.sh --test` (Debian: installs pkg-config libopencv-dev libturbojpeg0-dev and "
    "the ffcv extra), or by hand: `apt-get install pkg-config libopencv-dev libturbojpeg0-dev` "
    "then `pip install --no-build-isolation -e '.[ffcv]'`; or use data.loader=torch")


def require_ffcv() -> None:
    """Import ffcv or raise :class:`DataError` saying how to install it."""
    try:
        import ffcv.loader  # noqa: F401
    except (ImportError, OSError) as err:  # OSError: libopencv / libturbojpeg missing
        raise DataError(f"{INSTALL_HINT} ({type(err).__name__}: {err})") from err


@dataclass(frozen=True)
class BetonMeta:
    """What the side-car JSON of a ``.beton`` records (see the module docstring)."""

    dataset: str
    split: str
    num_images: int
    shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    write_mode: str
    size_bytes: int
    blake2b: str
    format: int = META_FORMAT


def meta_path(path: str | Path) -> Path:
    """The side-car JSON of a ``.beton``: ``<file>.json``."""
    return Path(str(path) + ".json")


def default_beton_path(root: str | Path, dataset: str, split: str) -> Path:
    """The folder convention: ``<root>/ffcv/<dataset>_<split>.beton``."""
    return Path(root).expanduser() / "ffcv" / f"{dataset}_{split}.beton"


def file_digest(path: Path) -> str:
    """BLAKE2b hex digest of a file, read in 8 MiB chunks."""
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _ImageLabelArrays:
    """Indexable ``(HWC uint8 array, int label)`` pairs, the input FFCV's writer expects."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])


def write_beton(path: str | Path, images: Tensor, labels: Tensor, *, dataset: str, split: str,
                num_classes: int, mean: Sequence[float], std: Sequence[float],
                write_mode: str = "raw", jpeg_quality: int = 90,
                num_workers: int = 1) -> BetonMeta:
    """Write ``images`` and ``labels`` to a ``.beton`` and its side-car JSON (atomically).

    Args:
        path: output file; its folder is created.
        images: uint8 ``[N, 3, H, W]`` images.
        labels: ``[N]`` integer labels in ``[0, num_classes)``.
        dataset: data set name recorded in the side-car (checked against ``data.dataset``).
        split: ``train`` or ``test``.
        num_classes: number of classes.
        mean: per-channel mean of the training split in ``[0, 1]`` pixel units.
        std: per-channel std of the training split in ``[0, 1]`` pixel units.
        write_mode: ``raw`` (pixel-exact) or ``jpg`` (smaller, lossy).
        jpeg_quality: JPEG quality for ``write_mode="jpg"``.
        num_workers: writer processes.

    Raises:
        DataError: wrong shapes/dtypes/labels or an unknown ``write_mode``; ffcv missing.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise DataError(f"images must be uint8 [N, 3, H, W] (RGB); got {images.dtype} "
                        f"{tuple(images.shape)}")
    if labels.shape != (images.shape[0],) or images.shape[0] == 0:
        raise DataError(f"labels must be [N] with N = {images.shape[0]} > 0; got "
                        f"{tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise DataError(f"labels must lie in [0, {num_classes}); got [{int(labels.min())}, "
                        f"{int(labels.max())}]")
    if write_mode not in ("raw", "jpg"):
        raise DataError(f"write_mode '{write_mode}' is unknown; valid choices: raw, jpg")
    require_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    arrays = _ImageLabelArrays(images.permute(0, 2, 3, 1).contiguous().numpy(),
                               labels.to(torch.int64).numpy())
    fields = {"image": RGBImageField(write_mode=write_mode, jpeg_quality=jpeg_quality),
              "label": IntField()}
    DatasetWriter(str(tmp), fields, num_workers=max(1, num_workers)).from_indexed_dataset(arrays)
    os.replace(tmp, out)
    _, _, h, w = (int(s) for s in images.shape)
    meta = BetonMeta(dataset=dataset, split=split, num_images=int(images.shape[0]),
                     shape=(3, h, w), num_classes=int(num_classes),
                     mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
                     write_mode=write_mode, size_bytes=out.stat().st_size,
                     blake2b=file_digest(out))
    side = meta_path(out)
    side.with_name(side.name + ".tmp").write_text(json.dumps(asdict(meta), indent=2) + "\n")
    os.replace(side.with_name(side.name + ".tmp"), side)
    return meta


def _recreate_hint(path: Path, dataset: str = "<name>", split: str = "<train|test>") -> str:
    return (f"create it with `dgn-data write-beton --dataset {dataset} --split {split} "
            f"--out {path}`")


def read_meta(path: str | Path, verify: bool = True) -> BetonMeta:
    """Check a ``.beton`` and return its side-car metadata.

    Args:
        path: the ``.beton`` file.
        verify: compare size and checksum with the side-car and open it with FFCV's reader.

    Raises:
        DataError: the file or its side-car is missing, or either is corrupt / modified.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f".beton file {path} not found; {_recreate_hint(path)} (or set "
                        "data.beton_train / data.beton_test)")
    side = meta_path(path)
    if not side.is_file():
        raise DataError(f"{side} (the side-car of {path}) not found; re-create the file with "
                        "`dgn-data write-beton`, which writes both")
    try:
        raw = json.loads(side.read_text())
        raw["shape"], raw["mean"], raw["std"] = (tuple(raw[k]) for k in ("shape", "mean", "std"))
        meta = BetonMeta(**raw)
    except (ValueError, TypeError, KeyError) as err:
        raise DataError(f"{side} is not a dgn-data side-car ({err}); re-create {path} with "
                        "`dgn-data write-beton`") from err
    if meta.format != META_FORMAT:
        raise DataError(f"{side} has format {meta.format}, this version reads {META_FORMAT}; "
                        f"re-create {path} with `dgn-data write-beton`")
    if not verify:
        return meta
    hint = _recreate_hint(path, meta.dataset, meta.split)
    size = path.stat().st_size
    if size != meta.size_bytes or file_digest(path) != meta.blake2b:
        raise DataError(f".beton file {path} is corrupt: its size ({size} bytes) or checksum "
                        f"differs from the one recorded when it was written (truncated or "
                        f"modified); {hint}")
    require_ffcv()
    from ffcv.reader import Reader

    try:
        reader = Reader(str(path))
    except Exception as err:  # FFCV raises AssertionError, ValueError, IndexError, ...
        raise DataError(f".beton file {path} is corrupt ({type(err).__name__}: {err}); "
                        f"{hint}") from err
    if reader.field_names != ["image", "label"] or reader.num_samples != meta.num_images:
        raise DataError(f".beton file {path} holds fields {reader.field_names} and "
                        f"{reader.num_samples} samples, expected ['image', 'label'] and "
                        f"{meta.num_images}; {hint}")
    return meta


def beton_labels(path: str | Path) -> np.ndarray:
    """All labels of a checked ``.beton`` (int64), read from its metadata table."""
    from ffcv.reader import Reader

    return np.asarray(Reader(str(path)).metadata["f1"], dtype=np.int64)


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
            ops += [Convert(torch.float32), _Normalize(mean, std).to(device)]
        return ops
    if normalise:
        ops.append(NormalizeImage(mean, std, np.dtype(np.float32)))
    return ops + [ToTensor(), ToTorchImage(channels_last=False)]


class _Normalize(torch.nn.Module):
    """``(x - mean) / std`` per channel of a ``[B, C, H, W]`` batch (the GPU normalisation)."""

    def __init__(self, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
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
    """An FFCV loader compiled once and iterated epoch by epoch.

    Args:
        loader: the ``ffcv.loader.Loader``.
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self._epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch (fixes the order with the seed) and skip its first batches
        (already trained on before a resume)."""
        self._epoch, self._skip = epoch, skip_batches

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self.loader.next_epoch = self._epoch
        batches = iter(self.loader)
        return itertools.islice(batches, self._skip, None) if self._skip else batches


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
    metas = {split: read_meta(p) for split, p in paths.items()}
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
    loader.set_epoch(epoch or 0, start // batch_size if train else 0)
    return loader
