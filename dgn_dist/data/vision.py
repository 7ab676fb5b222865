"""MNIST, SVHN, CIFAR-10 and CIFAR-100 from ``data.root`` in torchvision's on-disk layout.

Layout (what torchvision's dataset classes download and read)::

    root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte
    root/train_32x32.mat, root/test_32x32.mat                    (SVHN)
    root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}
    root/cifar-100-python/{train,test,meta}

MNIST is read by ``torchvision.datasets.MNIST``. torchvision's SVHN and CIFAR classes refuse
any file whose md5 differs from the official release, which rules out re-packaged or
test-generated files; we therefore read those formats ourselves, exactly as torchvision
does (``scipy.io.loadmat`` with label 10 -> 0 for SVHN; the pickled batch dictionaries for
CIFAR, through an unpickler that admits only numpy arrays) and check shapes and labels
instead of checksums. With ``data.download = true`` missing files are fetched by
torchvision's own ``download=True``, which does verify the md5 of what it downloads.

Normalisation: per-channel mean and std of the training split (after the validation split
is carved out), in ``[0, 1]`` pixel units, applied to all splits (App. E.1: "standardization").
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dgn_dist.data.common import (
    DataBundle,
    DataError,
    ImageTensorDataset,
    channel_stats,
    split_train_val,
)

Arrays = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class VisionSpec:
    """Where a data set lives under the root and how to read it."""

    name: str
    files: tuple[str, ...]  # paths relative to the root that must all exist
    num_classes: int
    read: Callable[[Path, bool], Arrays]  # (root, train) -> (uint8 [N,C,H,W], labels)
    download: Callable[[Path], None]


# ---------------------------------------------------------------- MNIST (torchvision reads it)
def _read_mnist(root: Path, train: bool) -> Arrays:
    from torchvision.datasets import MNIST

    ds = MNIST(str(root), train=train, download=False)
    return ds.data.unsqueeze(1).contiguous(), ds.targets.to(torch.int64)


def _download_mnist(root: Path) -> None:
    from torchvision.datasets import MNIST

    for train in (True, False):
        MNIST(str(root), train=train, download=True)


# ---------------------------------------------------------------- SVHN (.mat, as torchvision)
def _read_svhn(root: Path, train: bool) -> Arrays:
    from scipy.io import loadmat

    path = root / ("train_32x32.mat" if train else "test_32x32.mat")
    mat = loadmat(str(path))
    if "X" not in mat or "y" not in mat:
        raise DataError(f"{path} must hold the SVHN arrays 'X' and 'y'")
    x, y = mat["X"], np.asarray(mat["y"]).astype(np.int64).reshape(-1)
    if x.ndim != 4 or x.shape[2] != 3 or x.shape[3] != y.shape[0] or x.dtype != np.uint8:
        raise DataError(f"{path}: 'X' must be uint8 [H, W, 3, N] matching 'y' [N, 1]; got "
                        f"{x.dtype} {x.shape} and {mat['y'].shape}")
    y[y == 10] = 0  # SVHN stores the digit 0 as label 10 (torchvision maps it to 0)
    images = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1))))
    return images, torch.from_numpy(y)


def _download_svhn(root: Path) -> None:
    from torchvision.datasets import SVHN

    for split in ("train", "test"):
        SVHN(str(root), split=split, download=True)


# ---------------------------------------------------------------- CIFAR (pickled batches)
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts/lists/strings/numbers and numpy arrays only (no arbitrary code)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a "
                                         "CIFAR batch file")
        if module == "_codecs":
            import codecs
            return codecs.encode
        if module == "numpy":
            return getattr(np, name)
        try:
            from numpy._core import multiarray
        except ImportError:  # numpy < 1.26
            from numpy.core import multiarray  # type: ignore[no-redef]
        return getattr(multiarray, name)


def load_cifar_batch(path: Path) -> dict[str, Any]:
    """One pickled CIFAR file as a dict (keys decoded as latin-1, as torchvision does)."""
    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise DataError(f"{path} is not a CIFAR python batch file: {err}") from err
    if not isinstance(entry, dict):
        raise DataError(f"{path} must hold a dict, got {type(entry).__name__}")
    return entry


def _read_cifar(folder: Path, files: tuple[str, ...]) -> Arrays:
    images: list[np.ndarray] = []
    labels: list[int] = []
    for name in files:
        entry = load_cifar_batch(folder / name)
        key = "labels" if "labels" in entry else "fine_labels"
        if "data" not in entry or key not in entry:
            raise DataError(f"{folder / name} must have the keys 'data' and 'labels' "
                            f"(CIFAR-10) or 'fine_labels' (CIFAR-100); has {sorted(entry)}")
        data = np.asarray(entry["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or (
                data.shape[0] != len(entry[key])):
            raise DataError(f"{folder / name}: 'data' must be uint8 [N, 3072] with N labels; "
                            f"got {data.dtype} {data.shape} and {len(entry[key])} labels")
        images.append(data)
        labels.extend(int(v) for v in entry[key])
    x = torch.from_numpy(np.vstack(images).reshape(-1, 3, 32, 32))
    return x, torch.tensor(labels, dtype=torch.int64)


def _read_cifar10(root: Path, train: bool) -> Arrays:
    files = tuple(f"data_batch_{i}" for i in range(1, 6)) if train else ("test_batch",)
    return _read_cifar(root / "cifar-10-batches-py", files)


def _read_cifar100(root: Path, train: bool) -> Arrays:
    return _read_cifar(root / "cifar-100-python", ("train",) if train else ("test",))


def _download_cifar10(root: Path) -> None:
    from torchvision.datasets import CIFAR10

    CIFAR10(str(root), train=True, download=True)


def _download_cifar100(root: Path) -> None:
    from torchvision.datasets import CIFAR100

    CIFAR100(str(root), train=True, download=True)


SPECS: dict[str, VisionSpec] = {
    "mnist": VisionSpec(
        "mnist", tuple(f"MNIST/raw/{s}-{k}" for s in ("train", "t10k")
                       for k in ("images-idx3-ubyte", "labels-idx1-ubyte")),
        10, _read_mnist, _download_mnist),
    "svhn": VisionSpec("svhn", ("train_32x32.mat", "test_32x32.mat"), 10, _read_svhn,
                       _download_svhn),
    "cifar10": VisionSpec(
        "cifar10", tuple(f"cifar-10-batches-py/{f}" for f in
                         [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch",
                                                                     "batches.meta"]),
        10, _read_cifar10, _download_cifar10),
    "cifar100": VisionSpec("cifar100", tuple(f"cifar-100-python/{f}" for f in
                                             ("train", "test", "meta")),
                           100, _read_cifar100, _download_cifar100),
}


def _missing(spec: VisionSpec, root: Path) -> list[Path]:
    return [root / f for f in spec.files if not (root / f).is_file()]


def ensure_files(spec: VisionSpec, root: Path, download: bool) -> None:
    """Check the files of ``spec`` under ``root``; download them when asked.

    Raises:
        DataError: files missing (naming them and the full root) and ``download`` false, or
            the download failed.
    """
    missing = _missing(spec, root)
    if missing and download:
        try:
            spec.download(root)
        except Exception as err:  # network, disk or checksum failure: report it as data error
            raise DataError(f"downloading {spec.name} into {root} failed: {err}") from err
        missing = _missing(spec, root)
    if missing:
        which = ("none of them exists" if len(missing) == len(spec.files) else
                 "missing " + ", ".join(str(m) for m in missing))
        raise DataError(
            f"{spec.name} not found: looked in data.root = {root} for "
            f"{', '.join(spec.files)} (torchvision's layout); {which}. Set data.download=true "
            f"to fetch them on a machine with internet, or point data.root at the folder "
            f"that holds them.")


def read_split(spec: VisionSpec, root: Path, train: bool) -> Arrays:
    """Read one split, turning format errors into :class:`DataError` and checking labels."""
    try:
        images, labels = spec.read(root, train)
    except DataError:
        raise
    except (OSError, RuntimeError, TypeError, ValueError) as err:
        raise DataError(f"could not read {spec.name} ({'train' if train else 'test'}) from "
                        f"{root}: {err}") from err
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= spec.num_classes):
        raise DataError(f"{spec.name} labels must be in [0, {spec.num_classes}); got "
                        f"[{int(labels.min())}, {int(labels.max())}]")
    return images, labels


def build_vision(name: str, root: str, download: bool, val_fraction: float, seed: int,
                 augment: bool) -> DataBundle:
    """Build a torchvision-format data set (see the module docstring).

    Args:
        name: one of ``SPECS`` (mnist, svhn, cifar10, cifar100).
        root: ``data.root``.
        download: fetch missing files with torchvision (needs internet).
        val_fraction: stratified fraction of the training set held out for validation.
        seed: seed of the validation split.
        augment: random crop + flip on the training split.
    """
    spec = SPECS[name]
    path = Path(root).expanduser().resolve()
    ensure_files(spec, path, download)
    train_x, train_y = read_split(spec, path, train=True)
    test_x, test_y = read_split(spec, path, train=False)
    (train_x, train_y), (val_x, val_y) = split_train_val(train_x, train_y, val_fraction, seed)
    scale = 1.0 / 255.0
    mean, std = channel_stats(train_x, scale)
    c, h, w = (int(s) for s in train_x.shape[1:])
    return DataBundle(
        train=ImageTensorDataset(train_x, train_y, mean, std, scale, augment=augment),
        val=ImageTensorDataset(val_x, val_y, mean, std, scale),
        test=ImageTensorDataset(test_x, test_y, mean, std, scale),
        input_shape=(c, h, w),
        num_classes=spec.num_classes,
        name=name,
    )
