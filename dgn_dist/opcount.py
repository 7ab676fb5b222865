"""Operators dispatched by a piece of code: ``dgn-bench --count-ops``.

On a GPU an optimizer step of many small operators is bound by their launches (about
25 µs of host time each with PyTorch's eager dispatch) rather than by arithmetic, so the
number of operators per step predicts a launch-bound step's time on any machine, the CPU
included. Counted below autograd (``TorchDispatchMode``): every ATen operator that reaches a
backend once, the backward pass's included; views count too, as they do for the dispatcher.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_operators(run: Callable[[], object]) -> int:
    """How many ATen operators ``run()`` dispatches."""
    counter = _Count()
    with counter:
        run()
    return counter.count
