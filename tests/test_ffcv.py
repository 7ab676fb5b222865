"""FFCV data path: .beton write/read-back, augmentation, sharding, errors, training.

Numba compiles every FFCV pipeline once per process (seconds each), so the module writes its
files once (module fixtures) and keeps the number of loaders and processes small.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv.loader", reason="ffcv is not installed: run ./bootstrap.sh --test")

from dist_helper import run_distributed  # noqa: E402

from dgn_dist.config import load_config  # noqa: E402
from dgn_dist.data import DataError, build_data  # noqa: E402
from dgn_dist.data.beton import (  # noqa: E402
    BetonMeta,
    beton_labels,
    file_digest,
    meta_path,
    read_meta,
    require_ffcv,
    write_beton,
)
from dgn_dist.data.cli import main as dgn_data  # noqa: E402
from dgn_dist.data.ffcv import (  # noqa: E402
    BetonSplit,
    distributed_world,
    ffcv_loader,
    image_pipeline,
)

N, H, W = 48, 32, 32  # images of the index file; label = index identifies every sample
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
CPU = torch.device("cpu")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A raw .beton of random images whose label is their index."""
    images = torch.randint(0, 256, (N, 3, H, W), generator=torch.Generator().manual_seed(1),
                           dtype=torch.uint8)
    path = tmp_path_factory.mktemp("beton") / "index.beton"
    write_beton(path, images, torch.arange(N), dataset="synthetic", split="train",
                num_classes=N, mean=MEAN, std=STD)
    return path, images


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/test .beton files of the synthetic data set, written by ``dgn-data``."""
    root = tmp_path_factory.mktemp("data")
    for split, size in (("train", 320), ("test", 96)):
        assert dgn_data(["write-beton", "--dataset", "synthetic", "--split", split,
                         "--size", str(size), "--classes", "4", "--root", str(root),
                         "--workers", "1"]) == 0
    return root


def _collect(loader: object) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for x, y in loader:  # type: ignore[attr-defined]
        xs.append(x.clone())  # FFCV reuses its batch buffers
        ys.append(y.clone())
    return torch.cat(xs), torch.cat(ys)


def test_write_and_read_back_exact(indexed: tuple[Path, torch.Tensor]) -> None:
    path, images = indexed
    meta = read_meta(path)
    assert (meta.num_images, meta.shape, meta.num_classes) == (N, (3, H, W), N)
    assert meta.mean == MEAN and meta.std == STD and meta.write_mode == "raw"
    split = BetonSplit(path, meta)
    x, y = _collect(split.loader(16, CPU, train=False, num_workers=1, normalise=False))
    assert x.dtype == torch.uint8 and torch.equal(x, images)
    assert y.dtype == torch.int64 and torch.equal(y, torch.arange(N))
    # normalised evaluation batches: (pixel / 255 - mean) / std per channel
    xn, yn = _collect(split.loader(20, CPU, train=False, num_workers=1))
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    assert xn.dtype == torch.float32 and xn.shape == (N, 3, H, W) and torch.equal(yn, y)
    torch.testing.assert_close(xn, (images.double() / 255 - mean) / std, rtol=0, atol=1e-5,
                               check_dtype=False)


def _shifted(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``img`` translated by (dy, dx) with black fill (pad 4, crop at 4 + dy, 4 + dx)."""
    padded = torch.nn.functional.pad(img, (4, 4, 4, 4))
    return padded[:, 4 + dy:4 + dy + H, 4 + dx:4 + dx + W]


def test_augmentation_is_crop_with_padding_and_flip(indexed: tuple[Path, torch.Tensor]) -> None:
    path, images = indexed
    split = BetonSplit(path, read_meta(path), augment=True)
    loader = split.loader(16, CPU, train=True, seed=0, num_workers=1, normalise=False)
    x, y = _collect(loader)
    assert x.shape == (N, 3, H, W) and x.dtype == torch.uint8
    assert sorted(y.tolist()) == list(range(N))  # one epoch: every image once
    moved = flipped = 0
    for img, label in zip(x, y.tolist(), strict=True):
        matches = [(dy, dx, f) for dy in range(-4, 5) for dx in range(-4, 5) for f in (0, 1)
                   if torch.equal(img, _shifted(images[label].flip(-1) if f else images[label],
                                                dy, dx))]
        assert matches, f"image {label} is no crop-with-padding/flip of its original"
        moved += all((dy, dx) != (0, 0) for dy, dx, _ in matches)
        flipped += all(f for _, _, f in matches)
    assert moved > N // 2 and 0 < flipped < N  # 80/81 move; about half flip
    # the normalised training batches lie in [(0 - mean) / std, (255 - mean) / std]
    xn, _ = _collect(split.loader(16, CPU, train=True, seed=0, num_workers=1))
    lo = -torch.tensor(MEAN) / torch.tensor(STD)
    hi = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    per_channel = xn.transpose(0, 1).reshape(3, -1)
    assert torch.all(per_channel.min(1).values >= lo - 1e-5)
    assert torch.all(per_channel.max(1).values <= hi + 1e-5)
    assert torch.isclose(per_channel.min(1).values, lo, atol=1e-5).all()  # black padding


def test_epoch_order_and_resume_skip(indexed: tuple[Path, torch.Tensor]) -> None:
    path, _ = indexed
    split = BetonSplit(path, read_meta(path), indices=np.arange(0, N, 2))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:  # FFCV sets torch's thread count to its worker count; the loader restores it
        full = [ffcv_loader(split, 5, CPU, seed=7, num_workers=1, epoch=e) for e in (0, 1)]
        orders = [_collect(loader)[1].tolist() for loader in full]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(0, N, 2))
    assert orders[0] != orders[1]  # a new permutation each epoch
    again = _collect(ffcv_loader(split, 5, CPU, seed=7, num_workers=1, epoch=1))[1].tolist()
    assert again == orders[1]  # the order is a function of (seed, epoch)
    resumed = _collect(ffcv_loader(split, 5, CPU, seed=7, num_workers=1, epoch=1, start=10))
    assert resumed[1].tolist() == orders[1][10:]  # two batches already trained on
    assert len(full[0]) == 5 and len(ffcv_loader(split, 5, CPU, seed=7, num_workers=1, epoch=1,
                                                 start=10)) == 3


def _shard_labels(rank: int, world_size: int, path: str) -> dict[str, object]:
    split = BetonSplit(Path(path), read_meta(path, verify=False))
    loaders = [ffcv_loader(split, 8, CPU, seed=3, num_workers=1, epoch=e) for e in (0, 1)]
    epochs = [[int(v) for _, y in loader for v in y] for loader in loaders]
    return {"world": distributed_world(), "epochs": epochs, "batches": len(loaders[0])}


def _fork_safe_numba() -> bool:
    """Numba's TBB threading layer (Debian's libtbb comes with OpenCV) survives fork();
    GNU OpenMP does not, and then the children must be spawned (slower: re-imports)."""
    try:
        from numba.np.ufunc import tbbpool  # noqa: F401
    except ImportError:
        return False
    return True


def test_distributed_shards_cover_every_index_once(indexed: tuple[Path, torch.Tensor]) -> None:
    path, _ = indexed
    method = "fork" if _fork_safe_numba() else "spawn"
    out = run_distributed(_shard_labels, 2, str(path), timeout=120.0, start_method=method)
    assert [o["world"] for o in out] == [(0, 2), (1, 2)]
    assert [o["batches"] for o in out] == [3, 3]  # 24 samples per rank, batch 8
    for epoch in (0, 1):
        shards = [o["epochs"][epoch] for o in out]
        assert [len(s) for s in shards] == [N // 2, N // 2]
        assert sorted(shards[0] + shards[1]) == list(range(N))
    assert out[0]["epochs"][0] != out[0]["epochs"][1]


def test_training_run_from_synthetic_beton(synthetic_root: Path, tmp_path: Path) -> None:
    from dgn_dist.trainer import train

    cfg = load_config(CONFIGS / "synthetic_smoke.toml", [
        "run.device=cpu", "run.quiet=true", f"run.dir={tmp_path}", "run.epochs=2",
        "data.loader=ffcv", f"data.root={synthetic_root}", "data.num_workers=1",
        "data.augment=crop_flip", "data.val_fraction=0.1", "data.batch_size=32",
        "logging.tensorboard=false", "checkpoint.every_steps=0"])
    data = build_data(cfg.data, cfg.run.seed)
    assert (len(data.train), len(data.val), len(data.test)) == (288, 32, 96)
    assert data.input_shape == (3, 32, 32) and data.num_classes == 4
    summary = train(cfg)
    assert summary["steps"] == 2 * 9 and summary["epochs"] == 2
    assert summary["history"][-1]["train_loss"] < summary["history"][0]["train_loss"]
    assert summary["test_acc"] > 50.0  # 4 classes: far above chance


def test_missing_corrupt_and_mismatched_files(indexed: tuple[Path, torch.Tensor],
                                              synthetic_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found.*dgn-data write-beton"):
        read_meta(tmp_path / "none.beton")
    path, _ = indexed
    data = path.read_bytes()
    truncated = tmp_path / "cut.beton"
    truncated.write_bytes(data[: len(data) // 2])
    meta_path(truncated).write_text(meta_path(path).read_text())
    with pytest.raises(DataError, match="corrupt.*truncated or modified"):
        read_meta(truncated)
    garbage = tmp_path / "garbage.beton"  # a side-car that matches, a header that does not
    garbage.write_bytes(bytes(range(256)) * 64)
    fake = json.loads(meta_path(path).read_text())
    meta = BetonMeta(**{**fake, "size_bytes": garbage.stat().st_size,
                        "blake2b": file_digest(garbage), "shape": tuple(fake["shape"]),
                        "mean": tuple(fake["mean"]), "std": tuple(fake["std"])})
    meta_path(garbage).write_text(json.dumps(meta.__dict__))
    with pytest.raises(DataError, match="corrupt"):
        read_meta(garbage)
    (tmp_path / "nometa.beton").write_bytes(data)
    with pytest.raises(DataError, match="side-car"):
        read_meta(tmp_path / "nometa.beton")
    cfg = load_config(None, ["data.loader=ffcv", "data.dataset=synthetic",
                             f"data.beton_train={synthetic_root}/ffcv/synthetic_test.beton",
                             f"data.beton_test={synthetic_root}/ffcv/synthetic_test.beton"])
    with pytest.raises(DataError, match="expected the train split"):
        build_data(cfg.data, 0)
    with pytest.raises(DataError, match="supports data.dataset"):
        build_data(load_config(None, ["data.loader=ffcv"]).data, 0)  # digits


def test_write_beton_from_torchvision_cifar_files(tmp_path: Path) -> None:
    from test_data import make_cifar

    arrays = make_cifar(tmp_path, np.random.default_rng(0), 10)
    for split in ("train", "test"):
        out = tmp_path / f"c10_{split}.beton"
        assert dgn_data(["write-beton", "--dataset", "cifar10", "--split", split, "--root",
                         str(tmp_path), "--out", str(out), "--workers", "1"]) == 0
        meta = read_meta(out)
        assert (meta.dataset, meta.split, meta.num_classes) == ("cifar10", split, 10)
        assert meta.num_images == len(arrays[f"{split}_y"])
        assert np.array_equal(beton_labels(out), arrays[f"{split}_y"])
        train = arrays["train_x"].astype(np.float64) / 255  # both splits: training statistics
        assert np.allclose(meta.mean, train.mean(axis=(0, 2, 3)), rtol=0, atol=1e-12)
        assert np.allclose(meta.std, train.std(axis=(0, 2, 3)), rtol=0, atol=1e-12)


def test_missing_ffcv_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ffcv.loader", None)  # import ffcv.loader -> ImportError
    with pytest.raises(DataError, match=r"\./bootstrap\.sh --test.*\[ffcv\]"):
        require_ffcv()


def test_cuda_pipeline_moves_then_normalises_on_the_device() -> None:
    meta = BetonMeta("synthetic", "train", 1, (3, 32, 32), 2, MEAN, STD, "raw", 0, "")
    ops = image_pipeline(meta, True, torch.device("cuda"))
    names = [type(op).__name__ for op in ops]
    assert names == ["SimpleRGBImageDecoder", "RandomHorizontalFlip", "RandomTranslate",
                     "ToTensor", "ToDevice", "ToTorchImage", "Convert", "_Normalize"]
    x = torch.randint(0, 256, (2, 3, 4, 4)).float()
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(ops[-1](x), (x / 255 - mean) / std)
