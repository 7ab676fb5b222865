"""``dgn-bench``: step time and peak memory of the optimizers on the paper's networks.

Every (model, optimizer) pair runs the ordinary training step on one fixed synthetic batch
(random images of the model's input shape, 10 classes): ``--warmup`` untimed steps, then
``--steps`` timed ones. Reported per pair, with ratios to SGD measured in the same run:

* step time: median (and mean) wall time of one full step -- forward, loss, backward,
  ``optimizer.step()`` -- with the device synchronised around each step. The median hides
  the periodic eigenbasis refresh of EKFAC; the mean includes it.
* peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` (reset before the model is
  built) minus the memory allocated before, i.e. model, batch, activations, gradients and
  optimizer state. On the CPU, the growth of the process's peak resident set (Linux
  ``VmHWM``, reset through ``/proc/self/clear_refs``) over the resident set before the model
  is built -- the same quantities plus allocator slack; ``nan`` where the kernel does not
  allow the reset. ``tracemalloc`` does not see torch's allocations and is not used.

Monitoring: ``--stats-every N`` runs with ``logging.curvature_every = N`` and reads the
optimizer's curvature statistics (and eigenvalue histograms) every ``N`` steps inside the timed
step, as the trainer does; the default 0 measures the optimizer with monitoring off.
``--count-ops`` adds the number of ATen operators of one further step
(:mod:`dgn_dist.opcount`): a GPU step of many small operators is bound by their launches.
``--profile K`` adds, per pair, the ``K`` most expensive operators of two further steps
(``torch.profiler``, self CPU time, and CUDA time on a GPU).

Input shapes: digits_resnet 1x8x8, mnist_resnet 1x28x28, svhn_resnet 3x32x32, resnet18 and
the rest 3x32x32 (CIFAR).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import json
import math
import statistics
import sys
import time
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dgn_dist.allocator import add_allocator_argument, configure_cpu_allocator
from dgn_dist.config import load_config
from dgn_dist.config.recipes import DGNOPT_RECIPE
from dgn_dist.config.schema import Config, ModelConfig, OptimConfig

MODEL_CHOICES = typing.get_args(typing.get_type_hints(ModelConfig)["name"])
#: Benchmark names: the trainer's ``optim.name`` choices, plus ``dgnopt-gr`` (DGNOpt with
#: ``game.info = "gr"``; plain ``dgnopt`` is the default ``fne``).
#: Benchmark names beyond ``optim.name``: ``(optim.name, game.info, config overrides)``.
#: ``dgnopt-recipe`` is DGNOpt-FNE with the DIGITS recipe's closed-loop settings
#: (:data:`dgn_dist.config.recipes.DGNOPT_RECIPE`) at the benchmark's shared damping.
VARIANTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "dgnopt-gr": ("dgnopt", "gr", ()),
    "dgnopt-recipe": ("dgnopt", "fne", DGNOPT_RECIPE)}
OPTIM_CHOICES = typing.get_args(typing.get_type_hints(OptimConfig)["name"]) + tuple(VARIANTS)
INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "digits_resnet": (1, 8, 8), "mnist_resnet": (1, 28, 28), "mlp": (1, 8, 8)}
DEFAULT_SHAPE = (3, 32, 32)
NUM_CLASSES = 10

#: ``dgn-bench NAME ...``: the distributed benchmarks.
SUBCOMMANDS = {"dp": "dgn_dist.distributed.bench", "pipeline": "dgn_dist.pipeline.bench",
               "pipeline-convergence": "dgn_dist.pipeline.convergence",
               "parity": "dgn_dist.parity", "floor": "dgn_dist.pass_floor"}


@dataclass
class Result:
    model: str
    optimizer: str
    median_ms: float
    mean_ms: float
    peak_mib: float
    time_ratio: float = math.nan  # median step time / SGD's
    memory_ratio: float = math.nan  # peak memory / SGD's
    note: str = ""
    ops_per_step: int = 0  # --count-ops: ATen operators of one step (0 = not counted)


def _release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``), so that memory reused
    from an earlier measurement counts as growth again; a no-op without glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryProbe:
    """Peak memory between :meth:`start` and :meth:`peak_mib` (see the module docstring)."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.base = 0

    @staticmethod
    def _status_kib(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise OSError(f"{field} not in /proc/self/status")

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        _release_free_heap()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
            self.base = self._status_kib("VmRSS") * 1024
        except OSError:
            self.base = -1

    def peak_mib(self) -> float:
        import torch

        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        if self.base < 0:
            return math.nan
        return (self._status_kib("VmHWM") * 1024 - self.base) / 2**20


def bench_config(model_name: str, optim_name: str, lr: float) -> Config:
    """The config of one benchmark pair (``optim_name`` may be a :data:`VARIANTS` name)."""
    name, info, overrides = VARIANTS.get(optim_name, (optim_name, Config().game.info, ()))
    cfg = load_config(None, list(overrides))
    cfg.model.name = model_name  # type: ignore[assignment]
    cfg.optim.name, cfg.game.info = name, info  # type: ignore[assignment]
    cfg.optim.lr = lr
    return cfg


def measure(model_name: str, optim_name: str, batch_size: int, steps: int, warmup: int,
            device: Any, stats_every: int = 0, profile: int = 0,
            chunk_mb: float = 0.0, count_ops: bool = False) -> Result:
    """Time ``steps`` training steps of one (model, optimizer) pair after ``warmup`` steps
    (module docstring for ``stats_every`` and ``profile``)."""
    import torch
    import torch.nn.functional as F

    from dgn_dist.metrics import curvature_histograms, curvature_scalars
    from dgn_dist.models import build_model
    from dgn_dist.opcount import count_operators
    from dgn_dist.optim import build_optimizer

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    probe = MemoryProbe(device)
    probe.start()
    torch.manual_seed(0)
    shape = INPUT_SHAPES.get(model_name, DEFAULT_SHAPE)
    cfg = bench_config(model_name, optim_name, lr=0.01)
    cfg.logging.curvature_every = stats_every
    cfg.curvature.chunk_mb = chunk_mb
    model = build_model(cfg.model, shape, NUM_CLASSES).to(device)
    optimizer = build_optimizer(cfg, model)
    x = torch.randn(batch_size, *shape, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)
    times = []

    def one_step(i: int) -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if stats_every and (i + 1) % stats_every == 0:
            curvature_scalars(optimizer)
            [v.cpu() for v in curvature_histograms(optimizer).values()]

    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        one_step(i)
        sync()
        if i >= warmup:
            times.append(1000.0 * (time.perf_counter() - start))
    peak = probe.peak_mib()
    if profile:
        print(profile_table(lambda: [one_step(warmup + steps + i)  # type: ignore[func-returns-value]
                                     for i in range(2)],
                            device, profile, f"{model_name} / {optim_name}"), flush=True)
    ops = count_operators(lambda: one_step(warmup + steps)) if count_ops else 0
    return Result(model_name, optim_name, statistics.median(times), statistics.fmean(times),
                  peak, ops_per_step=ops)


def profile_table(run: Any, device: Any, rows: int, title: str) -> str:
    """The ``rows`` most expensive operators of ``run()`` (self CPU time, CUDA on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return f"profile of 2 steps, {title}:\n" + prof.key_averages().table(sort_by=key,
                                                                        row_limit=rows)


def add_ratios(results: list[Result]) -> None:
    """Fill in the ratios to the SGD result of the same model."""
    sgd = {r.model: r for r in results if r.optimizer == "sgd" and not r.note}
    for r in results:
        base = sgd.get(r.model)
        if base is not None and not r.note:
            r.time_ratio = r.median_ms / base.median_ms
            if base.peak_mib > 0:
                r.memory_ratio = r.peak_mib / base.peak_mib


def format_table(results: list[Result]) -> str:
    """A fixed-width text table, one row per (model, optimizer); an ``ops/step`` column when
    the operators were counted."""
    ops = any(r.ops_per_step for r in results)
    header = (f"{'model':<14} {'optimizer':<9} {'median ms':>10} {'mean ms':>9} "
              f"{'x SGD':>6} {'peak MiB':>9} {'x SGD':>6}" + (f" {'ops/step':>9}" if ops else "")
              + "  note")
    lines = [header, "-" * len(header)]
    for r in results:
        if r.note:
            lines.append(f"{r.model:<14} {r.optimizer:<9} {'-':>10} {'-':>9} {'-':>6} "
                         f"{'-':>9} {'-':>6}" + (f" {'-':>9}" if ops else "") + f"  {r.note}")
            continue
        lines.append(f"{r.model:<14} {r.optimizer:<9} {r.median_ms:10.2f} {r.mean_ms:9.2f} "
                     f"{r.time_ratio:6.2f} {r.peak_mib:9.1f} {r.memory_ratio:6.2f}"
                     + (f" {r.ops_per_step:9d}" if ops else ""))
    return "\n".join(lines)


def _names(text: str, choices: Sequence[str], flag: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in choices]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"{flag}: unknown name(s) {', '.join(bad) or '(none given)'}; valid choices: "
            f"{', '.join(choices)}")
    return names


def _json_row(result: Result) -> dict[str, Any]:
    """A result as strict JSON (``nan`` -> ``null``)."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v
            for k, v in asdict(result).items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dgn-bench", description="Step time and peak memory of the optimizers, with "
        "ratios to SGD measured in the same run.")
    parser.add_argument("--models", default="digits_resnet,mnist_resnet,resnet18",
                        type=lambda s: _names(s, MODEL_CHOICES, "--models"),
                        help="comma-separated model names (default: %(default)s)")
    parser.add_argument("--optimizers", default="sgd,adam,ekfac,dgnopt",
                        type=lambda s: _names(s, OPTIM_CHOICES, "--optimizers"),
                        help="comma-separated optimizers (dgnopt = FNE, dgnopt-gr = GR); sgd is "
                             "added for the ratios (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128, help="default: %(default)s")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (default: "
                        "%(default)s)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="default: %(default)s (cuda when available)")
    parser.add_argument("--json", metavar="OUT", default=None, help="also write the results "
                        "as JSON to OUT")
    parser.add_argument("--stats-every", type=int, default=0, metavar="N",
                        help="read curvature statistics and eigenvalue histograms every N "
                        "steps, inside the timed step (default: 0 = monitoring off)")
    parser.add_argument("--chunk-mb", type=float, default=0.0, metavar="MB",
                        help="dgnopt: curvature.chunk_mb, the per-sample chunk budget in MiB "
                        "(default: 0 = auto, 64 on the CPU and 256 on a GPU)")
    parser.add_argument("--count-ops", action="store_true",
                        help="count the ATen operators of one more step per pair (a GPU "
                        "step of many small operators is bound by their launches)")
    add_allocator_argument(parser)
    parser.add_argument("--profile", type=int, default=0, metavar="K",
                        help="print the K most expensive operators of two extra steps per "
                        "pair (torch.profiler; default: 0 = no profile)")
    return parser


def first_bad_bound(bounds: Sequence[tuple[str, float, float]]) -> bool:
    """Print ``error: FLAG must be >= LOW`` for the first ``(flag, value, low)`` with
    ``value < low``; True when there was one (the command then exits 2)."""
    for flag, value, low in bounds:
        if value < low:
            print(f"error: {flag} must be >= {low}, got {value}", file=sys.stderr)
            return True
    return False


def resolve_bench_device(name: str, cpu_allocator: str) -> Any | None:
    """Apply ``--cpu-allocator`` (before torch allocates), then resolve ``--device``;
    ``None`` after printing the error (the command then exits 2)."""
    configure_cpu_allocator(cpu_allocator)
    from dgn_dist.device import DeviceError, resolve_device

    try:
        return resolve_device(name)
    except DeviceError as err:
        print(f"error: {err}", file=sys.stderr)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dgn-bench``; 0 on success, 2 for bad arguments.

    ``dgn-bench dp ...``, ``dgn-bench pipeline ...`` and ``dgn-bench floor ...`` run the
    data-parallel (:mod:`dgn_dist.distributed.bench`), pipeline
    (:mod:`dgn_dist.pipeline.bench`) and pass-floor (:mod:`dgn_dist.pass_floor`) benchmarks
    instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[0]])
        return int(module.main(argv[1:]))
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if first_bad_bound((("--batch-size", args.batch_size, 1), ("--steps", args.steps, 1),
                        ("--warmup", args.warmup, 0), ("--stats-every", args.stats_every, 0),
                        ("--profile", args.profile, 0), ("--chunk-mb", args.chunk_mb, 0))):
        return 2
    device = resolve_bench_device(args.device, args.cpu_allocator)
    if device is None:
        return 2
    import torch

    optimizers = ["sgd"] + [o for o in args.optimizers if o != "sgd"]
    # One throwaway step first: lazy library initialisation would otherwise be charged to
    # the first measurement's time and memory.
    measure(args.models[0], "sgd", args.batch_size, 1, 1, device)
    results: list[Result] = []
    for model_name in args.models:
        for optim_name in optimizers:
            try:
                results.append(measure(model_name, optim_name, args.batch_size, args.steps,
                                       args.warmup, device, args.stats_every, args.profile,
                                       args.chunk_mb, args.count_ops))
            except (ImportError, ValueError, RuntimeError, KeyError) as err:
                note = f"skipped: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
                results.append(Result(model_name, optim_name, math.nan, math.nan, math.nan,
                                      note=note))
    add_ratios(results)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"dgn-bench on {name} (torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads), batch {args.batch_size}, {args.steps} timed steps after {args.warmup}"
          f", stats every {args.stats_every or 'never'}, chunk_mb {args.chunk_mb:g}")
    print(format_table(results))
    if args.json:
        payload = {"device": name, "torch": torch.__version__, "batch_size": args.batch_size,
                   "steps": args.steps, "warmup": args.warmup,
                   "stats_every": args.stats_every, "chunk_mb": args.chunk_mb,
                   "memory": "cuda max_memory_allocated" if device.type == "cuda"
                   else "peak RSS growth (VmHWM)",
                   "results": [_json_row(r) for r in results]}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
