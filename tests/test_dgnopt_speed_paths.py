"""The step-time fast paths equal the plain computations in float64: the rank-1 factor pass
that reuses the sweep's forward, and the ``aminmax`` finiteness check."""

from __future__ import annotations

import pytest
import torch
from dgnopt_helpers import conv_projection, game_of

from dgn_dist.dgnopt import sweep
from dgn_dist.dgnopt.capture import frozen_batchnorm
from dgn_dist.dgnopt.gains import StageSolver, all_finite
from dgn_dist.dgnopt.sweep import SweepOptions, sweep_stage

DT = torch.float64


def _run(info: str, monkeypatch: pytest.MonkeyPatch | None, need_value: bool):
    torch.manual_seed(3)
    b = 4
    model = conv_projection()
    game = game_of(model, "first")
    with torch.no_grad():
        states = game.trajectory(torch.randn(b, 1, 4, 4, dtype=DT))
    t = 1
    stage, x_t, x_next = game.stages[t], states[t], states[t + 1]
    vx_next = tuple(torch.randn_like(s) for s in x_next)
    u_next = tuple(0.3 * torch.randn(b, 1, *s.shape[1:], dtype=DT) for s in x_next)
    solver = StageSolver(stage, info, "ekfac")
    opts = SweepOptions(feedback=info != "olne", use_factors=True, weight_decay=1e-3,
                        damping=1e-2, decay=0.9, update_factors=True, refresh=True,
                        rescale=True)
    calls: list[bool] = []
    original = sweep._factor_pass

    def plain(*args, shared=None, retain_graph=False):  # type: ignore[no-untyped-def]
        calls.append(shared is not None)
        if monkeypatch is not None:  # force the separate forward of the repeated samples
            shared = None
        return original(*args, shared=shared, retain_graph=retain_graph)

    patcher = monkeypatch or pytest.MonkeyPatch()
    patcher.setattr(sweep, "_factor_pass", plain)
    try:
        with frozen_batchnorm(game):
            sol, vx_t, u_t = sweep_stage(stage, solver, x_t, vx_next, u_next, opts, need_value)
    finally:
        if monkeypatch is None:
            patcher.undo()
    return sol, vx_t, u_t, calls


@pytest.mark.parametrize("info", ["olne", "fne"])
@pytest.mark.parametrize("need_value", [True, False])
def test_rank1_shared_factor_pass_equals_separate_forward(
        info: str, need_value: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = _run(info, None, need_value)
    assert fast[3] == [True], "rank 1 must take the shared-forward factor pass"
    slow = _run(info, monkeypatch, need_value)
    for a, b in zip(fast[0].k, slow[0].k, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(fast[0].q_theta, slow[0].q_theta, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if need_value:
        for a, b in zip(fast[1] + fast[2], slow[1] + slow[2], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    else:
        assert fast[1] is None and slow[1] is None


@pytest.mark.parametrize("fused", [None, True, False])  # auto (CPU: aminmax), CUDA form, CPU form
def test_all_finite_matches_isfinite(fused: bool | None) -> None:
    torch.manual_seed(0)
    base = [torch.randn(50, 7, dtype=DT), torch.randn(3, dtype=torch.float32),
            torch.empty(0), torch.full((4,), 1e300, dtype=DT)]
    assert all_finite(base, fused)
    assert all_finite([], fused)
    assert all_finite([torch.empty(0)], fused)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for i in (0, 1, 3):
            tensors = [t.clone() for t in base]
            tensors[i].view(-1)[tensors[i].numel() // 2] = bad
            expect = all(bool(torch.isfinite(t).all()) for t in tensors)
            assert not expect
            assert all_finite(tensors, fused) == expect


def test_feedback_term_single_forward_equals_separate_jvp() -> None:
    """``K δX`` from one dual forward equals the definition with a separate JVP (double
    backward) and VJP, through BatchNorm with batch statistics (samples coupled)."""
    from torch import nn
    from torch.autograd.functional import jvp as ad_jvp

    from dgn_dist.dgnopt.autodiff import vjp
    from dgn_dist.dgnopt.blocks import StageBatch
    from dgn_dist.dgnopt.capture import contract_factors
    from dgn_dist.dgnopt.update_pass import feedback_term

    torch.manual_seed(5)
    b = 5
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(),
                          nn.Conv2d(3, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Tanh(),
                          nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    game = game_of(model, "second")
    with torch.no_grad():
        states = game.trajectory(torch.randn(b, 2, 4, 4, dtype=DT))
    checked = 0
    with frozen_batchnorm(game):
        for t, stage in enumerate(game.stages[:-1]):
            solver = StageSolver(stage, "fne", "kfac")
            if not solver.views:
                continue
            x_t, x_next = states[t], states[t + 1]
            views = solver.views
            batch = StageBatch(num=b, rank=1, q_theta=[v.theta() for v in views],
                               a=[None] * len(views), g=[None] * len(views))
            for blk in solver.blocks:  # a random SPD curvature per block
                for f in blk.factors():
                    f.update_stats(*(m @ m.T + torch.eye(m.shape[0], dtype=DT) for m in (
                        torch.randn(n, n, dtype=DT) for n in (
                            blk.views[0].theta().shape[1], blk.views[0].theta().shape[0]))),
                        0.0)
                    f.refresh_eigenbasis()
                blk.damping = 0.1
                if not blk.factors():
                    blk.v = torch.rand(sum(p.numel() for p in blk.views[0].params),
                                       dtype=DT) + 0.5
            del batch
            dx = tuple(0.1 * torch.randn_like(s) for s in x_t)
            u = tuple(torch.randn(b, 1, *s.shape[1:], dtype=DT) for s in x_next)
            got, primal = feedback_term(stage, solver, x_t, dx, u)
            for a, c in zip(primal, stage(tuple(s.detach() for s in x_t)), strict=True):
                torch.testing.assert_close(a, c.detach())  # X_{t+1} at the old θ
            params = [p for v in views for p in v.params]
            _, jx = ad_jvp(lambda *xs, s=stage: s(tuple(xs)), tuple(s.detach() for s in x_t),
                           dx)
            jx = jx if isinstance(jx, tuple) else (jx,)
            with torch.enable_grad():
                grads = vjp(stage(tuple(s.detach() for s in x_t)), contract_factors(u, jx),
                            params)
            rhs, off = [], 0
            for v in views:
                rhs.append(v.to_native(grads[off:off + len(v.params)]))
                off += len(v.params)
            want = solver.solve(rhs)
            for g_n, w_n in zip(got, want, strict=True):
                assert w_n.abs().max() > 1e-6
                torch.testing.assert_close(g_n, w_n, rtol=1e-9, atol=1e-11)
            checked += 1
    assert checked >= 2


@pytest.mark.parametrize("info", ["fne", "gr"])
def test_rank1_gram_from_kept_squares_matches_dense(info: str) -> None:
    """Rank 1: the Gram matrix from the kept squared projections gives the dense
    ``V_xx^t = Σ_b W_bᵀ (1 − Γ_b) W_b`` (EKFAC curvature, rescaled blocks)."""
    from dgnopt_helpers import dense_inverse, factors_dense, flat
    from oracle import _StageFn
    from test_dgnopt_fastpaths import _cols, _setup
    from torch.autograd.functional import jacobian

    from dgn_dist.dgnopt import blocks

    stage, solver, x_t, vx_next, u_next = _setup(info, b=3, r=1)
    b, r = u_next[0].shape[:2]
    opts = SweepOptions(feedback=True, use_factors=True, weight_decay=0.01, damping=0.5,
                        decay=0.5, update_factors=True, refresh=True, rescale=True)
    seen: list[bool] = []
    original = blocks.KronBlock.gram_chunk

    def spy(self, chunk, coef):  # type: ignore[no-untyped-def]
        seen.append(self.kept.kind == "squares")
        return original(self, chunk, coef)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(blocks.KronBlock, "gram_chunk", spy)
        with frozen_batchnorm(stage):
            sweep_stage(stage, solver, x_t, vx_next, u_next, opts, True)  # S of two batches
            _, _, u_t = sweep_stage(stage, solver, x_t, vx_next, u_next, opts, True)
    if info == "fne":
        assert seen and all(seen)
    assert all(blk.kept.kind is None for blk in solver._kron_blocks())  # released
    fn = _StageFn(stage, x_t)
    f_x, f_th = jacobian(fn, (flat(x_t), fn.theta()))
    cols = _cols(u_next, b, r)
    w, psi = f_x.T @ cols, f_th.T @ cols
    gram = psi.T @ dense_inverse(solver) @ psi
    assert float(gram.diagonal().abs().max()) > 1e-4
    dense = torch.zeros(w.shape[0], w.shape[0], dtype=DT)
    for bb in range(b):
        g = float(gram[bb, bb])
        dense += max(1.0 - g, 0.0) * torch.outer(w[:, bb], w[:, bb])
    torch.testing.assert_close(factors_dense(u_t), dense, atol=1e-10, rtol=1e-8)
