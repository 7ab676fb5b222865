"""``dgn-bench parity``: the optimizers on an accelerator give the CPU's parameters.

Runs ``--steps`` training steps of each optimizer twice from the same initialisation and the
same batches, once on the CPU and once on ``--device``, in float64 (so the comparison sees the
algorithm, not float32 rounding), and prints per optimizer the largest parameter difference
relative to the parameters' size::

    max_p |theta_dev - theta_cpu|_inf / max(|theta_cpu|_inf, 1e-12)

A row fails when it exceeds ``--tol``; the exit status is then 1. The DIGITS net covers the
Tanh residual block of Table 2; ``--model`` takes any registry name (BatchNorm nets such as
``mnist_resnet`` exercise the BatchNorm tangent rules on the device too).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dgn_dist.bench import DEFAULT_SHAPE, INPUT_SHAPES, MODEL_CHOICES, NUM_CLASSES, VARIANTS
from dgn_dist.config import Config
from dgn_dist.models import build_model
from dgn_dist.optim import build_optimizer

DEFAULT_OPTIMIZERS = "sgd,adam,ekfac,dgnopt,dgnopt-gr"


def run_steps(model_name: str, optim_name: str, device: torch.device, steps: int,
              batch_size: int) -> list[torch.Tensor]:
    """The parameters (on the CPU) after ``steps`` float64 steps on ``device``."""
    shape = INPUT_SHAPES.get(model_name, DEFAULT_SHAPE)
    cfg = Config()
    cfg.model.name = model_name  # type: ignore[assignment]
    cfg.optim.name, info = VARIANTS.get(optim_name, (optim_name, cfg.game.info))  # type: ignore[assignment]
    cfg.game.info = info  # type: ignore[assignment]
    cfg.optim.lr = 0.05
    torch.manual_seed(0)
    model = build_model(cfg.model, shape, NUM_CLASSES).double().to(device)
    optimizer = build_optimizer(cfg, model)
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(batch_size, *shape, generator=data, dtype=torch.float64).to(device)
        y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=data).to(device)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return [p.detach().cpu() for p in model.parameters()]


def relative_difference(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    diff = max(float((x - y).abs().max()) for x, y in zip(a, b))
    scale = max(float(y.abs().max()) for y in b)
    return diff / max(scale, 1e-12)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dgn-bench parity", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="device compared with the CPU")
    parser.add_argument("--model", default="digits_resnet", choices=MODEL_CHOICES)
    parser.add_argument("--optimizers", default=DEFAULT_OPTIMIZERS)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tol", type=float, default=1e-8)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    worst = 0.0
    print(f"parity {args.model}, {args.steps} float64 steps, batch {args.batch_size}: "
          f"{device} vs cpu")
    for name in [n.strip() for n in args.optimizers.split(",") if n.strip()]:
        reference = run_steps(args.model, name, torch.device("cpu"), args.steps,
                              args.batch_size)
        on_device = run_steps(args.model, name, device, args.steps, args.batch_size)
        rel = relative_difference(on_device, reference)
        worst = max(worst, rel)
        print(f"  {name:<10} max relative parameter difference {rel:.3e} "
              f"{'ok' if rel <= args.tol else 'FAIL'}", flush=True)
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
