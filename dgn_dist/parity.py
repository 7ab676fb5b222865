"""``dgn-bench parity``: the optimizers on an accelerator give the CPU's parameters.

Runs ``--steps`` training steps of each optimizer twice from the same initialisation and the
same batches, once on the CPU and once on ``--device``, in float64 (so the comparison sees the
algorithm, not float32 rounding), and prints per optimizer the largest parameter difference
relative to the parameters' size::

    max_p |theta_dev - theta_cpu|_inf / max(|theta_cpu|_inf, 1e-12)

A row fails when it exceeds ``--tol``; the exit status is then 1. The eigenbases are recomputed
every step (``curvature.inverse_interval = 1``; see :func:`run_steps` for why). The default
tolerance 1e-6 allows for the step's amplification of rounding (the square root of
``I - Γ_b`` near a clipped eigenvalue: a 1e-15 perturbation of the MNIST net's weights moves its
second-step parameters by 2e-9); a device bug moves them by O(1). The DIGITS net covers the
Tanh residual block of Table 2; ``--model`` takes any registry name (BatchNorm nets such as
``mnist_resnet`` exercise the BatchNorm tangent rules on the device too).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dgn_dist.bench import (
    DEFAULT_SHAPE,
    INPUT_SHAPES,
    MODEL_CHOICES,
    NUM_CLASSES,
    OPTIM_CHOICES,
    bench_config,
)
from dgn_dist.models import build_model
from dgn_dist.optim import build_optimizer

DEFAULT_OPTIMIZERS = "sgd,adam,ekfac,dgnopt,dgnopt-gr"
#: A reference run whose parameters grew past this has diverged: the row fails.
DIVERGED = 1e3


def run_steps(model_name: str, optim_name: str, device: torch.device, steps: int,
              batch_size: int, chunk_mb: float = 0.0) -> list[torch.Tensor]:
    """The parameters (on the CPU) after ``steps`` float64 steps on ``device``."""
    shape = INPUT_SHAPES.get(model_name, DEFAULT_SHAPE)
    cfg = bench_config(model_name, optim_name, lr=0.05)
    cfg.curvature.chunk_mb = chunk_mb
    # A stale eigenbasis (inverse_interval > 1) of a rank-deficient Kronecker factor is
    # defined only up to a rotation of its null space, and EKFAC's per-direction scaling of
    # the next batches depends on that rotation: CPU and GPU eigh choose different ones (a
    # 1e-13 perturbation on one device moves EKFAC by 6 % at step 2 on the DIGITS head with
    # batch 16). A fresh basis every step makes the update a function of the data alone.
    cfg.curvature.inverse_interval = 1
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
    diff = max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))
    scale = max(float(y.abs().max()) for y in b)
    return diff / max(scale, 1e-12)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dgn-bench parity", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="device compared with the CPU")
    parser.add_argument("--model", default="digits_resnet", choices=MODEL_CHOICES)
    parser.add_argument("--optimizers", default=DEFAULT_OPTIMIZERS)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tol", type=float, default=1e-6)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    bad = [n for n in names if n not in OPTIM_CHOICES]
    if bad or not names:
        print(f"error: --optimizers: unknown name(s) {', '.join(bad) or '(none given)'}; "
              f"valid choices: {', '.join(OPTIM_CHOICES)}", file=sys.stderr)
        return 2
    if args.steps < 1 or args.batch_size < 1:
        print("error: --steps and --batch-size must be >= 1", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    worst = 0.0
    print(f"parity {args.model}, {args.steps} float64 steps, batch {args.batch_size}: "
          f"{device} vs cpu")
    for name in names:
        reference = run_steps(args.model, name, torch.device("cpu"), args.steps,
                              args.batch_size)
        on_device = run_steps(args.model, name, device, args.steps, args.batch_size)
        rel = relative_difference(on_device, reference)
        size = max(float(p.abs().max()) for p in reference)
        if not size < DIVERGED:  # two diverged runs agree on nothing worth comparing
            rel = float("inf")
        worst = max(worst, rel)
        print(f"  {name:<10} max relative parameter difference {rel:.3e}, max |theta| "
              f"{size:.3g} {'ok' if rel <= args.tol else 'FAIL'}", flush=True)
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
