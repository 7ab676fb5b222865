"""``dgn-data``: write and inspect FFCV ``.beton`` files; benchmark the FFCV loader.

Commands::

    dgn-data write-beton --dataset cifar10|cifar100|svhn|synthetic --split train|test
                         [--out FILE] [--root DIR] [--write-mode raw|jpg] [--workers N]
    dgn-data info FILE                   check a .beton (size, checksum, format) and print it
    dgn-data bench [--images 10000] [--workers 2] ...   FFCV vs torchvision DataLoader

CIFAR and SVHN are read from ``--root`` in torchvision's layout with the readers of
:mod:`dgn_dist.data.vision`; ``synthetic`` writes the class-template images of
:mod:`dgn_dist.data.synthetic`, quantised to uint8 (``128 + 48 x``, clipped). The side-car
stores the per-channel mean and std of the training split for both splits (synthetic: the
quantisation's ``128/255`` and ``48/255``, so the images come out standardised). ``--out``
defaults to ``<root>/ffcv/<dataset>_<split>.beton``, where ``data.loader = "ffcv"`` looks
by default. Exit status: 0 done, 2 user-fixable input (missing files, ffcv not installed).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from dgn_dist.data.beton import FFCV_DATASETS, default_beton_path, read_meta, write_beton
from dgn_dist.data.common import DataError, channel_stats

#: Quantisation of the (unit-variance) synthetic images to uint8: ``128 + SCALE * x``.
SYNTHETIC_U8_SCALE = 48.0


def quantise(images: Tensor) -> Tensor:
    """Unit-variance float images to uint8: ``round(128 + 48 x)`` clipped to ``[0, 255]``."""
    return (128.0 + SYNTHETIC_U8_SCALE * images).round().clamp(0, 255).to(torch.uint8)


def synthetic_split(split: str, size: int, classes: int, seed: int,
                    shape: tuple[int, int, int] = (3, 32, 32)) -> tuple[Tensor, Tensor]:
    """uint8 synthetic images of one split; train and test share the class templates of
    ``seed`` (the train images are drawn first, as in :func:`build_synthetic`)."""
    from dgn_dist.data.synthetic import class_templates, sample_images

    gen = torch.Generator().manual_seed(seed)
    templates = class_templates(shape, classes, gen)
    images, labels = sample_images(templates, size, gen)
    if split == "test":
        images, labels = sample_images(templates, size, gen)
    return quantise(images), labels


def source_arrays(args: argparse.Namespace) -> tuple[Tensor, Tensor, int, list[float],
                                                     list[float]]:
    """``(uint8 images, labels, classes, train mean, train std)`` of the requested split."""
    scale = 1.0 / 255.0
    if args.dataset == "synthetic":  # standardised by construction, as build_synthetic
        images, labels = synthetic_split(args.split, args.size, args.classes, args.seed)
        return images, labels, args.classes, [128.0 * scale] * 3, [SYNTHETIC_U8_SCALE * scale] * 3
    from dgn_dist.data.vision import SPECS, ensure_files, read_split

    spec, root = SPECS[args.dataset], Path(args.root).expanduser().resolve()
    ensure_files(spec, root, download=args.download)
    train_x, train_y = read_split(spec, root, train=True)
    mean, std = channel_stats(train_x, scale)
    images, labels = (train_x, train_y) if args.split == "train" else read_split(
        spec, root, train=False)
    return images, labels, spec.num_classes, mean, std


def cmd_write(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else default_beton_path(args.root, args.dataset,
                                                             args.split)
    images, labels, classes, mean, std = source_arrays(args)
    meta = write_beton(out, images, labels, dataset=args.dataset, split=args.split,
                       num_classes=classes, mean=mean, std=std, write_mode=args.write_mode,
                       jpeg_quality=args.jpeg_quality, num_workers=args.workers)
    print(f"wrote {out} ({meta.num_images} images {meta.shape}, {meta.num_classes} classes, "
          f"{meta.write_mode}, {meta.size_bytes / 2**20:.1f} MiB) and {out}.json", flush=True)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    meta = read_meta(args.file)
    print(json.dumps(asdict(meta), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgn-data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write-beton", help="write one split of a data set to a .beton")
    w.add_argument("--dataset", required=True, choices=FFCV_DATASETS)
    w.add_argument("--split", required=True, choices=("train", "test"))
    w.add_argument("--out", metavar="FILE", default="",
                   help="output .beton (default <root>/ffcv/<dataset>_<split>.beton)")
    w.add_argument("--root", default="data", help="torchvision-format data folder (data.root)")
    w.add_argument("--download", action="store_true",
                   help="let torchvision download missing files (needs internet)")
    w.add_argument("--write-mode", choices=("raw", "jpg"), default="raw",
                   help="raw pixels (exact, default) or JPEG (smaller, lossy)")
    w.add_argument("--jpeg-quality", type=int, default=90)
    w.add_argument("--workers", type=int, default=2, help="writer processes")
    w.add_argument("--size", type=int, default=10000, help="synthetic: images in the split")
    w.add_argument("--classes", type=int, default=10, help="synthetic: number of classes")
    w.add_argument("--seed", type=int, default=0, help="synthetic: seed of the images")
    w.set_defaults(func=cmd_write)
    i = sub.add_parser("info", help="check a .beton and print its side-car")
    i.add_argument("file")
    i.set_defaults(func=cmd_info)
    from dgn_dist.data.ffcv_bench import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dgn-data``; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        return int(args.func(args))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
