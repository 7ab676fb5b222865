"""Forward-mode products of one stage by per-module tangent rules (DESIGN.md section 3).

torch's forward-mode AD (``torch.func.jvp``, dual tensors) costs about four forwards on a
ResNet-18 conv-BN-ReLU stage (batch 128, CPU): the convolution's JVP formula also convolves
the input with the weight's (zero) tangent, and BatchNorm's formula is long. Here the stage's
own data flow (:meth:`~dgn_dist.game.core.Stage.flow`) runs on primal-tangent pairs, and each
module computes only the terms whose tangents are not zero::

    Conv / Linear     ẏ = W ẋ + Ẇ x + ḃ
    BatchNorm         ẏ = γ ẋ̂ + γ̇ x̂ + β̇,   ẋ̂ = (ẋ − mean ẋ − x̂ · mean(ẋ x̂)) / σ   (batch statistics;
                      ẋ̂ = ẋ / σ with running statistics; means per channel)
    ReLU, Tanh, Sigmoid, and parameterless linear modules (Identity, Flatten, average pooling)
    anything else: torch.func.jvp of that module alone.

A tangent stays ``None`` while it is zero, so a product along one player's parameters starts
at that player. :class:`Linearization` keeps the primal values of one forward and answers
several products from them (the sweep's rescaling and value update); :func:`forward_with_tangent`
computes the primal with its autograd graph and the tangent in one pass (the update pass).
Stages that do not expose ``flow`` fall back to :mod:`dgn_dist.dgnopt.autodiff`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp
from torch.nn.modules.batchnorm import _BatchNorm

from dgn_dist.dgnopt.autodiff import jvp_params, jvp_state
from dgn_dist.game.core import Stage, State

__all__ = ["Linearization", "forward_with_tangent", "recorded_forward"]

#: ``id(parameter) -> direction`` (parameter-shaped).
Directions = Mapping[int, Tensor]

#: Parameterless modules that are linear in their input: ``ẏ = module(ẋ)``.
_LINEAR: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Flatten, nn.Unflatten, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


@dataclass
class Dual:
    """A value of the stage's flow: its primal (``None`` when replaying recorded primals) and
    its tangent (``None`` while zero)."""

    primal: Tensor | None
    tangent: Tensor | None

    def __add__(self, other: Dual) -> Dual:
        primal = None if self.primal is None or other.primal is None \
            else self.primal + other.primal
        return Dual(primal, _add(self.tangent, other.tangent))


@dataclass
class _Call:
    """One module call: its input, its output (``None`` before an in-place call) and values
    derived from them that several products share (BatchNorm's mean and ``1/σ``)."""

    module: nn.Module
    x: Tensor
    y: Tensor | None
    cache: dict[str, Tensor] = field(default_factory=dict)


def _own(module: nn.Module, base: type[nn.Module]) -> bool:
    """``module`` is a ``base`` that runs ``base``'s own forward."""
    return isinstance(module, base) and type(module).forward is base.forward


def _dir(dirs: Directions, p: Tensor | None) -> Tensor | None:
    return None if p is None else dirs.get(id(p))


def _channel_shape(x: Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


def _affine(call: _Call, out: Tensor | None, dw: Tensor | None, db: Tensor | None,
            with_x: Any) -> Tensor | None:
    """``out + Ẇ x + ḃ``: ``with_x(dw, db)`` applies the layer's map to ``x`` with weight
    ``dw`` and bias ``db``; a bias alone is broadcast over the channel dimension."""
    if dw is not None:
        return _add(out, with_x(dw, db))
    if db is not None:
        ref = call.y if call.y is not None else out
        assert ref is not None
        return _add(out, db.reshape(_channel_shape(ref)).expand(ref.shape))
    return out


def _conv(call: _Call, t: Tensor | None, dirs: Directions) -> Tensor | None:
    m: Any = call.module
    out = None if t is None else m._conv_forward(t, m.weight.detach(), None)
    return _affine(call, out, _dir(dirs, m.weight), _dir(dirs, m.bias),
                   lambda dw, db: m._conv_forward(call.x, dw.to(call.x.dtype), db))


def _linear(call: _Call, t: Tensor | None, dirs: Directions) -> Tensor | None:
    m: Any = call.module
    out = None if t is None else F.linear(t, m.weight.detach())
    dw, db = _dir(dirs, m.weight), _dir(dirs, m.bias)
    if dw is None and db is not None:
        return _add(out, db.expand(*call.x.shape[:-1], -1))
    return _affine(call, out, dw, db, lambda w, b: F.linear(call.x, w.to(call.x.dtype), b))


def _batch_moments(x: Tensor, dims: list[int], shape: list[int]) -> tuple[Tensor, Tensor]:
    """Per-channel batch mean and biased variance of ``x`` (channel dimension 1), shaped
    ``shape``. On the CPU ``batch_norm_update_stats`` (BatchNorm's own one-pass kernel) is
    about 3x faster than ``var_mean`` over the strided dimensions of an NCHW activation."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        return mean.reshape(shape), var.reshape(shape)
    var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
    return mean, var


def _batch_norm(call: _Call, t: Tensor | None, dirs: Directions) -> Tensor | None:
    """Per channel, every term is affine in ``ẋ`` and ``x − μ``: ``ẏ = α ẋ + β (x − μ) + β₀``
    (two fused passes over the activation, plus the two batch means of ``ẋ``)."""
    m: Any = call.module
    dg, db = _dir(dirs, m.weight), _dir(dirs, m.bias)
    if t is None and dg is None and db is None:
        return None
    x, shape = call.x, _channel_shape(call.x)
    dims = [d for d in range(x.dim()) if d != 1]
    batch_stats = m.training or (m.running_mean is None and m.running_var is None)
    if "inv" not in call.cache:
        if batch_stats:  # F.batch_norm normalises by the biased batch variance
            mean, var = _batch_moments(x, dims, shape)
        else:
            mean, var = m.running_mean.reshape(shape), m.running_var.reshape(shape)
        call.cache["mean"], call.cache["inv"] = mean, torch.rsqrt(var + m.eps)
    inv = call.cache["inv"]
    centred = x - call.cache["mean"]  # x̂ = (x − μ) / σ
    alpha = inv if m.weight is None else inv * m.weight.detach().reshape(shape)
    beta: Tensor | None = None if dg is None else inv * dg.reshape(shape)  # γ̇ x̂
    beta0: Tensor | None = None if db is None else db.reshape(shape)  # β̇
    if t is not None and batch_stats:
        # the batch statistics move with ẋ: ẋ̂ = (ẋ − mean ẋ − x̂ mean(ẋ x̂)) / σ
        mean_t = t.mean(dims, keepdim=True)
        cov = (t * centred).mean(dims, keepdim=True) * inv  # mean(ẋ x̂)
        beta = _add(beta, -alpha * inv * cov)
        beta0 = _add(beta0, -alpha * mean_t)
    out = None if t is None else (t * alpha if beta0 is None else torch.addcmul(beta0, t, alpha))
    if beta is not None:
        out = centred * beta if out is None else out.addcmul_(centred, beta)
    if out is None:
        assert beta0 is not None
        out = beta0.expand(x.shape)
    elif t is None and beta0 is not None:
        out = out + beta0
    return out


def _pointwise(call: _Call, t: Tensor | None, dirs: Directions) -> Tensor | None:
    if t is None:
        return None
    m = call.module
    if isinstance(m, nn.ReLU):  # from the input: the output may not exist yet (in place)
        return t * (call.x > 0)
    y = call.y
    assert y is not None
    if isinstance(m, nn.Tanh):
        return t * (1 - y * y)
    return t * (y * (1 - y))  # Sigmoid


def _generic(call: _Call, t: Tensor | None, dirs: Directions) -> Tensor | None:
    """``torch.func.jvp`` of the module alone, along its input and its own parameters."""
    m = call.module
    named = list(m.named_parameters())
    tangents = [_dir(dirs, p) for _, p in named]
    if t is None and all(d is None for d in tangents):
        return None
    names = [n for n, _ in named]

    def f(x: Tensor, *values: Tensor) -> Tensor:
        return functional_call(m, dict(zip(names, values, strict=True)), (x,), strict=False)

    x = call.x.clone()  # an in-place module would overwrite the recorded input
    primals = (x, *[p.detach() for _, p in named])
    dual = (torch.zeros_like(x) if t is None else t,
            *[torch.zeros_like(p) if d is None else d.to(p.dtype)
              for (_, p), d in zip(named, tangents, strict=True)])
    out: Tensor = jvp(f, primals, dual)[1]
    return out


def _rule(module: nn.Module) -> Any:
    if _own(module, nn.Conv1d) or _own(module, nn.Conv2d) or _own(module, nn.Conv3d):
        return _conv
    if _own(module, nn.Linear):
        return _linear
    if isinstance(module, _BatchNorm) and type(module).forward is _BatchNorm.forward:
        return _batch_norm
    if type(module) in (nn.ReLU, nn.Tanh, nn.Sigmoid):
        return _pointwise
    if type(module) in _LINEAR:
        return lambda call, t, dirs: None if t is None else module(t)
    return _generic


def _tangent(call: _Call, t: Tensor | None, dirs: Directions) -> Tensor | None:
    with torch.no_grad():
        out = _rule(call.module)(call, t, dirs)
    ref = call.y if call.y is not None else call.x
    return None if out is None else out.to(ref.dtype)


def _in_place(module: nn.Module) -> bool:
    return bool(getattr(module, "inplace", False))


def _has_flow(stage: Stage) -> bool:
    return type(stage).flow is not Stage.flow


def _directions(params: Sequence[Tensor], directions: Sequence[Tensor]) -> dict[int, Tensor]:
    return {id(p): d.detach().to(p.dtype) for p, d in zip(params, directions, strict=True)}


class Linearization:
    """The primal values of one stage forward at ``(X, θ)`` (current parameters), and
    Jacobian-vector products ``J_x δX + J_θ d`` from them.

    The forward runs at the first product, so an unused linearisation costs nothing.

    Args:
        stage: the stage (BatchNorm running statistics frozen by the caller, as for the
            forward it linearises).
        state: its input ``X``.
    """

    def __init__(self, stage: Stage, state: State) -> None:
        self.stage = stage
        self.state: State = tuple(s.detach() for s in state)
        self.calls: list[_Call] | None = None
        self._out: State | None = None

    def record(self) -> None:
        """Run the forward and keep every module's input and output (done by the first
        :meth:`jvp`; a no-op for a stage without ``flow``)."""
        if self.calls is not None or not _has_flow(self.stage):
            return
        calls: list[_Call] = []
        with torch.no_grad():
            out = self.stage.flow(tuple(Dual(s, None) for s in self.state),
                                  lambda ops, value: _record(ops, value, calls))
        self.calls = calls
        self._out = tuple(o.primal for o in out)

    def jvp(self, dx: State | None = None, params: Sequence[Tensor] = (),
            directions: Sequence[Tensor] = ()) -> State:
        """``J_x dx + J_θ d`` with ``d`` given for ``params`` (the others held fixed)."""
        self.record()
        if self.calls is None:
            return self._whole(dx, params, directions)
        dirs = _directions(params, directions)
        calls = iter(self.calls)

        def apply(ops: Any, value: Dual) -> Dual:
            return _replay(ops, value, calls, dirs)

        start = [Dual(None, None) for _ in self.state] if dx is None else [
            Dual(None, d.detach().to(s.dtype)) for s, d in zip(self.state, dx, strict=True)]
        out = self.stage.flow(tuple(start), apply)
        return tuple(torch.zeros_like(ref) if o.tangent is None else o.tangent
                     for o, ref in zip(out, self._outputs(), strict=True))

    def _outputs(self) -> State:
        """``F(X, θ)`` (shapes of the zero tangents)."""
        if self._out is None:
            with torch.no_grad():
                self._out = self.stage(self.state)
        return self._out

    def _whole(self, dx: State | None, params: Sequence[Tensor],
               directions: Sequence[Tensor]) -> State:
        """A stage without ``flow``: torch.func over the whole stage."""
        total: State | None = None
        if params:
            total = jvp_params(self.stage, [cast(nn.Parameter, p) for p in params], self.state,
                               list(directions))
        if dx is not None:
            jx = jvp_state(self.stage, self.state, dx)
            total = jx if total is None else tuple(a + b for a, b in zip(total, jx,
                                                                         strict=True))
        return total if total is not None else tuple(torch.zeros_like(o)
                                                     for o in self._outputs())


def _record(ops: Any, value: Dual, calls: list[_Call]) -> Dual:
    x = value.primal
    assert x is not None
    for m in ops.mods:
        y = m(x.clone() if _in_place(m) else x)  # keep the recorded input intact
        calls.append(_Call(m, x.detach(), y.detach()))
        x = y
    return Dual(x, None)


def recorded_forward(stage: Stage, state: State) -> tuple[State, Linearization]:
    """``F(X, θ)`` as ``stage(state)`` computes it (with its autograd graph when grad mode is
    on), and a :class:`Linearization` at ``X`` that reuses this forward's values."""
    lin = Linearization(stage, state)
    if not _has_flow(stage):
        return stage(state), lin
    calls: list[_Call] = []
    out = stage.flow(tuple(Dual(s, None) for s in state),
                     lambda ops, value: _record(ops, value, calls))
    primal = tuple(o.primal for o in out)
    lin.calls, lin._out = calls, tuple(p.detach() for p in primal)
    return primal, lin


def _replay(ops: Any, value: Dual, calls: Iterator[_Call], dirs: Directions) -> Dual:
    t = value.tangent
    for m in ops.mods:
        call = next(calls)
        if call.module is not m:  # pragma: no cover - flow is deterministic
            raise RuntimeError("stage flow changed between recording and replay")
        t = _tangent(call, t, dirs)
    return Dual(None, t)


def forward_with_tangent(stage: Stage, state: State, dx: State) -> tuple[State, State]:
    """``(F(X, θ), J_x δX)``: the primal with its autograd graph on the parameters (for a VJP)
    and, in the same pass, the tangent along ``dx`` (no graph)."""
    xs = tuple(s.detach() for s in state)
    if not _has_flow(stage):  # dual tensors: the primal carries the graph
        with fwad.dual_level():
            out_dual = stage(tuple(fwad.make_dual(s, d.detach().to(s.dtype))
                                   for s, d in zip(xs, dx, strict=True)))
            parts = [fwad.unpack_dual(o) for o in out_dual]
            return (tuple(p.primal for p in parts),
                    tuple(torch.zeros_like(p.primal) if p.tangent is None
                          else p.tangent.detach() for p in parts))
    out = stage.flow(tuple(Dual(s, d.detach().to(s.dtype)) for s, d in zip(xs, dx, strict=True)),
                     _with_graph)
    return tuple(o.primal for o in out), tuple(
        torch.zeros_like(o.primal) if o.tangent is None else o.tangent for o in out)


def _with_graph(ops: Any, value: Dual) -> Dual:
    x, t = value.primal, value.tangent
    assert x is not None
    for m in ops.mods:
        if _in_place(m):  # its tangent from the input, before the call overwrites it
            t = _tangent(_Call(m, x.detach(), None), t, {})
            x = m(x)
        else:
            y = m(x)
            t = _tangent(_Call(m, x.detach(), y.detach()), t, {})
            x = y
    return Dual(x, t)
