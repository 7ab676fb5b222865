"""``dgn-bench pipeline``: bytes per boundary, step time and memory of pipelined DGNOpt.

For each model (synthetic data, fixed seed) it runs, each in fresh processes on gloo/CPU:

* ``pp=1``: the runner on one process (no pipeline, no communication) -- the baseline;
* ``pp=2 exact`` and ``pp=2 stale_k`` on 2 processes with ``--micro-batches`` micro-batches;

and prints the mean step time over ``--steps`` steps after ``--warmup`` untimed ones (the
first step refreshes every eigenbasis), the per-pass times of each rank, the bytes each
boundary carried per pass against the formula ``mb·d·(1+r)`` per state tensor and
micro-batch (``d`` one example's size of the tensor, 4- or 8-byte floats; forward and
update pass carry ``mb·d``), and per rank the parameter, curvature-state and stored-activation
bytes and the peak RSS. Every process uses ``--threads`` intra-op threads, so ``pp=2`` uses
twice the cores of ``pp=1``.

For each ``pp=2`` row it also prints the lower bound of :func:`tail_bound`: stage ``t+1``'s
step needs ``δX_{t+1} = F_t(X'_t, θ'_t) − X_{t+1}``, so it waits for stage ``t``'s step on the
whole batch (Alg. 1 lines 8-12), and without the next batch the ranks before the last have
nothing left to do while the last rank runs its update pass. With the ranks' measured CPU
time as the work, the bound says how far scheduling alone could go; with pp=1's work, how far
it could go with no pipeline overhead. By default every step announces the next batch
(``train_step(x, y, next_x)``), so those ranks run the next forward in that window
(:mod:`dgn_dist.pipeline.lookahead`) and the bound drops the idle term (``work / pp``);
``--no-lookahead`` measures the schedule without it.

``--rounds N`` runs every configuration N times, alternated (pp1, then each pp2 mode, again),
and prints each pp2 step over the pp1 of the same round and the median of those ratios
(:func:`format_rounds`): the machine's speed drifts between runs minutes apart.

Example: ``dgn-bench pipeline --models mnist_resnet,resnet18 --batch-size 64 --steps 3``.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from dgn_dist.allocator import (
    DEFAULT_CPU_ALLOCATOR,
    add_allocator_argument,
    child_env,
    configure_cpu_allocator,
)
from dgn_dist.distributed.spawn import run_workers

MODELS = ("digits_resnet", "mnist_resnet", "resnet18")
SHAPES = {"digits_resnet": (1, 8, 8), "mnist_resnet": (1, 28, 28), "resnet18": (3, 32, 32)}


def _measure(rank: int, world: int, port: int, spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from dgn_dist.config.schema import ModelConfig
    from dgn_dist.distributed.env import DistContext
    from dgn_dist.distributed.validate import ParallelDims
    from dgn_dist.models import build_model
    from dgn_dist.pipeline.comm import meta_copy, state_specs
    from dgn_dist.pipeline.runner import build_pipeline_runner

    configure_cpu_allocator(spec.get("cpu_allocator", DEFAULT_CPU_ALLOCATOR))
    torch.set_num_threads(spec["threads"])
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=spec["timeout"]))
    torch.manual_seed(0)
    shape = SHAPES[spec["model"]]
    model = build_model(ModelConfig(name=spec["model"]), shape, 10)
    ctx = DistContext(rank, world, rank, torch.device("cpu"), "gloo" if world > 1 else None,
                      "env" if world > 1 else "none", rank == 0)
    runner = build_pipeline_runner(model, spec["optim"], ctx, ParallelDims(spec["pp"], 1, world),
                                   micro_batches=spec["micro"], mode=spec["mode"],
                                   partition=spec["partition"],
                                   feedback_ahead=spec.get("feedback_ahead", True))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(spec["batch"], *shape, generator=g)
    y = torch.randint(0, 10, (spec["batch"],), generator=g)
    # The next batch (the same one) is announced within the warm-up and within the timed
    # steps, so each window sends one forward per step.
    ahead = x if spec.get("lookahead", True) else None
    for i in range(spec["warmup"]):
        runner.train_step(x, y, next_x=None if i == spec["warmup"] - 1 else ahead)
    runner.comm_stats()
    times, losses = [], []
    cpu = time.process_time()
    for i in range(spec["steps"]):
        start = time.perf_counter()
        last = i == spec["steps"] - 1
        losses.append(runner.train_step(x, y, next_x=None if last else ahead).loss)
        times.append(time.perf_counter() - start)
    cpu = (time.process_time() - cpu) / spec["steps"]
    stats = runner.comm_stats()
    result: dict[str, Any] = {"step_s": sum(times) / len(times), "losses": losses, "rss0": rss0,
                              "cpu_s": cpu,
                              "stats": stats, "ranges": [list(r) for r in runner.ranges]}
    if rank == 0 and spec["pp"] > 1:  # the formula at each boundary, per step
        mb = spec["batch"] // spec["micro"]
        specs = state_specs(meta_copy(runner.game), shape, x.dtype, mb)
        r = 1 if spec["optim"].get("vxx", "empirical") == "empirical" else \
            (spec["optim"].get("rank", 1) if spec["optim"]["vxx"] == "sampled" else 10)
        bounds = [rg.start for rg in runner.ranges[1:]]
        result["boundaries"] = [{
            "stage": t, "tensors": [list(s.shape) for s in specs[t]],
            "forward": spec["micro"] * sum(math.prod(s.shape) * 4 for s in specs[t]),
            "sweep": spec["micro"] * sum(math.prod(s.shape) * (1 + r) * 4 for s in specs[t]),
        } for t in bounds]
    return result  # run_workers closes the group (barrier first)


def run_config(spec: dict[str, Any], target: Any = None) -> list[dict[str, Any]]:
    """Run ``target(rank, world, port, spec)`` (default: the timing measurement) on
    ``spec['pp']`` fresh processes; per-rank results (:func:`run_workers`)."""
    # Set before the children import torch: LAPACK/OpenMP then use the same thread count as
    # torch (a float32 eigh of an ill-conditioned factor can fail with more threads).
    return run_workers(target or _measure, spec["pp"], spec, timeout=spec["timeout"],
                       env={"OMP_NUM_THREADS": str(spec.get("threads", 1)),
                            **child_env(spec.get("cpu_allocator", DEFAULT_CPU_ALLOCATOR))})


def tail_bound(work_s: float, last_update_s: float, pp: int) -> float:
    """The shortest step of ``pp`` ranks that do ``work_s`` seconds of work in all, when every
    rank before the last is idle through the last rank's update pass (``last_update_s``):
    ``pp · step >= work + (pp − 1) · last_update`` (module docstring)."""
    if work_s <= 0 or last_update_s < 0 or pp < 1:
        raise ValueError(f"need work_s > 0, last_update_s >= 0, pp >= 1; got work_s={work_s}, "
                         f"last_update_s={last_update_s}, pp={pp}")
    return (work_s + (pp - 1) * last_update_s) / pp


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def format_report(model: str, rows: list[tuple[str, list[dict[str, Any]]]],
                  lookahead: bool = True) -> str:
    base = step_time(rows[0][1])
    lines = [f"== {model}", f"{'config':<18}{'step s':>9}{'x pp1':>7}  per rank: cpu s/step, "
             "forward/sweep/update s (p2p wait, feedback forwards run ahead) | "
             "params/curv/act MiB | peak RSS growth MiB"]
    for name, ranks in rows:
        step = step_time(ranks)
        per = []
        for i, r in enumerate(ranks):
            s = {k: r["stats"][f"{k}/rank{i}"] for k in r["stats"] if f"{k}/rank{i}" in
                 r["stats"]}
            per.append(f"r{i} cpu {r['cpu_s']:.2f} {s['time/forward']:.2f}/{s['time/sweep']:.2f}/"
                       f"{s['time/update']:.2f} (wait {s['time/p2p_wait']:.2f}, ahead "
                       f"{s.get('overlap/feedback_ahead', 0.0):.2f}) | "
                       f"{_mib(s['memory/params_bytes'])}/"
                       f"{_mib(s['memory/curvature_bytes'])}/"
                       f"{_mib(s['memory/activations_bytes'])} | "
                       f"{_mib(s['memory/peak_rss_bytes'] - r['rss0'])}")
        lines.append(f"{name:<18}{step:>9.3f}{step / base:>7.2f}  " + "  ;  ".join(per))
    for name, ranks in rows[1:]:
        pp, last = len(ranks), ranks[-1]["stats"]
        # The update pass's time includes waiting for δX; every wait of the step is taken
        # off it, so the tail (and the bound) can only be underestimated. Running ahead, the
        # others work through it: no idle term.
        tail = 0.0 if lookahead else max(0.0, last[f"time/update/rank{pp - 1}"]
                                         - last[f"time/p2p_wait/rank{pp - 1}"])
        work = sum(r["cpu_s"] for r in ranks)
        idle = "the others run the next forward during the last rank's update" if lookahead \
            else f"the last rank's update >= {tail:.2f} s with the others idle"
        lines.append(
            f"  {name} bound: ranks' CPU {work:.2f} s in all ({work / base:.2f}x pp1's), "
            f"{idle} -> step >= "
            f"{tail_bound(work, tail, pp) / base:.3f}x pp1 (with pp1's work: "
            f"{tail_bound(base, tail, pp) / base:.3f}x)")
    for name, ranks in rows[1:]:
        s = ranks[0]["stats"]
        for b in ranks[0].get("boundaries", []):
            sweep_sent = s["comm/sweep_bytes/rank1"]
            lines.append(
                f"  {name} boundary before stage {b['stage']} {b['tensors']}: forward "
                f"{s['comm/forward_bytes/rank0']:.0f} B (formula {b['forward']}), sweep "
                f"{sweep_sent:.0f} B (formula mb*d*(1+r): {b['sweep']}), update "
                f"{s['comm/update_bytes/rank0']:.0f} B, dp all-reduce "
                f"{s['comm/allreduce_bytes']:.0f} B")
    return "\n".join(lines)


def step_time(ranks: list[dict[str, Any]]) -> float:
    """A configuration's step time: its slowest rank's mean step."""
    return max(r["step_s"] for r in ranks)


def format_rounds(model: str, rounds: list[list[tuple[str, list[dict[str, Any]]]]]) -> str:
    """Step times over alternated rounds (each round runs every configuration once, pp1
    first) and each ``pp2`` row's ratio to the pp1 of ITS round, with the median of those
    ratios: on a shared machine the speed drifts between rounds more than within one, so a
    ratio of two runs minutes apart says less than the median of per-round ratios."""
    names = [name for name, _ in rounds[0]]
    lines = [f"== {model}: {len(rounds)} alternated rounds (step s; x pp1 of the same round)"]
    for i, name in enumerate(names):
        steps = [step_time(rows[i][1]) for rows in rounds]
        text = f"{name:<18}" + " ".join(f"{s:8.3f}" for s in steps) + \
            f"   median {statistics.median(steps):.3f} s"
        if i:
            ratios = [step_time(rows[i][1]) / step_time(rows[0][1]) for rows in rounds]
            text += "   x pp1: " + " ".join(f"{r:.3f}" for r in ratios) + \
                f"   median {statistics.median(ratios):.3f}"
        lines.append(text)
    return "\n".join(lines)


def pp2_configs(modes: Sequence[str], feedback_ahead: str) -> list[tuple[str, bool]]:
    """The pp=2 configurations of a round: each mode, with the feedback forwards run ahead
    (``on``), after ``δX`` (``off``) or both ways, in that order."""
    aheads = {"on": [True], "off": [False], "both": [True, False]}[feedback_ahead]
    return [(m, ahead) for m in modes for ahead in aheads]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dgn-bench pipeline", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="mnist_resnet,resnet18",
                   help=f"comma list of {', '.join(MODELS)} (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed steps (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=1, help="alternated rounds of every "
                   "configuration; with more than one, per-round ratios to pp1 and their "
                   "median (default: %(default)s)")
    p.add_argument("--modes", default="exact,stale_k", help="pp=2 modes (default: %(default)s)")
    p.add_argument("--info", default="fne", choices=["olne", "fne", "gr"])
    p.add_argument("--curvature", default="kfac", choices=["identity", "diag", "kfac", "ekfac"])
    p.add_argument("--partition", default="uniform", help="pp=2 partition: uniform, params "
                   "or 'a,b' stage counts (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    add_allocator_argument(p)
    p.add_argument("--no-lookahead", dest="lookahead", action="store_false",
                   help="do not announce the next batch (no forward run ahead)")
    p.add_argument("--feedback-ahead", default="on", choices=["on", "off", "both"],
                   help="pp=2: run the update's feedback forwards in the waits "
                   "(parallel.feedback_ahead); both: each mode with it ('pp2 MODE') and "
                   "without ('pp2 MODE late') in every round (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    p.add_argument("--json", metavar="OUT", default=None, help="also write raw results")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; 0 on success, 2 for bad arguments."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS] + [m for m in modes
                                                    if m not in ("exact", "stale_k")]
    if bad or args.batch_size % args.micro_batches or \
            min(args.steps, args.threads, args.rounds) < 1:
        print(f"error: bad --models/--modes {bad} or --batch-size not divisible by "
              "--micro-batches, or --steps/--threads/--rounds < 1; models: "
              f"{', '.join(MODELS)}, modes: exact, stale_k", file=sys.stderr)
        return 2
    optim = {"lr": 0.05, "info": args.info, "curvature": args.curvature, "damping": 0.1}
    raw: dict[str, Any] = {}
    for model in models:
        common = {"model": model, "batch": args.batch_size, "steps": args.steps,
                  "warmup": args.warmup, "threads": args.threads, "timeout": args.timeout,
                  "cpu_allocator": args.cpu_allocator,
                  "optim": optim, "partition": args.partition, "micro": args.micro_batches,
                  "lookahead": args.lookahead}
        rounds: list[list[tuple[str, list[dict[str, Any]]]]] = []
        for n in range(args.rounds):
            rows = [("pp1", run_config({**common, "pp": 1, "mode": "exact",
                                        "partition": "uniform"}))]
            print(format_report(model, rows), flush=True)
            for m, ahead in pp2_configs(modes, args.feedback_ahead):
                rows.append((f"pp2 {m}" + ("" if ahead else " late"),
                             run_config({**common, "pp": 2, "mode": m,
                                         "feedback_ahead": ahead})))
                print(format_report(model, rows[:1] + rows[-1:], args.lookahead)
                      .split("\n", 3)[3], flush=True)
            if args.rounds > 1:
                print(f"-- round {n + 1} of {args.rounds}", flush=True)
            rounds.append(rows)
        raw[model] = {name: ranks for name, ranks in rounds[0]} if args.rounds == 1 else \
            [{name: ranks for name, ranks in rows} for rows in rounds]
        print(format_report(model, rounds[-1], args.lookahead), flush=True)
        if args.rounds > 1:
            print(format_rounds(model, rounds), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
