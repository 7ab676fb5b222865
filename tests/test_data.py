"""Data sets: DIGITS on the real data, torchvision-format files generated here, synthetic."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dgn_dist.config.schema import DataConfig
from dgn_dist.data import (
    DataBundle,
    DataError,
    ImageTensorDataset,
    build_data,
    stratified_split,
)


def stack(ds: ImageTensorDataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return torch.stack(xs), torch.stack(ys)


def row_multiset(images: torch.Tensor) -> list[tuple[float, ...]]:
    return sorted(tuple(r) for r in images.flatten(1).to(torch.float64).tolist())


# ------------------------------------------------------------------------------------ digits
def test_digits_splits_stratified_and_complete() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    b = build_data(DataConfig(dataset="digits", test_fraction=0.2, val_fraction=0.1), seed=3)
    assert (b.input_shape, b.num_classes, b.name) == ((1, 8, 8), 10, "digits")
    assert (len(b.train), len(b.val), len(b.test)) == (1294, 144, 359)  # 1797 in all
    # the three splits partition the 1797 images (raw pixel values kept in .images)
    union = torch.cat([b.train.images, b.val.images, b.test.images])
    assert row_multiset(union) == row_multiset(torch.as_tensor(digits.images))
    counts = np.bincount(digits.target, minlength=10)
    for split, share in ((b.test, 0.2), (b.val, 0.8 * 0.1)):
        got = torch.bincount(split.labels, minlength=10).numpy()
        assert np.all(np.abs(got - share * counts) <= 1.0), (got, share * counts)


def test_digits_standardised_with_training_statistics() -> None:
    b = build_data(DataConfig(dataset="digits"), seed=0)
    x_train, y_train = stack(b.train)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert abs(x_train.mean().item()) < 1e-5
    assert abs(x_train.to(torch.float64).std(correction=0).item() - 1.0) < 1e-5
    raw = b.train.images.to(torch.float64)
    mean, std = raw.mean(), raw.std(correction=0)
    x_test, _ = stack(b.test)
    expected = (b.test.images.to(torch.float64) - mean) / std
    torch.testing.assert_close(x_test.to(torch.float64), expected, rtol=0, atol=1e-5)
    assert abs(x_test.mean().item()) > 1e-4  # the test set is not re-standardised


def test_digits_split_deterministic_by_seed() -> None:
    a, b = (build_data(DataConfig(dataset="digits"), seed=5) for _ in range(2))
    c = build_data(DataConfig(dataset="digits"), seed=6)
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.val.labels, b.val.labels)
    assert not torch.equal(a.test.images, c.test.images)
    empty = build_data(DataConfig(dataset="digits", val_fraction=0.0), seed=5)
    assert len(empty.val) == 0 and len(empty.train) == len(a.train) + len(a.val)


def test_stratified_split_fraction_and_errors() -> None:
    labels = torch.tensor([0] * 7 + [1] * 5 + [2] * 3)
    keep, held = stratified_split(labels, 0.4, seed=0)
    assert held.numel() == 6 and keep.numel() == 9  # round(0.4 * 15)
    assert torch.bincount(labels[held], minlength=3).tolist() == [3, 2, 1]
    assert set(keep.tolist()).isdisjoint(held.tolist())
    with pytest.raises(DataError, match=r"\[0, 1\)"):
        stratified_split(labels, 1.0, seed=0)


# ------------------------------------------------------------------ torchvision-format files
def write_idx(path: Path, array: np.ndarray) -> None:
    """MNIST idx format: magic (0, 0, 0x08 = ubyte, ndim), big-endian dims, raw bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, array.ndim]))
        f.write(struct.pack(f">{array.ndim}i", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def make_mnist(root: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    arrays = {"train_x": rng.integers(0, 256, (60, 28, 28), dtype=np.uint8),
              "train_y": np.arange(60) % 10, "test_x": rng.integers(0, 256, (20, 28, 28),
                                                                   dtype=np.uint8),
              "test_y": (np.arange(20) * 3) % 10}
    raw = root / "MNIST" / "raw"
    write_idx(raw / "train-images-idx3-ubyte", arrays["train_x"])
    write_idx(raw / "train-labels-idx1-ubyte", arrays["train_y"])
    write_idx(raw / "t10k-images-idx3-ubyte", arrays["test_x"])
    write_idx(raw / "t10k-labels-idx1-ubyte", arrays["test_y"])
    return arrays


def make_svhn(root: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    from scipy.io import savemat

    arrays = {}
    for split, n in (("train", 40), ("test", 20)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)  # SVHN: [H, W, C, N]
        y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # labels 1..10, 10 = "0"
        savemat(str(root / f"{split}_32x32.mat"), {"X": x, "y": y})
        arrays[f"{split}_x"], arrays[f"{split}_y"] = x, y
    return arrays


def dump(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_cifar(root: Path, rng: np.random.Generator, classes: int) -> dict[str, np.ndarray]:
    """CIFAR python-version layout: pickled dicts with 'data' uint8 [N, 3072] and labels."""
    key = "labels" if classes == 10 else "fine_labels"
    folder = root / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
    if classes == 10:
        files = {f"data_batch_{i}": 20 for i in range(1, 6)} | {"test_batch": 20}
        dump(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)],
                                       "num_cases_per_batch": 20, "num_vis": 3072})
    else:
        files = {"train": 200, "test": 100}
        dump(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                               "coarse_label_names": [f"k{i}" for i in range(20)]})
    arrays: dict[str, list[np.ndarray]] = {"train_x": [], "train_y": [], "test_x": [],
                                           "test_y": []}
    for name, n in files.items():
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.permutation(np.arange(n) % classes)]
        entry = {"batch_label": name, key: labels, "data": data,
                 "filenames": [f"{name}_{i}.png" for i in range(n)]}
        if classes == 100:
            entry["coarse_labels"] = [v // 5 for v in labels]
        dump(folder / name, entry)
        split = "test" if name.startswith("test") else "train"
        arrays[f"{split}_x"].append(data.reshape(n, 3, 32, 32))
        arrays[f"{split}_y"].append(np.asarray(labels))
    return {k: np.concatenate(v) for k, v in arrays.items()}


MAKERS = {"mnist": make_mnist, "svhn": make_svhn,
          "cifar10": lambda root, rng: make_cifar(root, rng, 10),
          "cifar100": lambda root, rng: make_cifar(root, rng, 100)}
SHAPES = {"mnist": (1, 28, 28), "svhn": (3, 32, 32), "cifar10": (3, 32, 32),
          "cifar100": (3, 32, 32)}


def as_nchw(name: str, x: np.ndarray) -> np.ndarray:
    if name == "mnist":
        return x[:, None]
    if name == "svhn":
        return np.transpose(x, (3, 2, 0, 1))  # as torchvision: [H, W, C, N] -> [N, C, H, W]
    return x


def expected_labels(name: str, y: np.ndarray) -> np.ndarray:
    y = y.reshape(-1).astype(np.int64)
    return np.where(y == 10, 0, y) if name == "svhn" else y


@pytest.mark.parametrize("name", ["mnist", "svhn", "cifar10", "cifar100"])
def test_torchvision_format_loader(name: str, tmp_path: Path) -> None:
    arrays = MAKERS[name](tmp_path, np.random.default_rng(0))
    b = build_data(DataConfig(dataset=name, root=str(tmp_path), val_fraction=0.0,
                              augment="none"), seed=0)
    assert b.input_shape == SHAPES[name] and b.name == name
    assert b.num_classes == (100 if name == "cifar100" else 10)
    assert len(b.val) == 0
    x_train, y_train = stack(b.train)
    train_raw = as_nchw(name, arrays["train_x"]).astype(np.float64) / 255
    assert np.array_equal(y_train.numpy(), expected_labels(name, arrays["train_y"]))
    # per-channel standardisation with the training statistics, in [0, 1] pixel units
    mean = train_raw.mean(axis=(0, 2, 3), keepdims=True)
    std = train_raw.std(axis=(0, 2, 3), keepdims=True)
    np.testing.assert_allclose(x_train.numpy(), (train_raw - mean) / std, atol=1e-5)
    assert np.abs(x_train.numpy().mean(axis=(0, 2, 3))).max() < 1e-5
    x_test, y_test = stack(b.test)
    test_raw = as_nchw(name, arrays["test_x"]).astype(np.float64) / 255
    np.testing.assert_allclose(x_test.numpy(), (test_raw - mean[:1]) / std[:1], atol=1e-5)
    assert np.array_equal(y_test.numpy(), expected_labels(name, arrays["test_y"]))
    if name == "svhn":
        assert (y_train == 0).sum() == 4  # label 10 -> 0


@pytest.mark.parametrize("name", ["svhn", "cifar10", "cifar100"])
def test_generated_files_read_by_torchvision_itself(name: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's SVHN/CIFAR classes check md5 sums of the official files; with that check
    disabled (here, in the test only) they read our files exactly as our loader does."""
    import torchvision.datasets as tvd
    from torchvision.datasets import cifar, svhn

    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(svhn, "check_integrity", lambda *a, **k: True)
    MAKERS[name](tmp_path, np.random.default_rng(1))
    b = build_data(DataConfig(dataset=name, root=str(tmp_path), val_fraction=0.0,
                              augment="none"), seed=0)
    if name == "svhn":
        ref = tvd.SVHN(str(tmp_path), split="test")
        ref_x, ref_y = ref.data, ref.labels
    else:
        ref = (tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100)(str(tmp_path), train=False)
        ref_x, ref_y = np.transpose(ref.data, (0, 3, 1, 2)), np.asarray(ref.targets)
    assert np.array_equal(b.test.images.numpy(), ref_x)
    assert np.array_equal(b.test.labels.numpy(), ref_y)


def test_mnist_read_by_torchvision_matches(tmp_path: Path) -> None:
    from torchvision.datasets import MNIST

    make_mnist(tmp_path, np.random.default_rng(2))
    b = build_data(DataConfig(dataset="mnist", root=str(tmp_path), val_fraction=0.0), seed=0)
    ref = MNIST(str(tmp_path), train=True)
    assert torch.equal(b.train.images[:, 0], ref.data)
    assert torch.equal(b.train.labels, ref.targets)


@pytest.mark.parametrize(("name", "expected"), [
    ("mnist", "MNIST/raw/train-images-idx3-ubyte"), ("svhn", "train_32x32.mat"),
    ("cifar10", "cifar-10-batches-py/data_batch_1"), ("cifar100", "cifar-100-python/train")])
def test_missing_files_error_names_path(name: str, expected: str, tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        build_data(DataConfig(dataset=name, root=str(root)), seed=0)
    message = str(err.value)
    assert name in message and str(root.resolve()) in message and expected in message
    assert "data.download=true" in message
    assert isinstance(err.value, ValueError)


def test_partially_missing_lists_only_missing(tmp_path: Path) -> None:
    make_cifar(tmp_path, np.random.default_rng(0), 10)
    os.remove(tmp_path / "cifar-10-batches-py" / "test_batch")
    with pytest.raises(DataError, match="missing .*test_batch") as err:
        build_data(DataConfig(dataset="cifar10", root=str(tmp_path)), seed=0)
    assert "data_batch_1," not in str(err.value).split("; missing", 1)[1]


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("code ran while unpickling",))


def test_cifar_unpickler_refuses_arbitrary_globals(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    make_cifar(tmp_path, np.random.default_rng(0), 10)
    dump(tmp_path / "cifar-10-batches-py" / "test_batch", {"data": _Evil(), "labels": []})
    with pytest.raises(DataError, match=r"\.print' is not allowed"):
        build_data(DataConfig(dataset="cifar10", root=str(tmp_path)), seed=0)
    assert "code ran" not in capsys.readouterr().out


def test_cifar_reads_numpy1_pickles(tmp_path: Path) -> None:
    """The official files were pickled with numpy 1 (global numpy.core.multiarray)."""
    arrays = make_cifar(tmp_path, np.random.default_rng(0), 10)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    blob = path.read_bytes()
    assert b"numpy._core.multiarray" in blob or b"numpy.core.multiarray" in blob
    path.write_bytes(blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    b = build_data(DataConfig(dataset="cifar10", root=str(tmp_path), val_fraction=0.0), 0)
    assert np.array_equal(b.test.images.numpy(), arrays["test_x"])


def test_val_split_carved_from_train(tmp_path: Path) -> None:
    make_cifar(tmp_path, np.random.default_rng(0), 10)
    b = build_data(DataConfig(dataset="cifar10", root=str(tmp_path), val_fraction=0.2), seed=4)
    assert (len(b.train), len(b.val), len(b.test)) == (80, 20, 20)
    assert torch.bincount(b.val.labels, minlength=10).tolist() == [2] * 10
    union = torch.cat([b.train.images, b.val.images])
    full = build_data(DataConfig(dataset="cifar10", root=str(tmp_path), val_fraction=0.0), 4)
    assert row_multiset(union) == row_multiset(full.train.images)
    assert not b.val.augment


# ----------------------------------------------------------------------------- augmentation
def test_cifar100_augmentation_default_train_only(tmp_path: Path) -> None:
    make_cifar(tmp_path, np.random.default_rng(0), 100)
    b = build_data(DataConfig(dataset="cifar100", root=str(tmp_path)), seed=0)
    assert b.train.augment and not b.val.augment and not b.test.augment
    none = build_data(DataConfig(dataset="cifar100", root=str(tmp_path), augment="none"), 0)
    assert not none.train.augment
    assert torch.equal(b.test[0][0], b.test[0][0])
    raw = b.train.images[5].to(torch.float64) / 255
    padded = torch.nn.functional.pad(raw, (4, 4, 4, 4))
    candidates = [c for top in range(9) for left in range(9)
                  for c in (padded[:, top:top + 32, left:left + 32],
                            padded[:, top:top + 32, left:left + 32].flip(-1))]
    seen = set()
    for _ in range(30):
        x, _y = b.train[5]
        back = x.to(torch.float64) * b.train.std + b.train.mean  # undo the normalisation
        hits = [i for i, c in enumerate(candidates) if torch.allclose(back, c, atol=1e-5)]
        assert hits, "augmented image is not a padded crop / flip of the original"
        seen.add(hits[0])
    assert len(seen) > 5  # offsets and flips actually vary
    torch.manual_seed(11)
    first = b.train.__getitems__([1, 5, 7])
    torch.manual_seed(11)
    again = [b.train[i] for i in (1, 5, 7)]  # same global RNG state -> same crops
    for (xa, ya), (xb, yb) in zip(first, again, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_crop_flip_forced_for_other_sets() -> None:
    b = build_data(DataConfig(dataset="synthetic", augment="crop_flip",
                              synthetic_train_size=20, synthetic_test_size=10), seed=0)
    assert b.train.augment and not b.test.augment
    assert not build_data(DataConfig(dataset="synthetic", synthetic_train_size=20,
                                     synthetic_test_size=10), seed=0).train.augment


# -------------------------------------------------------------------------------- synthetic
def synth(seed: int, val_fraction: float = 0.1) -> DataBundle:
    cfg = DataConfig(dataset="synthetic", synthetic_shape=[2, 5, 7], synthetic_classes=3,
                     synthetic_train_size=300, synthetic_test_size=150,
                     val_fraction=val_fraction)
    return build_data(cfg, seed)


def test_synthetic_deterministic_by_seed() -> None:
    a, b, c = synth(1), synth(1), synth(2)
    assert a.input_shape == (2, 5, 7) and a.num_classes == 3 and a.name == "synthetic"
    assert (len(a.train), len(a.val), len(a.test)) == (270, 30, 150)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(a, split).images, getattr(b, split).images)
        assert torch.equal(getattr(a, split).labels, getattr(b, split).labels)
    assert not torch.equal(a.train.images, c.train.images)
    x, y = a.train[0]
    assert x.shape == (2, 5, 7) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(synth(1, val_fraction=0.0).val) == 0


@pytest.mark.parametrize("shape", [[3, 32, 32], [1, 4, 4]])
def test_synthetic_learnable(shape: list[int]) -> None:
    cfg = DataConfig(dataset="synthetic", synthetic_shape=shape, synthetic_classes=10,
                     synthetic_train_size=500, synthetic_test_size=300)
    b = build_data(cfg, seed=0)
    x_tr, y_tr = b.train.images.flatten(1), b.train.labels
    means = torch.stack([x_tr[y_tr == k].mean(0) for k in range(10)])
    pred = torch.cdist(b.test.images.flatten(1), means).argmin(1)
    accuracy = (pred == b.test.labels).float().mean().item()
    assert accuracy > 0.7  # chance is 0.1
    assert torch.bincount(b.test.labels, minlength=10).tolist() == [30] * 10


def test_dataloader_batches() -> None:
    b = build_data(DataConfig(dataset="digits"), seed=0)
    x, y = next(iter(DataLoader(b.train, batch_size=8, shuffle=False)))
    assert x.shape == (8, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    torch.testing.assert_close(x, torch.stack([b.train[i][0] for i in range(8)]))


def test_unknown_dataset_and_bad_fraction() -> None:
    with pytest.raises(DataError, match="valid choices: digits"):
        build_data(DataConfig(dataset="imagenet"), seed=0)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="data.val_fraction"):
        build_data(DataConfig(val_fraction=1.5), seed=0)
