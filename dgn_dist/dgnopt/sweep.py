"""Backward sweep of one stage (Alg. 1 lines 4-7; DESIGN.md sections 2.1 and 3).

Given ``V_x^{t+1}`` (tuple of ``[B, *state]``) and the factors ``U^{t+1}`` (tuple of
``[B, r, *state]``, ``V_xx^{t+1} ≈ Σ_i u_{b,i} u_{b,i}ᵀ`` per sample), one stage computes:

1. ``Q_θ = ℓ_θ + VJP_θ(V_x^{t+1})`` with ``ℓ = wd/2 ‖θ‖²`` (one forward, one VJP);
2. the factor pass: the stage input repeated ``r`` times is run forward once and ONE autograd
   call pulls every ``u_{b,i}`` back, giving the players' output-side rows ``g`` (Kronecker
   ``G`` factors, per-sample gradients ``ψ_{b,i} = F_θᵀ u_{b,i}``) and
   ``W_{b,i} = VJP_x(u_{b,i})``;
3. the curvature update and the open gain ``k = Q_θθ⁻¹ Q_θ`` (:mod:`dgn_dist.dgnopt.gains`);
4. ``V_x^t = VJP_x(V_x^{t+1} − Σ_i u_{b,i} <u_{b,i}, (J_θ k)_b>)`` (one JVP, one VJP) --
   this is ``Q_x − Q_xθ k`` of eq. 10;
5. ``V_xx^t = Wᵀ (I − Γ) W`` with ``Γ_b`` the per-sample Gram blocks under ``Q_θθ⁻¹``,
   refactored as ``U_b^t = (I − Γ_b)^{1/2} W_b`` with negative eigenvalues clipped to 0.

Without feedback (``olne``, or ``Q_θx := 0``) steps 4-5 reduce to back-propagation:
``V_x^t = Q_x`` and ``U^t = W``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from dgn_dist.dgnopt.autodiff import vjp
from dgn_dist.dgnopt.blocks import StageBatch
from dgn_dist.dgnopt.capture import (
    PlayerTap,
    contract_factors,
    flat_factors,
    leaves,
    repeat_samples,
)
from dgn_dist.dgnopt.dots import rows_dot, state_dots
from dgn_dist.dgnopt.gains import StageSolver
from dgn_dist.dgnopt.players import PlayerView, native_grads
from dgn_dist.dgnopt.reduction import LOCAL, Reducer
from dgn_dist.dgnopt.streamed import StreamedStats
from dgn_dist.dgnopt.tangents import Linearization, recorded_forward
from dgn_dist.game.core import Stage, State


@dataclass
class SweepOptions:
    """Switches of one sweep.

    Attributes:
        feedback: ``Q_θx`` is kept (``fne`` / ``gr``); ``False`` for ``olne`` or ``Q_θx := 0``.
        use_factors: the ``V_xx`` factors are propagated at all (curvature or feedback).
        weight_decay: ``wd`` of the stage cost.
        damping: Tikhonov damping ``λ``.
        decay: EMA decay of the curvature statistics.
        update_factors: fold this step's statistics in (``factor_interval``).
        refresh: recompute eigenbases (``inverse_interval``).
        record: keep statistics for :mod:`dgn_dist.dgnopt.stats`.
        rescale: scale each curvature block up where its quadratic model lies below the
            batch Gauss-Newton model along its own step (:func:`rescale_gains`).
        reducer: data-parallel reductions of the batch sums (:mod:`.reduction`).
        consistent_feedback: keep the open gain ``k`` but scale the curvature of the
            feedback and value terms up until it dominates the per-sample Gauss-Newton
            curvature (:func:`feedback_consistency_scale`; the Fig. 6 lift of a baseline).
        examples: the step's local batch size where a stage sees it in micro-batches
            (the pipeline's stream): its Kronecker blocks keep their ``a Q_A`` for the
            feedback solve (:mod:`.feedback_rows`); ``0`` there keeps none.
    """

    feedback: bool
    use_factors: bool
    weight_decay: float
    damping: float
    decay: float
    update_factors: bool
    refresh: bool
    record: bool = False
    rescale: bool = False
    reducer: Reducer = LOCAL
    consistent_feedback: bool = False
    examples: int = 0


@dataclass
class StageSolution:
    """What the update pass needs from the sweep, plus optional statistics."""

    k: list[Tensor]
    u_next: State | None
    stats: dict[str, Tensor] = field(default_factory=dict)
    q_theta: list[Tensor] = field(default_factory=list)  # Q_θ per player (KL clipping)


def psd_sqrt(m: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric square root of ``[B, r, r]`` symmetric matrices with negative eigenvalues
    clipped to 0; also returns how many eigenvalues were clipped (below ``-tol``)."""
    tol = 100 * torch.finfo(m.dtype).eps * max(1, m.shape[-1])
    if m.shape[-1] == 1:  # rank 1: the root of a number (no batched eigh: fewer launches)
        return m.clamp_min(0.0).sqrt(), (m < -tol).sum()
    evals, evecs = torch.linalg.eigh(m)
    clipped = (evals < -tol).sum()
    root = evecs @ torch.diag_embed(evals.clamp_min(0.0).sqrt()) @ evecs.transpose(1, 2)
    return root, clipped


def sweep_stage(stage: Stage, solver: StageSolver, x_t: State, vx_next: State,
                u_next: State | None, opts: SweepOptions, need_value: bool,
                streamed: StreamedStats | None = None,
                ) -> tuple[StageSolution, State | None, State | None]:
    """Run the backward sweep at one stage (module docstring).

    Args:
        stage: the stage ``F_t`` (BatchNorm running statistics must be frozen by the caller).
        solver: its curvature blocks.
        x_t: the stage input ``X_t`` of the current trajectory.
        vx_next: ``V_x^{t+1}``.
        u_next: ``U^{t+1}`` (``None`` when ``opts.use_factors`` is off).
        opts: switches.
        need_value: compute ``V_x^t`` and ``U^t`` (false for the first stage).
        streamed: statistics this step already summed elsewhere (the pipeline's forward pass
            sums the Kronecker ``A``, :mod:`dgn_dist.dgnopt.streamed`); the rest is added
            from this batch before the curvature update.

    Returns:
        ``(solution, V_x^t, U^t)``; the last two are ``None`` when not needed.
    """
    views = solver.views
    params = [p for v in views for p in v.params]
    plain = not opts.feedback
    # Γ below projects the input rows; the update pass's feedback solve reuses them
    solver.keep_projected_inputs(x_t[0].shape[0] if need_value and opts.feedback else 0)
    xs = leaves(x_t) if need_value else tuple(s.detach() for s in x_t)
    factors = opts.use_factors and u_next is not None and bool(views or need_value)
    # Rank 1: the factor pass pulls U back through this same forward (no repeated samples).
    share = factors and u_next is not None and u_next[0].shape[1] == 1
    with PlayerTap([v.player for v in views], clone_outputs=share) as tap:
        out, lin = recorded_forward(stage, xs)  # lin: the JVPs below reuse this forward
    roots = list(params) + (list(xs) if need_value and plain else [])
    grads = vjp(out, vx_next, roots, retain_graph=share or (need_value and not plain))
    q_theta = native_grads(views, grads)
    # Q_θ is a sum over examples: summed over the replicas while the factor pass runs.
    pending_q = opts.reducer.start(q_theta, "grad")
    vx_t: State | None = tuple(g.detach() for g in grads[len(params):]) \
        if need_value and plain else None

    batch = StageBatch(num=x_t[0].shape[0], rank=1, q_theta=q_theta,
                       a=[None] * len(views), g=[None] * len(views))
    w: State | None = None
    if factors and u_next is not None:
        w = _factor_pass(stage, views, x_t, u_next, batch, tap, need_value,
                         shared=(out, xs) if share else None,
                         retain_graph=share and need_value and not plain)
    tap.clear()
    pending_q.wait()
    if opts.weight_decay:
        q_theta[:] = [q + opts.weight_decay * v.theta() for q, v in zip(q_theta, views,
                                                                        strict=True)]
    keep = need_value and opts.feedback
    if streamed is not None and w is not None:
        solver.accumulate(streamed, batch, update_factors=opts.update_factors,
                          refresh=opts.refresh, keep_projections=keep)
    else:
        streamed = None
    solver.update(batch, decay=opts.decay, update_factors=opts.update_factors,
                  refresh=opts.refresh, damping=opts.damping, weight_decay=opts.weight_decay,
                  reducer=opts.reducer, keep_projections=keep, streamed=streamed)
    if not opts.rescale or _couples_samples(stage):  # no rows path below: the Gram reads
        solver.drop_kept_rows(batch)                 # the kept projections (memory)
    solver.reset_scales()
    k = solver.solve(solver.open_rhs(q_theta))
    jk_scaled: State | None = None
    if opts.rescale and u_next is not None and views:
        k, jk_scaled = rescale_gains(stage, solver, x_t, q_theta, k, u_next, opts.reducer,
                                     batch=batch, need_jk=need_value and opts.feedback,
                                     lin=lin)
    stats: dict[str, Tensor] = {}
    gram: Tensor | None = None
    fb_scale: Tensor | None = None
    if opts.consistent_feedback and opts.feedback and need_value and w is not None and views:
        gram, fb_scale = feedback_consistency_scale(solver, batch, opts.reducer)
        if opts.record:
            stats["feedback_consistency"] = fb_scale.detach()
    if opts.record:
        ratio = solver.cross_ratio()
        if ratio is not None:
            stats["cross_ratio"] = ratio.detach()
    u_t: State | None = None
    if need_value and opts.feedback:
        assert u_next is not None
        directions = [d for v, kn in zip(views, k, strict=False) for d in v.from_native(kn)]
        if jk_scaled is not None:
            jk = jk_scaled
        elif params:
            jk = lin.jvp(None, params, directions)
        else:
            jk = tuple(torch.zeros_like(o) for o in out)
        if fb_scale is not None:  # Q_xθ k / s: the value of the applied policy (lift)
            jk = tuple(j / fb_scale.to(j.dtype) for j in jk)
        corr = contract_factors(u_next, jk)  # Q_xθ k before the pull-back
        vx_t = tuple(g.detach() for g in
                     vjp(out, tuple(v - c for v, c in zip(vx_next, corr, strict=False)), xs))
        assert w is not None
        u_t, clipped = _refactor(solver, batch, w, views_present=bool(views), gram=gram)
        if opts.record:
            stats["clipped_frac"] = clipped.to(torch.float64) / (batch.num * batch.rank)
    elif need_value and opts.use_factors:
        u_t = w
    return StageSolution(k=k, u_next=u_next, stats=stats, q_theta=q_theta), vx_t, u_t


def rescale_gains(stage: Stage, solver: StageSolver, x_t: State, q_theta: list[Tensor],
                  k: list[Tensor], u_next: State, reducer: Reducer = LOCAL, *,
                  batch: StageBatch | None = None, need_jk: bool = True,
                  lin: Linearization | None = None,
                  pieces: Sequence[tuple[Linearization, State]] | None = None,
                  ) -> tuple[list[Tensor], State | None]:
    """Keep each block's quadratic model at or above the batch Gauss-Newton model.

    A Kronecker (or EMA) curvature can lie far below the batch's Gauss-Newton curvature
    along the directions the batch's gradients span (at small batches, ``A ⊗ G`` spreads the
    mass of ``Σ_b ψ_b ψ_bᵀ`` over ``B²`` cross terms). Then ``k`` overshoots, the Gram blocks
    ``Γ_b`` exceed ``I`` and ``Q_x − Q_xθ k`` flips the co-state. For each block with step
    ``k`` we compare the model's curvature along ``k``, ``kᵀ Q_θθ k = Q_θᵀ k``, with the batch
    model's, ``Σ_{b,i} <u_{b,i}, (J_θ k)_b>² + (λ + wd) ‖k‖²`` (one JVP), and multiply the
    block's curvature by ``s = max(1, batch / model)`` -- the exact-quadratic-model step
    length of K-FAC (Martens & Grosse 2015, §6.4) applied as a curvature scale, so that
    ``k``, ``K`` and ``Γ`` stay consistent. Where the curvature is the exact Gauss-Newton
    matrix of the propagated factors, ``s = 1`` (both sides are equal).

    The batch sums ``Σ_{b,i} <u_{b,i}, (J_θ k)_b>²`` of all units are summed over the
    data-parallel replicas in one reduction (``reducer``). With the factor pass's rows
    (``batch``) the inner products are ``<ψ_{b,i}, k>`` (``ψ = F_θᵀ u``, :func:`_psi_dots`) and
    one JVP along the rescaled ``k`` replaces one JVP per unit, unless BatchNorm couples the
    samples of the stage (then ``<ψ_{b,i}, k>`` is not ``<u_{b,i}, (J_θ k)_b>``). The JVPs
    share the forward recorded by ``lin`` (:mod:`.tangents`; made here when not given).

    ``pieces``: the batch in parts, each with its own linearisation and ``U`` (the
    micro-batches of the pipeline's ``stale_k`` sweep, whose recorded forwards are reused
    instead of a forward over the whole batch): the JVPs then run per part, at its own point
    (BatchNorm: the part's batch statistics, as the streamed ``V_x`` uses), and the batch
    term is their sum; ``J_θ k`` is then not returned (``need_jk`` must be false).

    Returns:
        The rescaled gains and ``J_θ k`` for them (reused by the ``V_x`` update; ``None``
        with ``need_jk=False`` on the rows path).
    """
    views = solver.views
    params = [p for v in views for p in v.params]
    if pieces is not None and need_jk:
        raise ValueError("rescale_gains: need_jk=True needs one linearisation, not pieces")
    parts = list(pieces) if pieces is not None else [
        (Linearization(stage, x_t) if lin is None else lin, u_next)]
    lin = parts[0][0]
    scales: list[Tensor] = [torch.ones((), dtype=torch.float64)] * len(views)
    jk_total: list[Tensor] | None = None
    units = solver.rescale_units()
    rows = batch is not None and not _couples_samples(stage) and all(
        batch.a[n] is not None and batch.g[n] is not None for n in range(len(views)))
    jks: list[list[State] | None] = [None] * len(units)
    if not rows:  # one JVP per unit, along that unit's parameters only: forward mode then
        # skips every layer before the unit (no tangent reaches it), unlike a JVP along all
        # parameters with zero directions for the others (same values, full cost)
        jks = [[part.jvp(None, [p for n in members for p in views[n].params],
                         [d for n in members for d in views[n].from_native(k[n])])
                for part, _ in parts] for members, _ in units]
    sums = []
    for (members, _), jk in zip(units, jks, strict=True):
        if jk is None:  # rows path: <ψ_{b,i}, k>
            assert batch is not None
            coefs = [sum(_psi_dots(batch, views[n], n, k[n]) for n in members)]
        else:  # <u_{b,i}, (J_θ k)_b>, part by part
            coefs = [sum(state_dots(u, j) for u, j in zip(u_part, jk_part, strict=False))
                     for (_, u_part), jk_part in zip(parts, jk, strict=True)]
        total = sum((c.to(torch.float64) ** 2).sum() for c in coefs if isinstance(c, Tensor))
        assert isinstance(total, Tensor)
        sums.append(total)
    gn_sums = torch.stack(sums)
    reducer.reduce([gn_sums], "scalar")
    for (members, damping), jk, gn_sum in zip(units, jks, gn_sums, strict=True):
        batch_quad = gn_sum + damping * sum(
            (k[n].to(torch.float64) ** 2).sum() for n in members)
        model_quad = sum((q_theta[n].to(torch.float64) * k[n].to(torch.float64)).sum()
                         for n in members)
        assert isinstance(model_quad, Tensor)
        # s = max(1, batch / model) where the model is positive and the batch finite, else 1;
        # torch.where rather than a branch: no host sync per unit
        ok = (model_quad > 0) & torch.isfinite(batch_quad)
        scale = torch.where(ok, (batch_quad / model_quad).clamp_min(1.0),
                            torch.ones((), dtype=torch.float64, device=gn_sum.device))
        if jk is not None and pieces is None:
            scaled = [j / scale.to(j.dtype) for j in jk[0]]
            jk_total = scaled if jk_total is None else [a + b for a, b in
                                                         zip(jk_total, scaled, strict=True)]
        for n in members:
            scales[n] = scale
            k[n] = k[n] / scale.to(k[n].dtype)
    solver.set_scales(scales)
    if pieces is not None:
        return k, None
    if rows:
        if not need_jk:
            return k, None
        return k, lin.jvp(None, params, [d for n, v in enumerate(views)
                                         for d in v.from_native(k[n])])
    assert jk_total is not None
    return k, tuple(jk_total)


def _couples_samples(stage: Stage) -> bool:
    """A BatchNorm layer with batch statistics mixes the samples: ``(J_θ k)_b`` then depends on
    every sample and ``<u_{b,i}, (J_θ k)_b>`` is not the per-sample ``<ψ_{b,i}, k>``."""
    return any(isinstance(m, _BatchNorm) and (m.training or m.running_mean is None)
               for m in stage.modules())


def _psi_dots(batch: StageBatch, view: PlayerView, n: int, k_n: Tensor) -> Tensor:
    """``<ψ_{b,i}, k_n> = <u_{b,i}, (J_θ k_n)_b>`` of player ``n``, ``[B, r]``, from its rows:
    Kronecker ``Σ_l <g_{b,i,l}, k_n a_{b,l}>``, BatchNorm from its per-sample gradients."""
    a, g = batch.a[n], batch.g[n]
    assert a is not None and g is not None
    num, r = batch.num, batch.rank
    if view.kron:
        locs = a.shape[0] // num
        out_rows = (a @ k_n.to(a.dtype).T).reshape(num, 1, locs, -1)
        return (g.reshape(num, r, locs, -1) * out_rows).sum((2, 3))
    psi = view.per_sample(num, r, a, g)
    return rows_dot(psi, k_n.to(psi.dtype)).reshape(num, r)


#: ``p`` of the norm that bounds the maximum of the replicas' ``λ_max(Γ)`` (data parallel).
_MAX_NORM_P = 32


def feedback_consistency_scale(solver: StageSolver, batch: StageBatch,
                               reducer: Reducer = LOCAL) -> tuple[Tensor, Tensor]:
    """Scale a lifted baseline's curvature for its closed-loop terms (Fig. 6, DESIGN §2.3).

    A baseline's preconditioner ``P`` (``Q_θθ := P / lr``) is not the Gauss-Newton curvature
    ``H = F_θᵀ V_xx F_θ`` that ``Q_θx`` and ``Q_xx`` come from; along the per-sample
    directions it can lie far below it: ``Γ_b = [<ψ_{b,i}, Q_θθ⁻¹ ψ_{b,j}>]`` has eigenvalues
    ≫ 1 (SGD at a 320-input head, EKFAC with small damping). Then the Schur complement
    ``Q_xx − Q_xθ Q_θθ⁻¹ Q_θx = Wᵀ (I − Γ) W`` is indefinite, ``K δx`` over-corrects by
    ``1 − Γ`` and ``V_x = Q_x − Q_xθ k`` reverses the co-state of the earlier stages.

    The closed-loop terms use ``Q̃_θθ = s Q_θθ`` with ``s = max(1, max_b λ_max(Γ_b))`` (one
    scale per stage, the maximum over this step's samples and replicas): ``Γ/s ⪯ I``, so
    ``V_xx = Wᵀ (I − Γ/s) W`` is PSD without clipping and ``K = Q̃_θθ⁻¹ Q_θx`` never
    over-corrects. The open gain stays the baseline's step ``k``; under the model with
    ``Q̃_θθ`` the value of the applied policy ``δθ = k + K δx`` is then exactly
    ``V_x = Q_x − Q_xθ k / s`` and ``V_xx = Q_xx − Q_xθ K`` (expand
    ``Q_xx − 2 Q_xθ K + Kᵀ Q̃_θθ K`` and ``Q_x − Q_xθ k − Kᵀ (Q_θ − Q̃_θθ k)``). With
    ``Γ ⪯ I`` already, ``s = 1`` and nothing changes; with ``Q_θx := 0`` the run is the
    baseline. Sets the solver's scales (every later solve of this step: ``K``, ``Γ``).
    Over data-parallel replicas the maximum is bounded by the ``p``-norm of the replicas'
    maxima (``p = 32``, one scalar sum; at most ``world^{1/32}`` above the maximum, so
    ``Γ/s ⪯ I`` still holds and every replica uses the same ``s``).

    Returns:
        ``(Γ / s, s)`` with ``Γ / s`` of shape ``[B, r, r]`` for the refactorisation.
    """
    gram = solver.gram(batch)
    top = torch.linalg.eigvalsh(gram.to(torch.float64))[..., -1].max() if gram.numel() \
        else torch.zeros((), dtype=torch.float64, device=gram.device)
    if reducer.world > 1:
        power = (top.clamp_min(0.0) ** _MAX_NORM_P).reshape(1)
        reducer.reduce([power], "scalar")
        top = power[0] ** (1.0 / _MAX_NORM_P)
    scale = top.clamp_min(1.0)
    old = solver.scales
    solver.set_scales([o * scale for o in old] if old else [scale] * len(solver.views))
    return gram / scale.to(gram.dtype), scale


def _factor_pass(stage: Stage, views: list[PlayerView], x_t: State, u_next: State,
                 batch: StageBatch, tap: PlayerTap, need_value: bool, *,
                 shared: tuple[State, State] | None = None,
                 retain_graph: bool = False, a_rows: dict[int, Tensor] | None = None) -> State:
    """Pull the factors back through the stage in one autograd call (module docstring).

    ``shared = (out, xs)``: rank 1 only -- pull back through that forward of ``xs`` (its
    graph retained, ``tap`` recorded it with ``clone_outputs=True``, ``xs`` leaves when
    ``need_value``) instead of running the stage again; ``retain_graph`` keeps it for a
    later VJP. ``a_rows``: Kronecker input rows already formed from the same inputs (by
    player index; the others are formed here)."""
    b, r = u_next[0].shape[0], u_next[0].shape[1]
    batch.rank = r
    for n, v in enumerate(views):
        if a_rows is not None and n in a_rows and v.kron:
            batch.a[n] = a_rows[n]
            continue
        inp = tap.input(n)
        batch.a[n] = v.a_rows(inp) if v.kron else v.normalized_input(inp)
    if shared is not None:
        if r != 1:
            raise ValueError(f"shared: the factor pass reuses a forward only at rank 1; got "
                             f"rank {r} (pass shared=None)")
        out_r, xr = shared
        tap_r = tap
    else:
        xr = repeat_samples(x_t, r)
        if need_value:
            xr = leaves(xr)
        tap_r = PlayerTap([v.player for v in views], clone_outputs=True)
        with tap_r:
            out_r = stage(xr)
    roots = [tap_r.output(n) for n in range(len(views))] + (list(xr) if need_value else [])
    grads = vjp(out_r, flat_factors(u_next), roots, retain_graph=retain_graph)
    for n, v in enumerate(views):
        batch.g[n] = v.g_rows(grads[n]) if v.kron else grads[n].detach()
    if not need_value:
        return ()
    return tuple(g.detach().reshape(b, r, *g.shape[1:]) for g in grads[len(views):])


def _refactor(solver: StageSolver, batch: StageBatch, w: State, views_present: bool,
              gram: Tensor | None = None) -> tuple[State, Tensor]:
    """``U_b^t = (I − Γ_b)^{1/2} W_b`` (clipped); returns the factors and the clip count.
    ``gram``: ``Γ`` already computed under the solver's current scales (else computed)."""
    b, r = w[0].shape[0], w[0].shape[1]
    eye = torch.eye(r, dtype=w[0].dtype, device=w[0].device).expand(b, r, r)
    if not views_present:
        return w, torch.zeros((), dtype=torch.long, device=w[0].device)
    gram = (solver.gram(batch) if gram is None else gram).to(w[0].dtype)
    root, clipped = psd_sqrt(eye - gram)
    return tuple(torch.einsum("bij,bj...->bi...", root, x) for x in w), clipped
