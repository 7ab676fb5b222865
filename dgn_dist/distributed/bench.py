"""Data-parallel benchmark: step time and bytes all-reduced, dp=1 vs dp=2 at one global batch.

    dgn-bench dp [--model mnist_resnet] [--optimizers sgd,ekfac,dgnopt] [--batch 256]
                 [--steps 5] [--warmup 2] [--world 2] [--json FILE]

For each optimizer it times ``--steps`` training steps (after ``--warmup``) of

* ``dp=1``: one process on the whole global batch, with 1 thread and with ``--world``
  threads (the whole machine);
* ``dp=N``: ``--world`` gloo processes, one thread each, ``batch / N`` examples each;

and reports the bytes each rank hands to all-reduces per step (gradients, Kronecker factors,
cooperative cross factors, feedback gradients, eigenbasis broadcasts). The overlap is the
fraction of the communication time hidden behind compute::

    overlap = (t_compute + t_comm - t_step) / t_comm   (clipped to [0, 1])

with ``t_compute`` the one-process step time on the LOCAL batch and ``t_comm`` the time the
same bytes take in blocking all-reduces of the same bucket size on the same group.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from dgn_dist.allocator import (
    DEFAULT_CPU_ALLOCATOR,
    add_allocator_argument,
    child_env,
    configure_cpu_allocator,
)
from dgn_dist.distributed.spawn import run_workers

NUM_CLASSES = 10
SHAPES = {"mnist_resnet": (1, 28, 28), "digits_resnet": (1, 8, 8), "svhn_resnet": (3, 32, 32),
          "resnet18": (3, 32, 32), "mlp": (1, 8, 8), "table3_cnn": (1, 28, 28)}


@dataclass
class Row:
    """One measurement."""

    optimizer: str
    setting: str  # "dp=1 (1 thread)", "dp=1 (2 threads)", "dp=2"
    ms_per_step: float
    bytes_per_step: dict[str, float]
    ratio_to_dp1: float | None = None
    overlap: float | None = None


def _build(model_name: str, optim_name: str) -> tuple[Any, Any, Any]:
    import torch

    from dgn_dist.config import Config
    from dgn_dist.game.training import build_training_optimizer
    from dgn_dist.models import build_model

    torch.manual_seed(0)
    cfg = Config()
    cfg.model.name = model_name  # type: ignore[assignment]
    cfg.optim.name = optim_name  # type: ignore[assignment]
    cfg.optim.lr = 0.01
    cfg.curvature.damping = 0.3
    model = build_model(cfg.model, SHAPES.get(model_name, (1, 28, 28)), NUM_CLASSES)
    return cfg, model, build_training_optimizer(cfg, model)


def _time_steps(model: Any, optimizer: Any, x: Any, y: Any, steps: int, warmup: int,
                sync: Any) -> float:
    import torch.nn.functional as F

    times = []
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync()
        if i >= warmup:
            times.append(1000.0 * (time.perf_counter() - start))
    return statistics.median(times)


def _data(batch: int, model_name: str, seed: int) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    shape = SHAPES.get(model_name, (1, 28, 28))
    return torch.randn(batch, *shape, generator=g), torch.randint(0, NUM_CLASSES, (batch,),
                                                                    generator=g)


def single_process(model_name: str, optim_name: str, batch: int, steps: int, warmup: int,
                   threads: int) -> float:
    """Median ms per step of one process on ``batch`` examples with ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    _, model, optimizer = _build(model_name, optim_name)
    x, y = _data(batch, model_name, 0)
    return _time_steps(model, optimizer, x, y, steps, warmup, lambda: None)


def _comm_only_ms(bytes_per_step: dict[str, float], bucket_bytes: int) -> float:
    """Blocking all-reduces of the measured bytes in buckets of ``bucket_bytes``."""
    import torch
    import torch.distributed as dist

    total = int(sum(v for k, v in bytes_per_step.items() if k != "inverse"))
    sizes = [bucket_bytes] * (total // bucket_bytes) + ([total % bucket_bytes]
                                                         if total % bucket_bytes else [])
    buffers = [torch.zeros(max(s // 4, 1)) for s in sizes]
    times = []
    for _ in range(5):
        dist.barrier()
        start = time.perf_counter()
        for b in buffers:
            dist.all_reduce(b)
        times.append(1000.0 * (time.perf_counter() - start))
    return statistics.median(times)


def _measure(rank: int, world: int, port: int, args: dict[str, Any]) -> dict[str, Any]:
    """One rank of the ``dp=world`` measurement; :func:`run_workers` sets the ``env://``
    variables and closes the group."""
    del port
    configure_cpu_allocator(args.get("cpu_allocator", DEFAULT_CPU_ALLOCATOR))
    import torch
    import torch.distributed as dist

    from dgn_dist.distributed.dgnopt_dp import (
        attach_data_parallel,
        average_ekfac_factors,
        average_gradients_before_step,
    )
    from dgn_dist.distributed.reduce import ByteCounter

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    bucket = int(args["bucket_mb"] * (1 << 20))
    results = {}
    for name in args["optimizers"]:
        cfg, model, optimizer = _build(args["model"], name)
        counter = ByteCounter()
        if name == "dgnopt":
            attach_data_parallel(optimizer, bucket_bytes=bucket, counter=counter)
        else:
            average_gradients_before_step(optimizer, bucket_bytes=bucket, counter=counter)
            if name == "ekfac":
                average_ekfac_factors(optimizer, bucket_bytes=bucket, counter=counter)
        x, y = _data(args["batch"], args["model"], 0)
        local = args["batch"] // world
        xs, ys = x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local]
        ms = _time_steps(model, optimizer, xs, ys, args["steps"], args["warmup"], dist.barrier)
        per_step = {k: v / (args["steps"] + args["warmup"]) for k, v in counter.as_dict().items()}
        results[name] = {"ms": ms, "bytes": per_step, "comm_ms": _comm_only_ms(per_step, bucket)}
        del cfg
    return results


def data_parallel(args: dict[str, Any], world: int) -> dict[str, Any]:
    """Run :func:`_measure` on ``world`` gloo processes; rank 0's results."""
    return run_workers(_measure, world, args, timeout=3600.0,
                       env=child_env(args.get("cpu_allocator", DEFAULT_CPU_ALLOCATOR)))[0]


def format_rows(rows: list[Row]) -> str:
    """A Markdown table."""
    lines = ["| optimizer | setting | ms/step | ratio to dp=1 (1 thread) | overlap | bytes "
             "all-reduced per step and rank |", "|---|---|---:|---:|---:|---|"]
    for r in rows:
        nbytes = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sorted(r.bytes_per_step.items()))
        lines.append(f"| {r.optimizer} | {r.setting} | {r.ms_per_step:.1f} | "
                     f"{'-' if r.ratio_to_dp1 is None else f'{r.ratio_to_dp1:.2f}x'} | "
                     f"{'-' if r.overlap is None else f'{100 * r.overlap:.0f}%'} | "
                     f"{nbytes or '-'} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgn-bench dp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mnist_resnet", choices=sorted(SHAPES))
    parser.add_argument("--optimizers", default="sgd,ekfac,dgnopt",
                        help="comma list of sgd, adam, rmsprop, ekfac, dgnopt")
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--world", type=int, default=2, help="data-parallel processes")
    parser.add_argument("--bucket-mb", type=float, default=4.0)
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    add_allocator_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dgn-bench dp``."""
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    valid = {"sgd", "adam", "rmsprop", "ekfac", "dgnopt"}
    bad = [n for n in names if n not in valid]
    if bad or args.batch % args.world or args.world < 2:
        print(f"error: --optimizers must be from {sorted(valid)}, --world >= 2 and --batch "
              f"divisible by --world (got {names}, {args.world}, {args.batch})")
        return 2
    settings = {"model": args.model, "optimizers": names, "batch": args.batch,
                "steps": args.steps, "warmup": args.warmup, "bucket_mb": args.bucket_mb,
                "cpu_allocator": args.cpu_allocator}
    configure_cpu_allocator(args.cpu_allocator)  # the dp=1 rows run in this process
    print(f"model {args.model}, global batch {args.batch}, {args.steps} timed steps after "
          f"{args.warmup}; dp={args.world} over gloo ...", flush=True)
    dp = data_parallel(settings, args.world)
    rows: list[Row] = []
    for name in names:
        one = single_process(args.model, name, args.batch, args.steps, args.warmup, 1)
        full = single_process(args.model, name, args.batch, args.steps, args.warmup, args.world)
        local = single_process(args.model, name, args.batch // args.world, args.steps,
                               args.warmup, 1)
        res = dp[name]
        overlap = None
        if res["comm_ms"] > 0:
            overlap = min(1.0, max(0.0, (local + res["comm_ms"] - res["ms"]) / res["comm_ms"]))
        rows += [Row(name, "dp=1 (1 thread)", one, {}, 1.0),
                 Row(name, f"dp=1 ({args.world} threads)", full, {}, full / one),
                 Row(name, f"dp={args.world}", res["ms"], res["bytes"], res["ms"] / one, overlap)]
        print(f"{name}: dp=1 {one:.1f} ms ({args.world} threads {full:.1f} ms), "
              f"dp={args.world} {res['ms']:.1f} ms, comm alone {res['comm_ms']:.1f} ms, "
              f"local-batch compute {local:.1f} ms", flush=True)
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([asdict(r) for r in rows], handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
