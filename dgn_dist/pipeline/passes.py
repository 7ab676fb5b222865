"""Stage-level pieces of the pipelined sweep and update pass (DESIGN.md §2.1-2.2, §4).

The ``exact`` schedule calls :func:`dgn_dist.dgnopt.sweep.sweep_stage` on the whole local
batch (with the Kronecker ``A`` statistics that ranks before the last summed in the forward
pass). The ``stale_k`` schedule splits that function in two so that micro-batches can
stream through the backward sweep:

* :func:`stream_stage` (per micro-batch): ``Q_θ`` and the Kronecker rows of this
  micro-batch, its curvature statistics added to the step's sums
  (:mod:`dgn_dist.dgnopt.streamed`), and the value function passed to the previous stage
  computed with the open gain ``k`` and the curvature of the PREVIOUS iteration:
  ``V_x^t = VJP_x(V_x^{t+1} − Σ_i u_{b,i} <u_{b,i}, (J_θ k_prev)_b>)`` and
  ``U_b^t = (I − Γ_b)^{1/2} W_b`` with ``Γ_b`` under the previous ``Q_θθ⁻¹`` (eq. 10);
* :func:`finish_stage` (once all micro-batches passed): fold the summed statistics into the
  curvature (per-sample sums that could not stream -- an eigenbasis refresh -- run here over
  the whole batch), solve the fresh ``k = Q_θθ⁻¹ Q_θ`` the update pass applies, rescale.
  Where BatchNorm couples the samples, the rescaling's JVPs run per micro-batch from the
  forwards the stream recorded, so they linearise where the streamed ``V_x`` did (each
  micro-batch's own batch statistics) and no forward over the whole batch is repeated.

:func:`update_range` is the update pass over a contiguous range of stages; unlike
:func:`dgn_dist.dgnopt.update_pass.update_pass` it does not roll back on its own: it keeps the
parameter backups so that the schedule can roll back every rank together.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dgn_dist.dgnopt.autodiff import vjp
from dgn_dist.dgnopt.baselines import AdamBlock, TorchRmsBlock
from dgn_dist.dgnopt.blocks import (
    GNDiagBlock,
    IdentityBlock,
    KronBlock,
    RmsDiagBlock,
    StageBatch,
)
from dgn_dist.dgnopt.capture import PlayerTap, contract_factors, leaves
from dgn_dist.dgnopt.gains import NonFiniteUpdate, StageSolver
from dgn_dist.dgnopt.players import PlayerView, native_grads
from dgn_dist.dgnopt.reduction import Reducer
from dgn_dist.dgnopt.streamed import StreamedStats, add_input_stats, input_blocks_due
from dgn_dist.dgnopt.sweep import (
    StageSolution,
    SweepOptions,
    _couples_samples,
    _factor_pass,
    _refactor,
    rescale_gains,
)
from dgn_dist.dgnopt.tangents import Linearization, recorded_forward
from dgn_dist.dgnopt.update_pass import (
    FeedbackPrimal,
    apply_steps,
    feedback_primal,
    feedback_term,
)
from dgn_dist.game.core import Stage, State


@dataclass
class StreamedStage:
    """What :func:`stream_stage` accumulated at one stage over the micro-batches.

    Attributes:
        defer_inputs: sum the Kronecker ``A`` statistics in :func:`finish_stage`, from the
            micro-batches' input rows kept in ``inputs``, instead of while they stream, and
            (with feedback) pull ``Q_θ`` back there too (``pending_q``). The last pipeline
            rank does this: its stream is on the step's critical path, while its
            ``finish_stage`` runs as the earlier ranks drain (the ranks before it sum ``A``
            in the forward pass instead, :meth:`~dgn_dist.pipeline.schedule.Shard.forward`).
        lins: the micro-batches' recorded forwards, kept where the rescaling's JVPs need them
            (a stage whose BatchNorm couples the samples): :func:`finish_stage` runs those
            JVPs per micro-batch from them instead of a forward over the whole batch.
        pending_q: with ``defer_inputs`` and feedback, each micro-batch's stage output (its
            graph kept) and ``V_x^{t+1}``: ``Q_θ = VJP_θ(V_x^{t+1})`` is pulled back in
            :func:`finish_stage`, in micro-batch order (the same sums), since only the fresh
            gain reads it and the last rank's stream is the critical path.
    """

    q_theta: list[Tensor] | None = None
    a: list[list[Tensor | None]] = field(default_factory=list)  # rows finish_stage reads
    g: list[list[Tensor | None]] = field(default_factory=list)
    u_next: list[State] = field(default_factory=list)
    rank: int = 1
    num: int = 0
    stats: StreamedStats = field(default_factory=StreamedStats)
    defer_inputs: bool = False
    inputs: dict[int, list[Tensor]] = field(default_factory=dict)  # player -> rows per mb
    lins: list[Linearization] = field(default_factory=list)  # per mb, for the rescaling
    pending_q: list[tuple[State, State]] = field(default_factory=list)  # (out, V_x) per mb


def stream_stage(stage: Stage, solver: StageSolver, x_t: State, vx_next: State,
                 u_next: State | None, k_prev: Sequence[Tensor], opts: SweepOptions,
                 need_value: bool, acc: StreamedStage,
                 a_rows: dict[int, Tensor] | None = None) -> tuple[State | None, State | None]:
    """One micro-batch through one stage of the ``stale_k`` sweep (module docstring).

    Args:
        stage: the stage (BatchNorm running statistics frozen by the caller).
        solver: its curvature blocks, still holding the previous iteration's state.
        x_t: the micro-batch's stage input.
        vx_next: ``V_x^{t+1}`` of the micro-batch.
        u_next: ``U^{t+1}`` of the micro-batch (``None`` without factors).
        k_prev: the previous iteration's open gain per player (native form).
        opts: switches (``feedback``, ``use_factors``).
        need_value: compute ``V_x^t``, ``U^t``.
        acc: accumulator of the stage's batch statistics (updated in place).
        a_rows: the players' Kronecker input rows of this micro-batch, where the forward
            pass already formed them (by player index).

    Returns:
        ``(V_x^t, U^t)`` of the micro-batch (``None`` where not needed).
    """
    views = solver.views
    params = [p for v in views for p in v.params]
    plain = not opts.feedback
    if acc.num == 0:  # the step's first micro-batch: Γ's a Q_A kept for the feedback solve
        solver.keep_projected_inputs(opts.examples if need_value and opts.feedback else 0)
    xs = leaves(x_t) if need_value else tuple(s.detach() for s in x_t)
    factors = opts.use_factors and u_next is not None and bool(views or need_value)
    # Rank 1: the factor pass pulls U back through this same forward (as in sweep_stage).
    share = factors and u_next is not None and u_next[0].shape[1] == 1
    with PlayerTap([v.player for v in views], clone_outputs=share) as tap:
        out, lin = recorded_forward(stage, xs)  # lin: the k_prev JVP reuses this forward
    # Q_θ only feeds the fresh gain: the last rank pulls it back in finish_stage
    defer_q = acc.defer_inputs and not plain and bool(params)
    q_theta: list[Tensor] = []
    vx_t: State | None = None
    if defer_q:
        acc.pending_q.append((out, vx_next))
    else:
        roots = list(params) + (list(xs) if need_value and plain else [])
        grads = vjp(out, vx_next, roots, retain_graph=share or (need_value and not plain))
        q_theta = _add_q_theta(acc, views, grads)
        if need_value and plain:
            vx_t = tuple(g.detach() for g in grads[len(params):])
    batch = StageBatch(num=x_t[0].shape[0], rank=1, q_theta=q_theta,
                       a=[None] * len(views), g=[None] * len(views))
    w: State | None = None
    if factors and u_next is not None:
        w = _factor_pass(stage, views, x_t, u_next, batch, tap, need_value,
                         shared=(out, xs) if share else None,
                         retain_graph=share and (defer_q or need_value and not plain),
                         a_rows=a_rows)
        acc.u_next.append(tuple(u.detach() for u in u_next))
        if acc.defer_inputs:  # only G streams for these blocks; A follows in finish_stage
            deferred = input_blocks_due(solver.blocks, opts.update_factors)
            acc.stats.input_blocks |= deferred
            for n in (n for i in deferred for n in solver.blocks[i].members):
                acc.inputs.setdefault(n, []).append(batch.a[n])  # type: ignore[arg-type]
        # The curvature statistics add up while the micro-batches stream (not at the end).
        solver.accumulate(acc.stats, batch, update_factors=opts.update_factors,
                          refresh=opts.refresh, keep_projections=need_value and opts.feedback)
        keep = _rows_finish_reads(stage, solver, acc, opts)  # the others die with the batch
        if opts.rescale and views and _couples_samples(stage):
            acc.lins.append(lin)  # detached values only: the graph still dies with the batch
        if keep:
            acc.a.append([a if n in keep else None for n, a in enumerate(batch.a)])
            acc.g.append([g if n in keep else None for n, g in enumerate(batch.g)])
    acc.rank, acc.num = batch.rank, acc.num + batch.num
    u_t: State | None = None
    if need_value and opts.feedback:
        assert u_next is not None and w is not None
        if params:
            directions = [d for v, kn in zip(views, k_prev, strict=True)
                          for d in v.from_native(kn)]
            jk = lin.jvp(None, params, directions)
        else:
            jk = tuple(torch.zeros_like(o) for o in out)
        corr = contract_factors(u_next, jk)  # Q_xθ k_prev before the pull-back
        vx_t = tuple(g.detach() for g in
                     vjp(out, tuple(v - c for v, c in zip(vx_next, corr, strict=True)), xs,
                         retain_graph=defer_q))
        u_t, _ = _refactor(solver, batch, w, views_present=bool(views))
    elif need_value and opts.use_factors:
        u_t = w
    solver.release()
    return vx_t, u_t


def _add_q_theta(acc: StreamedStage, views: Sequence[PlayerView],
                 grads: Sequence[Tensor]) -> list[Tensor]:
    """One micro-batch's ``Q_θ`` per player (native form) from the parameter gradients that
    lead ``grads``, added to ``acc.q_theta``; returns that micro-batch's share."""
    q_theta = native_grads(views, grads)
    acc.q_theta = q_theta if acc.q_theta is None else [
        a + b for a, b in zip(acc.q_theta, q_theta, strict=True)]
    return q_theta


def _cat(parts: list[list[Tensor | None]], n: int) -> Tensor | None:
    rows = [row for row in (p[n] for p in parts) if row is not None]
    return torch.cat(rows) if rows else None


#: Blocks whose :meth:`~dgn_dist.dgnopt.blocks.Block.update` reads no rows once their batch
#: statistics streamed (the others -- cooperative pairs, copy-coupled blocks -- keep theirs).
_STREAMABLE = (KronBlock, GNDiagBlock, IdentityBlock, RmsDiagBlock, TorchRmsBlock, AdamBlock)


def _rows_finish_reads(stage: Stage, solver: StageSolver, acc: StreamedStage,
                       opts: SweepOptions) -> set[int]:
    """The players whose rows :func:`finish_stage` reads over the whole batch (known once the
    first micro-batch started ``acc.stats``): every player for the rescaling's per-sample
    rows path; else the members of blocks whose per-sample sums did not stream (an eigenbasis
    refresh) or that are not :data:`_STREAMABLE`. :func:`stream_stage` keeps only those: on
    ResNet-18's first stages, keeping and joining a convolution's input rows (``9×`` its
    input activation, per micro-batch) cost 0.5 s of the critical path and their memory."""
    if (opts.rescale and not _couples_samples(stage)) or not acc.stats.sums:
        return set(range(len(solver.views)))
    keep: set[int] = set()
    for i, blk in enumerate(solver.blocks):
        if not isinstance(blk, _STREAMABLE) or (blk.psi_due(opts.update_factors)
                                                and i not in acc.stats.psi_blocks):
            keep.update(blk.members)
    return keep


def finish_stage(stage: Stage, solver: StageSolver, x_t: State, acc: StreamedStage,
                 opts: SweepOptions) -> StageSolution:
    """Fold the streamed batch into the curvature and solve the fresh open gain.

    The same steps as the tail of :func:`~dgn_dist.dgnopt.sweep.sweep_stage` (``Q_θ`` summed
    over the dp replicas, weight decay, curvature update, ``k``, rescaling), on the statistics
    of all micro-batches.

    Raises:
        NonFiniteUpdate: a statistic or the gain is not finite.
    """
    views = solver.views
    params = [p for v in views for p in v.params]
    for out, vx_next in acc.pending_q:  # deferred Q_θ, micro-batch by micro-batch
        _add_q_theta(acc, views, vjp(out, vx_next, params))
    acc.pending_q.clear()
    if acc.inputs:  # deferred A: one product over the whole batch's rows
        add_input_stats(acc.stats, solver.blocks,
                        {n: torch.cat(parts) for n, parts in acc.inputs.items()}, acc.num,
                        update_factors=opts.update_factors, refresh=opts.refresh, finite=True)
        acc.inputs.clear()
    q_theta = list(acc.q_theta or [])
    opts.reducer.reduce(q_theta, "grad")
    if opts.weight_decay:
        q_theta = [q + opts.weight_decay * v.theta() for q, v in zip(q_theta, views, strict=True)]
    n = len(views)
    batch = StageBatch(num=acc.num, rank=acc.rank, q_theta=q_theta,
                       a=[_cat(acc.a, i) if acc.a else None for i in range(n)],
                       g=[_cat(acc.g, i) if acc.g else None for i in range(n)])
    solver.update(batch, decay=opts.decay, update_factors=opts.update_factors,
                  refresh=opts.refresh, damping=opts.damping, weight_decay=opts.weight_decay,
                  reducer=opts.reducer, streamed=acc.stats if acc.stats.sums else None)
    solver.reset_scales()
    k = solver.solve(solver.open_rhs(q_theta))
    u_next = tuple(torch.cat([u[i] for u in acc.u_next]) for i in range(len(acc.u_next[0]))) \
        if acc.u_next else None
    if opts.rescale and u_next is not None and views:
        # the rows path reads the kept rows; with BatchNorm, JVPs from the micro-batches'
        # recorded forwards (the stream's linearisation points, no forward over the batch)
        pieces = list(zip(acc.lins, acc.u_next, strict=True)) if acc.lins else None
        k, _ = rescale_gains(stage, solver, x_t, q_theta, k, u_next, opts.reducer,
                             batch=batch, need_jk=False, pieces=pieces)
        acc.lins.clear()
    # Agreed over the dp replicas: they then all skip the update pass's reductions together.
    if not opts.reducer.agree(not k or bool(torch.stack([torch.isfinite(kn).all()
                                                        for kn in k]).all())):
        raise NonFiniteUpdate(f"non-finite open gain at stage {stage.name}")
    return StageSolution(k=k, u_next=u_next, q_theta=q_theta)


@dataclass
class RangeUpdate:
    """Result of :func:`update_range`."""

    x_new: State
    dx: State
    finite: bool
    backups: list[tuple[Tensor, Tensor]]


def feedback_primals(stages: Sequence[Stage], solvers: Sequence[StageSolver],
                     states: Sequence[State], which: Sequence[int],
                     into: dict[int, FeedbackPrimal]) -> list[Callable[[], None]]:
    """Tasks that run the feedback terms' forwards of :func:`update_range` for the local
    stages ``which`` (in that order) ahead, into ``into`` by local stage: a rank runs them
    while it waits for messages (``Link.wait``'s ``idle``). Each is the forward at the old
    trajectory and parameters, which the update pass would otherwise run once ``δX`` has
    arrived; the tasks left over are not run (:func:`update_range` runs those forwards
    itself)."""

    def task(t: int) -> Callable[[], None]:
        def run() -> None:
            into[t] = feedback_primal(stages[t], solvers[t], states[t])
        return run

    return [task(t) for t in which]


def update_range(stages: Sequence[Stage], solvers: Sequence[StageSolver],
                 states: Sequence[State], solutions: Sequence[StageSolution] | None,
                 x_new: State, dx: State | None, *, lr: float, feedback_scale: float,
                 feedback: bool, reducer: Reducer, ok: bool = True,
                 primals: Mapping[int, FeedbackPrimal] | None = None) -> RangeUpdate:
    """The update pass (Alg. 1 lines 8-12) over consecutive stages ``t0 … t1-1``.

    Args:
        stages, solvers, solutions: of the range.
        states: the trajectory ``X_t0 … X_t1`` (the range's inputs and its output).
        x_new: ``X'_t0`` (the updated trajectory entering the range).
        dx: ``δX_t0`` (``None`` at the game's first stage, where it is 0).
        lr, feedback_scale, feedback, reducer: as in
            :func:`dgn_dist.dgnopt.update_pass.update_pass`.
        ok: ``False`` (this range's sweep failed; ``solutions`` may be ``None``): change
            nothing and return NaN, as after a non-finite step.
        primals: by local stage, the feedback terms' forwards run already
            (:func:`feedback_primals`).

    Returns:
        ``X'_t1``, ``δX_t1``, whether every step was finite (a non-finite step is not applied,
        and every later stage then gets ``δX = NaN`` so that the ranks downstream fail too),
        and the backups of the parameters changed (for a collective roll-back).
    """
    backups: list[tuple[Tensor, Tensor]] = []
    finite = ok and (dx is None or all(bool(torch.isfinite(d).all()) for d in dx))
    for t, (stage, solver) in enumerate(zip(stages, solvers, strict=True)):
        views = solver.views
        if finite:
            assert solutions is not None
            sol = solutions[t]
            kdx = feedback_term(stage, solver, states[t], dx, sol.u_next, reducer,
                                (primals or {}).get(t))[0] \
                if feedback and feedback_scale != 0.0 and dx is not None and \
                sol.u_next is not None else None
            steps = [lr * sol.k[n] if kdx is None else lr * sol.k[n] +
                     (lr * feedback_scale) * kdx[n] for n in range(len(views))]
            finite = not steps or bool(torch.stack([torch.isfinite(s).all()
                                                    for s in steps]).all())
        if not finite:
            nan = tuple(torch.full_like(s, float("nan")) for s in states[t + 1])
            x_new, dx = nan, nan
            continue
        x_new = apply_steps(stage, views, steps, x_new, backups)
        dx = tuple(a - b.detach() for a, b in zip(x_new, states[t + 1], strict=True))
    assert dx is not None
    return RangeUpdate(x_new, dx, finite, backups)


def restore(backups: Sequence[tuple[Tensor, Tensor]]) -> None:
    """Undo :func:`update_range`'s parameter changes."""
    with torch.no_grad():
        for p, old in reversed(backups):
            p.copy_(old)
