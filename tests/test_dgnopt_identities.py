"""The exact identities of DESIGN.md §3 for random B and r, one stage at a time (float64)."""

from __future__ import annotations

import torch
from dgnopt_helpers import conv_projection, dense_inverse, factors_dense, flat, game_of
from oracle import _StageFn
from torch.autograd.functional import jacobian

from dgn_dist.dgnopt.capture import frozen_batchnorm
from dgn_dist.dgnopt.gains import StageSolver
from dgn_dist.dgnopt.sweep import SweepOptions, psd_sqrt, sweep_stage
from dgn_dist.dgnopt.update_pass import feedback_term


def _setup(info: str, curvature: str, stage_index: int, b: int = 3, r: int = 2,
           u_scale: float = 0.3, damping: float = 0.5):
    model = conv_projection()
    game = game_of(model, "first")
    with torch.no_grad():
        states = game.trajectory(torch.randn(b, 1, 4, 4, dtype=torch.float64))
    stage = game.stages[stage_index]
    x_t, x_next = states[stage_index], states[stage_index + 1]
    vx_next = tuple(torch.randn_like(s) for s in x_next)
    u_next = tuple(u_scale * torch.randn(b, r, *s.shape[1:], dtype=torch.float64)
                   for s in x_next)
    solver = StageSolver(stage, info, curvature, coop_iters=200, coop_tol=1e-14)
    opts = SweepOptions(feedback=True, use_factors=True, weight_decay=0.01, damping=damping,
                        decay=0.0, update_factors=True, refresh=True, record=True)
    return stage, solver, x_t, vx_next, u_next, opts


def _dense(stage, x_t):
    fn = _StageFn(stage, x_t)
    f_x, f_th = jacobian(fn, (flat(x_t), fn.theta()))
    return fn, f_x, f_th


def _per_sample_vectors(u, b: int, r: int) -> torch.Tensor:
    """Columns ``u_{b,i}`` as full stacked-state vectors, ``[D, b*r]``."""
    cols = []
    for bb in range(b):
        for i in range(r):
            parts = []
            for x in u:
                z = torch.zeros_like(x[:, 0])
                z[bb] = x[bb, i]
                parts.append(z.reshape(-1))
            cols.append(torch.cat(parts))
    return torch.stack(cols, dim=1)


def test_vx_and_vxx_identities_random_b_r() -> None:
    for info, t in (("fne", 2), ("gr", 1), ("fne", 1)):
        stage, solver, x_t, vx_next, u_next, opts = _setup(info, "kfac", t, u_scale=0.05)
        b, r = u_next[0].shape[:2]
        with frozen_batchnorm(stage):
            sol, vx_t, u_t = sweep_stage(stage, solver, x_t, vx_next, u_next, opts, True)
        assert vx_t is not None and u_t is not None
        assert float(sol.stats["clipped_frac"]) == 0.0
        _, f_x, f_th = _dense(stage, x_t)
        v_xx = factors_dense(u_next)
        k = torch.cat([p.reshape(-1) for v, kn in zip(solver.views, sol.k, strict=False)
                       for p in v.from_native(kn)])
        # V_x^t = Q_x − Q_xθ k (eq. 10) = F_xᵀ (V_x − V_xx F_θ k)
        torch.testing.assert_close(flat(vx_t), f_x.T @ (flat(vx_next) - v_xx @ f_th @ k),
                                   atol=1e-10, rtol=1e-8)
        # V_xx^t per-sample blocks: W_bᵀ (I − Γ_bb) W_b with Γ = Ψᵀ Q⁻¹ Ψ, Ψ = F_θᵀ U.
        cols = _per_sample_vectors(u_next, b, r)
        w, psi = f_x.T @ cols, f_th.T @ cols
        gram = psi.T @ dense_inverse(solver) @ psi
        dense = torch.zeros(w.shape[0], w.shape[0], dtype=torch.float64)
        for bb in range(b):
            s = slice(bb * r, (bb + 1) * r)
            dense += w[:, s] @ (torch.eye(r, dtype=torch.float64) - gram[s, s]) @ w[:, s].T
        torch.testing.assert_close(factors_dense(u_t), dense, atol=1e-10, rtol=1e-8)


def test_vxx_exact_when_b_is_one() -> None:
    """With B = 1 the per-sample Gram is the whole Gram: V_xx^t = Q_xx − Q_xθ Q_θθ⁻¹ Q_θx."""
    stage, solver, x_t, vx_next, u_next, opts = _setup("gr", "kfac", 1, b=1, r=3, damping=5.0)
    with frozen_batchnorm(stage):
        sol, _, u_t = sweep_stage(stage, solver, x_t, vx_next, u_next, opts, True)
    assert float(sol.stats["clipped_frac"]) == 0.0
    _, f_x, f_th = _dense(stage, x_t)
    v_xx = factors_dense(u_next)
    q_thx = f_th.T @ v_xx @ f_x
    dense = f_x.T @ v_xx @ f_x - q_thx.T @ dense_inverse(solver) @ q_thx
    assert u_t is not None
    torch.testing.assert_close(factors_dense(u_t), dense, atol=1e-10, rtol=1e-8)


def test_feedback_vjp_equals_dense_q_thx() -> None:
    """K δX from one JVP + one VJP + solve equals Q_θθ⁻¹ F_θᵀ V_xx F_x δX."""
    for info, t in (("fne", 2), ("gr", 1)):
        stage, solver, x_t, vx_next, u_next, opts = _setup(info, "ekfac", t)
        with frozen_batchnorm(stage):
            sweep_stage(stage, solver, x_t, vx_next, u_next, opts, True)
            dx = tuple(torch.randn_like(s) for s in x_t)
            kdx = feedback_term(stage, solver, x_t, dx, u_next)[0]
        _, f_x, f_th = _dense(stage, x_t)
        expected = dense_inverse(solver) @ f_th.T @ factors_dense(u_next) @ f_x @ flat(dx)
        got = torch.cat([p.reshape(-1) for v, kn in zip(solver.views, kdx, strict=False)
                         for p in v.from_native(kn)])
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-8)


def test_psd_clipping_is_exercised_and_logged() -> None:
    """Identity curvature with large factors makes I − Γ_b indefinite for some samples:
    the negative eigenvalues are clipped to 0 and their fraction is recorded."""
    b, r = 4, 2
    stage, solver, x_t, vx_next, u_next, opts = _setup("fne", "identity", 2, b=b, r=r,
                                                         u_scale=0.05)
    scale = torch.tensor([0.1, 30.0, 0.1, 30.0], dtype=torch.float64)
    u_next = tuple(u * scale.view(b, 1, *([1] * (u.dim() - 2))) for u in u_next)
    with frozen_batchnorm(stage):
        sol, _, u_t = sweep_stage(stage, solver, x_t, vx_next, u_next, opts, True)
    _, f_x, f_th = _dense(stage, x_t)
    cols = _per_sample_vectors(u_next, b, r)
    w, psi = f_x.T @ cols, f_th.T @ cols
    gram = psi.T @ psi  # Q_θθ = I
    negatives, dense = 0, torch.zeros(w.shape[0], w.shape[0], dtype=torch.float64)
    for bb in range(b):
        s = slice(bb * r, (bb + 1) * r)
        evals, evecs = torch.linalg.eigh(torch.eye(r, dtype=torch.float64) - gram[s, s])
        negatives += int((evals < 0).sum())
        clipped = evecs @ torch.diag(evals.clamp_min(0)) @ evecs.T
        dense += w[:, s] @ clipped @ w[:, s].T
    assert 0 < negatives < b * r
    assert float(sol.stats["clipped_frac"]) == negatives / (b * r)
    assert u_t is not None
    torch.testing.assert_close(factors_dense(u_t), dense, atol=1e-9, rtol=1e-7)


def test_psd_sqrt_counts_and_reconstructs() -> None:
    m = torch.tensor([[[2.0, 0.0], [0.0, -1.0]], [[1.0, 0.5], [0.5, 1.0]]],
                     dtype=torch.float64)
    root, clipped = psd_sqrt(m)
    assert int(clipped) == 1
    torch.testing.assert_close(root[0] @ root[0], torch.diag(torch.tensor(
        [2.0, 0.0], dtype=torch.float64)))
    torch.testing.assert_close(root[1] @ root[1], m[1])


def test_psd_sqrt_rank_one_equals_the_eigendecomposition() -> None:
    """The rank-1 shortcut (no batched eigh) gives the eigendecomposition's root and count."""
    m = torch.tensor([4.0, 0.0, -1e-30, -0.5, 2.25], dtype=torch.float64).reshape(5, 1, 1)
    root, clipped = psd_sqrt(m)
    evals, evecs = torch.linalg.eigh(m)
    expect = evecs @ torch.diag_embed(evals.clamp_min(0.0).sqrt()) @ evecs.transpose(1, 2)
    torch.testing.assert_close(root, expect)
    assert root.shape == (5, 1, 1)
    assert int(clipped) == 1  # -0.5; -1e-30 lies within the tolerance
