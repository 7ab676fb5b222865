"""``.beton`` files: writing, the side-car JSON, checking (size, checksum, FFCV header).

A ``.beton`` holds two fields, ``image`` (``RGBImageField``, raw pixels by default) and
``label`` (``IntField``). Beside it, ``<file>.beton.json`` records what FFCV cannot: the data
set, split, image shape, class count, the per-channel mean and std of the *training* split (in
``[0, 1]`` pixel units, used for both splits) and the file's size and BLAKE2b checksum, so a
truncated or modified file is reported before FFCV reads it. ``ffcv`` is an optional extra:
every entry point raises :class:`DataError` with install instructions when it is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dgn_dist.data.common import DataError

#: Data sets that ``dgn-data write-beton`` writes and the ffcv loader reads.
FFCV_DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "svhn", "synthetic")
#: Version of the side-car JSON layout.
META_FORMAT = 1
INSTALL_HINT = (
    "ffcv is not installed or its native libraries are missing. Install it with "
    "`./bootstrap.sh --test` (Debian: installs pkg-config libopencv-dev libturbojpeg0-dev and "
    "the ffcv extra), or by hand: `apt-get install pkg-config libopencv-dev libturbojpeg0-dev` "
    "then `pip install --no-build-isolation -e '.[ffcv]'`; or use data.loader=torch")


@contextlib.contextmanager
def keep_torch_threads() -> Iterator[None]:
    """Restore torch's intra-op thread count afterwards: FFCV's compiler sets it to 1 when
    ffcv is imported and to the loader's worker count when a loader is built or iterated,
    which would silently change the model's CPU speed."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def require_ffcv() -> None:
    """Import ffcv or raise :class:`DataError` saying how to install it."""
    try:
        with keep_torch_threads():
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


def read_meta(path: str | Path, verify: bool = True, dataset: str = "<name>",
              split: str = "<train|test>") -> BetonMeta:
    """Check a ``.beton`` and return its side-car metadata.

    Args:
        path: the ``.beton`` file.
        verify: compare size and checksum with the side-car and open it with FFCV's reader.
        dataset: data set expected there (only for the message when the file is missing).
        split: split expected there (idem).

    Raises:
        DataError: the file or its side-car is missing, or either is corrupt / modified.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f".beton file {path} not found; {_recreate_hint(path, dataset, split)} "
                        "(or set data.beton_train / data.beton_test)")
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

    return np.array(Reader(str(path)).metadata["f1"], dtype=np.int64)  # a writable copy
