"""``dgn-data bench``: FFCV loader vs torchvision ``DataLoader`` on CIFAR-shaped images.

Both loaders read the same ``--images`` synthetic uint8 ``3x32x32`` images (10 classes) and
apply the paper's training augmentation (random crop with 4-pixel padding, horizontal flip)
and normalisation, with ``--workers`` workers and batch ``--batch-size``:

* ``torchvision``: the images as a ``torchvision.datasets.CIFAR10``-style data set (uint8 HWC
  arrays, one ``PIL`` image per sample through ``RandomCrop``, ``RandomHorizontalFlip``,
  ``ToTensor``, ``Normalize``) in a ``DataLoader`` with ``--workers`` worker processes;
* ``in-memory``: this project's torch path (``ImageTensorDataset`` with crop_flip);
* ``ffcv``: a raw-mode ``.beton`` through :class:`dgn_dist.data.ffcv.BetonSplit` with
  ``--workers`` threads.

Throughput is images/s over whole epochs after a first, untimed one (FFCV compiles its
pipeline there; DataLoader workers are started anew each epoch, as by default, and that start
is counted). ResNet-18 (torchvision's, CIFAR head) epoch time: SGD steps over the first
``--train-images`` images of an epoch (a reduced epoch on a CPU; the full-epoch time is
extrapolated linearly), from each loader.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

BenchLoader = Callable[[], Iterable[tuple[Tensor, Tensor]]]


class _TorchvisionStyle(torch.utils.data.Dataset[tuple[Tensor, int]]):
    """uint8 HWC images behind PIL + torchvision transforms, as ``datasets.CIFAR10``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: list[float],
                 std: list[float]) -> None:
        from torchvision import transforms

        self.images, self.labels = images, labels
        self.transform = transforms.Compose([
            transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), transforms.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def _throughput(make: BenchLoader, epochs: int, count: int) -> tuple[float, float]:
    """(first epoch seconds, images/s over the following ``epochs``)."""
    start = time.perf_counter()
    for _ in make():
        pass
    first = time.perf_counter() - start
    start = time.perf_counter()
    seen = 0
    for _ in range(epochs):
        for x, _y in make():
            seen += len(x)
    if seen != epochs * count:
        raise RuntimeError(f"a loader yielded {seen} images in {epochs} epochs of {count}")
    return first, seen / (time.perf_counter() - start)


def _train_time(make: BenchLoader, train_images: int) -> float:
    """Seconds of ResNet-18 SGD steps over the first ``train_images`` images of an epoch."""
    from dgn_dist.config.schema import ModelConfig
    from dgn_dist.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet18"), (3, 32, 32), 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    seen = 0
    start = time.perf_counter()
    for x, y in make():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y)
        if seen >= train_images:
            break
    return time.perf_counter() - start


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark (see the module docstring) and return the figures."""
    from dgn_dist.data.beton import read_meta, write_beton
    from dgn_dist.data.cli import synthetic_split
    from dgn_dist.data.common import ImageTensorDataset
    from dgn_dist.data.ffcv import BetonSplit

    n, b, w = args.images, args.batch_size, args.workers
    images, labels = synthetic_split("train", n, 10, seed=0)
    scale = 1.0 / 255.0
    mean, std = [128.0 * scale] * 3, [48.0 * scale] * 3
    folder = Path(args.dir or tempfile.mkdtemp(prefix="dgn-bench-"))
    path = folder / "bench_train.beton"
    write_beton(path, images, labels, dataset="synthetic", split="train", num_classes=10,
                mean=mean, std=std, num_workers=w)
    split = BetonSplit(path, read_meta(path), augment=True)
    cpu = torch.device("cpu")
    ffcv_epoch = [0]

    def ffcv() -> Iterable[tuple[Tensor, Tensor]]:
        loader = split.loader(b, cpu, train=True, seed=0, num_workers=w)
        ffcv_epoch[0] += 1
        return loader.with_epoch(ffcv_epoch[0])

    hwc = images.permute(0, 2, 3, 1).contiguous().numpy()
    tv_data = _TorchvisionStyle(hwc, labels.numpy(), mean, std)
    mem_data = ImageTensorDataset(images, labels, mean, std, scale, augment=True)

    def torchvision_loader() -> Iterable[tuple[Tensor, Tensor]]:
        return torch.utils.data.DataLoader(tv_data, batch_size=b, shuffle=True, num_workers=w)

    def memory_loader() -> Iterable[tuple[Tensor, Tensor]]:
        return torch.utils.data.DataLoader(mem_data, batch_size=b, shuffle=True, num_workers=w)

    loaders = {"ffcv": ffcv, "torchvision": torchvision_loader, "in-memory": memory_loader}
    out: dict[str, Any] = {"images": n, "batch_size": b, "workers": w,
                           "torch_threads": torch.get_num_threads(),
                           "train_images": args.train_images, "loaders": {}}
    for name, make in loaders.items():
        first, rate = _throughput(make, args.epochs, n)
        seconds = _train_time(make, args.train_images) if args.train_images else float("nan")
        out["loaders"][name] = {
            "first_epoch_s": first, "images_per_s": rate,
            "resnet18_reduced_epoch_s": seconds,
            "resnet18_epoch_s_extrapolated": seconds * n / max(args.train_images, 1)}
    base = out["loaders"]["torchvision"]["images_per_s"]
    out["ffcv_speedup_vs_torchvision"] = out["loaders"]["ffcv"]["images_per_s"] / base
    return out


def format_report(res: dict[str, Any]) -> str:
    """The benchmark as a small text table."""
    lines = [f"{res['images']} CIFAR-shaped images, batch {res['batch_size']}, "
             f"{res['workers']} workers, {res['torch_threads']} torch threads; ResNet-18 on "
             f"{res['train_images']} images per (reduced) epoch",
             f"{'loader':<12} {'images/s':>10} {'1st epoch s':>12} {'ResNet-18 s':>12} "
             f"{'-> full epoch s':>16}"]
    for name, r in res["loaders"].items():
        lines.append(f"{name:<12} {r['images_per_s']:10.0f} {r['first_epoch_s']:12.2f} "
                     f"{r['resnet18_reduced_epoch_s']:12.2f} "
                     f"{r['resnet18_epoch_s_extrapolated']:16.1f}")
    lines.append(f"ffcv / torchvision loader throughput: "
                 f"{res['ffcv_speedup_vs_torchvision']:.2f}x")
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> int:
    res = run_bench(args)
    print(format_report(res), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


def add_bench_parser(sub: Any) -> None:
    """Register ``dgn-data bench`` on the sub-command parsers of ``dgn-data``."""
    p = sub.add_parser("bench", help="FFCV loader vs torchvision DataLoader throughput and "
                       "ResNet-18 epoch time")
    p.add_argument("--images", type=int, default=10000, help="CIFAR-shaped images")
    p.add_argument("--workers", type=int, default=2, help="loader workers / FFCV threads")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs after the first")
    p.add_argument("--train-images", type=int, default=1024,
                   help="ResNet-18 steps over this many images per loader (0 = skip)")
    p.add_argument("--dir", default="", help="folder for the .beton (default: a temp dir)")
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_bench)
