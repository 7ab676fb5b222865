"""``dgn-bench floor``: the cost of the passes Alg. 1 adds to EKFAC, measured on a model.

EKFAC's step is one forward with its graph, one backward (weight and input gradients) and
the Kronecker work. DGNOpt's step (DESIGN.md section 3, "Cost target") does the same
Kronecker work and, per stage, these passes on top:

* the factor pass: ``U`` pulled back through the stage -- input gradients, ``≥ B_x``;
* ``J_θ k`` for ``V_x = Q_x − Q_xθ k``: a tangent forward, ``≥ F`` (``Ẇ x`` per layer);
* the update pass: ``J_x δX`` (a tangent forward, ``≥ F``), the weight gradient of
  ``Q_θx δX`` (``≥ B − B_x``, a backward's weight-gradient half) and the forward at the new
  parameters (``F``).

So DGNOpt's step exceeds EKFAC's by at least ``B + 3F``, where ``F`` is a forward of the
model without its graph and ``B`` a backward to the weights and the input (both timed here,
median of ``--repeats``, on one synthetic batch). The report sets that floor against the
budget ``(ratio − 1) · T_EKFAC`` that a target ``T_DGNOpt ≤ ratio · T_EKFAC`` leaves, with
both steps measured in the same run by :func:`dgn_dist.bench.measure`: a floor above the
budget means no implementation of Alg. 1 meets the target on that machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dgn_dist.allocator import add_allocator_argument
from dgn_dist.bench import (
    DEFAULT_SHAPE,
    INPUT_SHAPES,
    NUM_CLASSES,
    bench_config,
    first_bad_bound,
    measure,
    resolve_bench_device,
)


@dataclass
class Floor:
    """Seconds per pass and step; ``floor = backward + 3 forward`` (module docstring)."""

    model: str
    batch_size: int
    forward_s: float
    backward_s: float
    input_backward_s: float
    ekfac_step_s: float
    dgnopt_step_s: float
    ratio: float

    @property
    def floor_s(self) -> float:
        return self.backward_s + 3.0 * self.forward_s

    @property
    def budget_s(self) -> float:
        return (self.ratio - 1.0) * self.ekfac_step_s


def median_seconds(run: Callable[[Any], object], repeats: int, sync: Callable[[], None],
                   prepare: Callable[[], Any] = lambda: None) -> float:
    """Median wall time of ``run(prepare())`` over ``repeats`` calls after one untimed call;
    ``prepare`` (e.g. building an autograd graph) is not timed."""
    times = []
    for i in range(repeats + 1):
        arg = prepare()
        sync()
        start = time.perf_counter()
        run(arg)
        sync()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_passes(model_name: str, batch_size: int, repeats: int,
                device: Any) -> tuple[float, float, float]:
    """``(F, B, B_x)`` in seconds: a forward without graph, a backward to the weights and the
    input, a backward to the input alone (weights frozen), on the benchmark's model."""
    import torch
    import torch.nn.functional as F

    from dgn_dist.models import build_model

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.manual_seed(0)
    shape = INPUT_SHAPES.get(model_name, DEFAULT_SHAPE)
    model = build_model(bench_config(model_name, "sgd", lr=0.01).model, shape,
                        NUM_CLASSES).to(device)
    x = torch.randn(batch_size, *shape, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)
    params = [p for p in model.parameters() if p.requires_grad]

    def forward(_: object) -> None:
        with torch.no_grad():
            model(x)

    def loss() -> torch.Tensor:  # the graph a backward runs through (built untimed)
        return F.cross_entropy(model(x), y)

    forward_s = median_seconds(forward, repeats, sync)
    x.requires_grad_(True)
    backward_s = median_seconds(lambda out: torch.autograd.grad(out, [*params, x]), repeats,
                                sync, loss)
    for p in params:
        p.requires_grad_(False)
    input_backward_s = median_seconds(lambda out: torch.autograd.grad(out, [x]), repeats,
                                      sync, loss)
    return forward_s, backward_s, input_backward_s


def format_floor(f: Floor) -> str:
    """The report: passes, both steps, the floor against the budget."""
    lines = [
        f"{f.model}, batch {f.batch_size}",
        f"  forward F (no graph)              {f.forward_s:9.3f} s",
        f"  backward B (weights and input)    {f.backward_s:9.3f} s"
        f"   (input gradients alone: {f.input_backward_s:.3f} s)",
        f"  EKFAC step                        {f.ekfac_step_s:9.3f} s",
        f"  DGNOpt-FNE step                   {f.dgnopt_step_s:9.3f} s"
        f"   = {f.dgnopt_step_s / f.ekfac_step_s:.2f}x EKFAC",
        f"  floor of DGNOpt's additions B+3F  {f.floor_s:9.3f} s",
        f"  budget at {f.ratio:g}x EKFAC             {f.budget_s:9.3f} s"
        f"   -> floor / budget = {f.floor_s / f.budget_s:.2f}"
        + ("  (target out of reach here)" if f.floor_s > f.budget_s else ""),
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgn-bench floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18", help="comma-separated (default resnet18)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (default 3)")
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps")
    parser.add_argument("--ratio", type=float, default=1.2,
                        help="the target T_DGNOpt <= ratio * T_EKFAC (default 1.2)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add_allocator_argument(parser)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dgn-bench floor``; 0 on success, 2 for bad arguments."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if first_bad_bound((("--batch-size", args.batch_size, 1), ("--repeats", args.repeats, 1),
                        ("--steps", args.steps, 1), ("--warmup", args.warmup, 0))):
        return 2
    if args.ratio <= 1.0:
        print(f"error: --ratio must be > 1, got {args.ratio}", file=sys.stderr)
        return 2
    device = resolve_bench_device(args.device, args.cpu_allocator)
    if device is None:
        return 2
    floors = []
    for model_name in [m.strip() for m in args.models.split(",") if m.strip()]:
        forward_s, backward_s, input_backward_s = time_passes(
            model_name, args.batch_size, args.repeats, device)
        ekfac_s, dgnopt_s = (measure(model_name, name, args.batch_size, args.steps,
                                     args.warmup, device).median_ms / 1000.0
                             for name in ("ekfac", "dgnopt"))
        floor = Floor(model_name, args.batch_size, forward_s, backward_s, input_backward_s,
                      ekfac_s, dgnopt_s, args.ratio)
        print(format_floor(floor), flush=True)
        floors.append(floor)
    if args.json is not None:
        args.json.write_text(json.dumps(
            [{**asdict(f), "floor_s": f.floor_s, "budget_s": f.budget_s} for f in floors],
            indent=2) + "\n")
    return 0
