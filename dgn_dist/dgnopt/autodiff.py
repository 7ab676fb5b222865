"""Vector-Jacobian and Jacobian-vector products of one stage (DESIGN.md section 3).

VJPs are ordinary autograd; JVPs use ``torch.func.jvp`` with ``functional_call`` so that the
direction can be a parameter update ``k`` (``J_θ k``) or a state deviation ``δX``
(``J_x δX``). Callers freeze BatchNorm running statistics around these calls. JVPs run under
``no_grad`` (forward-mode AD does not depend on grad mode): no autograd graph is recorded on
the parameters they do not differentiate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from dgn_dist.game.core import Stage, State


def vjp(outputs: Sequence[Tensor], cotangents: Sequence[Tensor], inputs: Sequence[Tensor],
        retain_graph: bool = False) -> list[Tensor]:
    """``Σ_o (∂o/∂inputs)ᵀ c_o``; outputs that do not depend on anything are skipped and
    inputs the outputs do not depend on get zeros."""
    pairs = [(o, c) for o, c in zip(outputs, cotangents, strict=False) if o.requires_grad]
    if not pairs or not inputs:
        return [torch.zeros_like(i) for i in inputs]
    grads = torch.autograd.grad([o for o, _ in pairs], list(inputs), [c for _, c in pairs],
                                retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, grads, strict=False)]


def _param_keys(stage: Stage, params: Sequence[nn.Parameter]) -> list[str]:
    names = {id(p): n for n, p in stage.named_parameters(remove_duplicate=False)}
    missing = [p for p in params if id(p) not in names]
    if missing:
        raise ValueError(f"stage {stage.name}: a player parameter is not a parameter of the "
                         "stage module (the stage must hold its players' modules)")
    return [names[id(p)] for p in params]


def jvp_params(stage: Stage, params: Sequence[nn.Parameter], state: State,
               directions: Sequence[Tensor]) -> State:
    """``J_θ d``: the stage output's directional derivative along parameter directions ``d``
    (parameter-shaped, one per entry of ``params``) at the current parameters."""
    keys = _param_keys(stage, params)
    primal = tuple(s.detach() for s in state)

    def f(*values: Tensor) -> State:
        overrides = dict(zip(keys, values, strict=True))
        return functional_call(stage, overrides, (primal,), strict=False)

    tangents = tuple(d.detach().to(p.dtype) for d, p in zip(directions, params, strict=True))
    # [1]: the tangent output (torch's stub types the result as a 2- or 3-tuple, has_aux).
    with torch.no_grad():  # forward mode only: no autograd graph on the stage's other params
        tangent: State = jvp(f, tuple(p.detach() for p in params), tangents)[1]
    return tangent


def jvp_state(stage: Stage, state: State, direction: State) -> State:
    """``J_x δX``: the stage output's directional derivative along a state deviation."""
    def f(*xs: Tensor) -> State:
        return stage(tuple(xs))

    with torch.no_grad():  # forward mode only (no autograd graph on the parameters)
        tangent: State = jvp(f, tuple(s.detach() for s in state),
                             tuple(d.detach() for d in direction))[1]
    return tangent
