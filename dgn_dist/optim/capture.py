"""Hook-based capture of layer inputs, outputs and gradients (used by EKFAC and EMSA).

Forward hooks record each call's input (and optionally a copy of its output); the gradient of
the loss w.r.t. the output is caught by a TENSOR hook registered on the output
(``output.register_hook``), not by ``register_full_backward_hook``, so a following in-place op
(``nn.ReLU(inplace=True)``) is allowed: a hook registered before an in-place modification
receives the gradient w.r.t. the value before the modification, i.e. the layer output.

Optionally the gradient w.r.t. the input is caught too: a forward pre-hook hands the module
an alias of its input (``x.view_as(x)``) and hooks that alias, so the hook sees only THIS
layer's contribution ``J_xᵀ ∂L/∂out`` even when the input also feeds a skip connection.

Hooks record only in training mode with gradients enabled (``module.training`` and
``torch.is_grad_enabled()``) and when the owner's ``enabled()`` gate says so; they never build
graph (everything is detached).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


@dataclass
class CallRecord:
    """What one forward call of a layer (and the backward through it) left behind.

    Attributes:
        inputs: the layer input (detached, not copied).
        output: a copy of the layer output (only with ``keep_output``).
        grad_output: ``∂L/∂output`` as autograd delivers it (for a batch-mean loss this is
            ``1/B`` times the per-example gradient); ``None`` until backward reaches it.
        grad_input: this layer's contribution to ``∂L/∂input`` (only with ``grad_input`` and an
            input that requires grad).
    """

    inputs: Tensor
    output: Tensor | None = None
    grad_output: Tensor | None = None
    grad_input: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.inputs.shape[0])


class LayerCapture:
    """Records :class:`CallRecord` s for a set of named modules.

    Args:
        modules: ``{dotted name: module}`` to hook.
        keep_output: store a copy of each output (taken before any later in-place op).
        grad_input: also capture the layer's own contribution to the input gradient.
        enabled: optional gate called at each forward; nothing is recorded when it is False.

    ``records[name]`` lists the calls since the last :meth:`clear` (several calls per step
    when a module is reused or gradients are accumulated). :meth:`mark_consumed` lets the
    records live on until the module's next forward call, which then starts a fresh list.
    """

    def __init__(self, modules: Mapping[str, nn.Module], *, keep_output: bool = False,
                 grad_input: bool = False, enabled: Callable[[], bool] | None = None) -> None:
        self.records: dict[str, list[CallRecord]] = {name: [] for name in modules}
        self._keep_output = keep_output
        self._enabled = enabled
        self._stale: set[str] = set()
        self._paused = False
        self._pending: dict[str, CallRecord | None] = {name: None for name in modules}
        self._handles: list[RemovableHandle] = []
        for name, module in modules.items():
            if grad_input:
                self._handles.append(module.register_forward_pre_hook(
                    partial(self._pre_hook, name)))
            self._handles.append(module.register_forward_hook(partial(self._forward_hook, name)))

    def _active(self, module: nn.Module) -> bool:
        if self._paused or not (module.training and torch.is_grad_enabled()):
            return False
        return self._enabled is None or self._enabled()

    def _new_record(self, name: str, inputs: Tensor) -> CallRecord:
        if name in self._stale:
            self._stale.discard(name)
            self.records[name] = []
        record = CallRecord(inputs=inputs.detach())
        self.records[name].append(record)
        return record

    def _pre_hook(self, name: str, module: nn.Module, args: tuple[Any, ...]) -> Any:
        self._pending[name] = None
        if not self._active(module) or not args or not isinstance(args[0], Tensor):
            return None
        x = args[0]
        record = self._new_record(name, x)
        self._pending[name] = record
        if not x.requires_grad:
            return None
        alias = x.view_as(x)

        def grad_hook(grad: Tensor) -> None:
            record.grad_input = grad.detach()

        alias.register_hook(grad_hook)
        return (alias, *args[1:])

    def _forward_hook(self, name: str, module: nn.Module, args: tuple[Any, ...],
                      output: Any) -> None:
        record = self._pending[name]
        self._pending[name] = None
        if record is None:
            if not self._active(module) or not args or not isinstance(args[0], Tensor):
                return
            record = self._new_record(name, args[0])
        if not isinstance(output, Tensor):
            return
        if self._keep_output:
            record.output = output.detach().clone()
        if output.requires_grad:

            def grad_hook(grad: Tensor) -> None:
                record.grad_output = grad.detach()

            output.register_hook(grad_hook)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Record nothing inside this block (the owner re-evaluating its layers)."""
        was = self._paused
        self._paused = True
        try:
            yield
        finally:
            self._paused = was

    def complete(self, name: str) -> list[CallRecord]:
        """The records of ``name`` whose backward has run (``grad_output`` is set)."""
        return [r for r in self.records[name] if r.grad_output is not None]

    def clear(self) -> None:
        """Drop all records now."""
        for name in self.records:
            self.records[name] = []
        self._stale.clear()

    def mark_consumed(self) -> None:
        """Keep the records until each module's next forward call, then start afresh."""
        self._stale = set(self.records)

    def remove(self) -> None:
        """Remove all hooks (the records are kept)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
