"""The update pass (Alg. 1 lines 8-12; DESIGN.md section 2.2).

``δX_0 = 0``; for ``t = 0 … T-1``::

    Q_θx δX_t = VJP_θ( Σ_i u_{b,i} <u_{b,i}, (J_x δX_t)_b> )     (old trajectory, old θ_t)
    δθ_t      = lr · (k_t + feedback_scale · Q_θθ⁻¹ Q_θx δX_t)
    θ_t      ← θ_t − δθ_t
    X'_{t+1}  = F_t(X'_t, θ_t)                                    (no graph)
    δX_{t+1}  = X'_{t+1} − X_{t+1}

Parameters are only changed after every ``δθ_t`` of a stage is finite; if one is not, the
stages already updated are restored and :class:`NonFiniteUpdate` is raised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dgn_dist.dgnopt.autodiff import vjp
from dgn_dist.dgnopt.capture import PlayerTap, contract_factors
from dgn_dist.dgnopt.gains import NonFiniteUpdate, StageSolver, all_finite
from dgn_dist.dgnopt.players import native_grads
from dgn_dist.dgnopt.reduction import LOCAL, Reducer
from dgn_dist.dgnopt.sweep import StageSolution
from dgn_dist.dgnopt.tangents import Linearization, forward_with_tangent, recorded_forward
from dgn_dist.game.core import Stage, State

__all__ = ["FeedbackPrimal", "NonFiniteUpdate", "UpdateRecord", "feedback_primal",
           "feedback_term", "update_pass"]


@dataclass
class UpdateRecord:
    """Per-player norms of the open and feedback parts of ``δθ`` (when recorded)."""

    open_norm: dict[str, Tensor] = field(default_factory=dict)
    feedback_norm: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class FeedbackPrimal:
    """The forward of :func:`feedback_term` at the old trajectory and parameters, run before
    ``δX`` is known (a pipeline rank runs it while it waits for ``δX``): the primal with its
    autograd graph, a :class:`~.tangents.Linearization` that gives ``J_x δX`` from that same
    forward, and the outputs (cloned) of the players that may take the projected path
    (``tapped``: the members of the Kronecker blocks, in order)."""

    out: State
    lin: Linearization
    tap: PlayerTap
    tapped: list[int]


def feedback_primal(stage: Stage, solver: StageSolver, x_t: State) -> FeedbackPrimal:
    """:class:`FeedbackPrimal` of ``stage`` at ``X_t`` (the stage's parameters not yet
    updated; BatchNorm frozen by the caller, as for :func:`feedback_term`)."""
    xs = tuple(s.detach() for s in x_t)
    tapped = solver.projected_input_members()
    with torch.enable_grad(), PlayerTap([solver.views[n].player for n in tapped],
                                        clone_outputs=True) as tap:
        out, lin = recorded_forward(stage, xs)
    return FeedbackPrimal(out, lin, tap, tapped)


def feedback_term(stage: Stage, solver: StageSolver, x_t: State, dx: State,
                  u_next: State, reducer: Reducer = LOCAL,
                  primal: FeedbackPrimal | None = None) -> tuple[list[Tensor], State]:
    """``K δX = Q_θθ⁻¹ Q_θx δX`` in native form; the weighted gradient ``Q_θx δX`` is a sum
    over examples, summed over the replicas (``reducer``). One forward gives the VJP graph
    on its primal and ``J_x δX`` as its tangent (:func:`.tangents.forward_with_tangent`),
    then one VJP, one solve. Also returns that primal, ``X_{t+1} = F_t(X_t, θ_t)`` at the old
    parameters (the update pass regenerates the old trajectory from it instead of keeping
    it). ``primal``: that forward, run already (:func:`feedback_primal`); the tangent then
    comes from its linearization, with the same values.

    Kronecker blocks that kept this step's ``a Q_A`` from the sweep
    (:mod:`.feedback_rows`) take the cotangent at their players' outputs instead of the
    weight gradient and form ``Q_Gᵀ Q_θx δX Q_A`` from those rows."""
    views = solver.views
    kept = solver.take_projected_inputs(x_t[0].shape[0])
    fast = sorted(n for rows in kept.values() for n in rows)
    slow = [n for n in range(len(views)) if n not in fast]
    params = [p for n in slow for p in views[n].params]
    if primal is None:
        with torch.enable_grad(), PlayerTap([views[n].player for n in fast],
                                            clone_outputs=True) as tap:
            out, jx = forward_with_tangent(stage, x_t, dx)
        outputs = [tap.output(i) for i in range(len(fast))]
    else:
        out, jx = primal.out, primal.lin.jvp(dx)
        outputs = [primal.tap.output(primal.tapped.index(n)) for n in fast]
    with torch.enable_grad():
        coef = contract_factors(u_next, jx)
        grads = vjp(out, coef, params + outputs)
    rhs: list[Tensor | None] = [None] * len(views)
    for n, native in zip(slow, native_grads([views[n] for n in slow], grads), strict=True):
        rhs[n] = native
    g_rows = {n: views[n].g_rows(g) for n, g in zip(fast, grads[len(params):], strict=True)}
    projected = solver.project_feedback(kept, g_rows)
    reducer.reduce([r for r in rhs if r is not None] + list(projected.values()), "feedback")
    return solver.solve(rhs, projected), tuple(o.detach() for o in out)


@torch.no_grad()
def apply_steps(stage: Stage, views: Sequence[Any], steps: Sequence[Tensor], x_new: State,
                backups: list[tuple[Tensor, Tensor]]) -> State:
    """``θ ← θ − step`` for each player view (old values appended to ``backups``, so a
    non-finite step can be undone), then the stage's new output ``F(X_new, θ_new)``."""
    for v, step in zip(views, steps, strict=False):
        for p, d in zip(v.params, v.from_native(step), strict=False):
            backups.append((p, p.detach().clone()))
            p.sub_(d.to(p.dtype))
    return stage(x_new)


def update_pass(stages: Sequence[Stage], solvers: Sequence[StageSolver],
                states: Sequence[State | None], solutions: Sequence[StageSolution], *, lr: float,
                feedback_scale: float, feedback: bool,
                record: bool = False, reducer: Reducer = LOCAL) -> UpdateRecord:
    """Apply ``θ ← θ − lr (k + feedback_scale · K δX)`` stage by stage (module docstring).

    Args:
        stages: the game's stages.
        solvers: their curvature solvers (after the sweep).
        states: the trajectory ``X_0 … X_T`` the sweep linearised around; entries after
            ``X_0`` may be ``None`` (dropped by the sweep): they are regenerated on the way,
            as the primal of the feedback term's forward or a forward at the old parameters.
        solutions: the sweep's per-stage open gains and ``U^{t+1}``.
        lr: learning rate.
        feedback_scale: multiplies ``K δX`` (0 turns the feedback off).
        feedback: ``Q_θx`` is kept (``fne`` / ``gr``).
        record: keep per-player norms of the two parts.
        reducer: data-parallel reduction of the weighted gradients (:mod:`.reduction`).

    Raises:
        NonFiniteUpdate: a stage's update is not finite (parameters are left unchanged).
    """
    rec = UpdateRecord()
    backups: list[tuple[Tensor, Tensor]] = []
    first = states[0]
    if first is None:
        raise ValueError("update_pass needs the trajectory's first state X_0")
    x_new: State = tuple(s.detach() for s in first)
    x_old: State = x_new
    dx: State | None = None
    try:
        for t, (stage, solver, sol) in enumerate(zip(stages, solvers, solutions, strict=False)):
            views = solver.views
            kdx: list[Tensor] | None = None
            x_next: State | None = states[t + 1]
            if feedback and feedback_scale != 0.0 and dx is not None and sol.u_next is not None:
                kdx, x_next = feedback_term(stage, solver, x_old, dx, sol.u_next, reducer)
            elif x_next is None:  # not kept by the sweep: F_t(X_t) at the old parameters
                with torch.no_grad():
                    x_next = stage(x_old)
            steps = []
            for n, v in enumerate(views):
                open_part = lr * sol.k[n]
                step = open_part if kdx is None else open_part + (lr * feedback_scale) * kdx[n]
                if record:
                    rec.open_norm[v.name] = open_part.norm().detach()
                    rec.feedback_norm[v.name] = (step - open_part).norm().detach()
                steps.append(step)
            if steps and not all_finite(steps):
                raise NonFiniteUpdate(f"non-finite update at stage {stage.name}")
            x_new = apply_steps(stage, views, steps, x_new, backups)
            assert x_next is not None
            dx = tuple(a - b.detach() for a, b in zip(x_new, x_next, strict=False))
            x_old = x_next
    except NonFiniteUpdate:
        with torch.no_grad():
            for p, old in reversed(backups):
                p.copy_(old)
        raise
    return rec
