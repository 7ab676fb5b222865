"""The fast per-sample paths (projections from rows, Gram in the eigenbasis, kept projections)
equal the dense float64 definitions."""

from __future__ import annotations

import pytest
import torch
from dgnopt_helpers import conv_projection, dense_inverse, factors_dense, flat, game_of
from oracle import _StageFn
from torch.autograd.functional import jacobian

from dgn_dist.dgnopt import blocks, proj_cache
from dgn_dist.dgnopt.capture import frozen_batchnorm
from dgn_dist.dgnopt.gains import StageSolver
from dgn_dist.dgnopt.sweep import SweepOptions, sweep_stage
from dgn_dist.optim.kronecker import projected_per_example

DT = torch.float64


def _orth(n: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, dtype=DT))[0]


@pytest.mark.parametrize(("locs", "r", "d_out", "d_in"), [
    (2, 1, 4, 5),   # both sides project the rows
    (9, 1, 3, 20),  # input side after the per-example product
    (9, 2, 5, 4),   # output side after
    (9, 1, 3, 4),   # both after
])
def test_projected_per_example_every_order(locs: int, r: int, d_out: int, d_in: int) -> None:
    n = 3
    a = torch.randn(n * locs, d_in, dtype=DT)
    g = torch.randn(n * r * locs, d_out, dtype=DT)
    q_a, q_g = _orth(d_in), _orth(d_out)
    got = projected_per_example(a, g, n, q_a, q_g)
    a3, g4 = a.reshape(n, locs, d_in), g.reshape(n, r, locs, d_out)
    for b in range(n):
        for i in range(r):
            m = g4[b, i].T @ a3[b]  # per-example gradient Σ_l g aᵀ
            torch.testing.assert_close(got[b, i], q_g.T @ m @ q_a)
    # A block of rows of a larger basis (one member of a joint-input block).
    q_big = _orth(d_in + 2)[:d_in]
    part = projected_per_example(a, g, n, q_big, q_g)
    torch.testing.assert_close(part[0, 0], q_g.T @ (g4[0, 0].T @ a3[0]) @ q_big)


def _block_game(batch_norm: bool, b: int = 4):
    """A conv net with one downsampling residual block (``"first"`` alignment) and its
    trajectory on ``b`` samples."""
    from torch import nn

    from dgn_dist.models.blocks import ResidualBlock

    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(),
                          ResidualBlock(2, 3, nn.Tanh, stride=2, batch_norm=batch_norm),
                          nn.Flatten(), nn.Linear(12, 3)).double()
    game = game_of(model, "first")
    with torch.no_grad():
        states = game.trajectory(torch.randn(b, 1, 4, 4, dtype=DT))
    return game, states


def _setup(info: str, b: int = 3, r: int = 2):
    model = conv_projection()
    game = game_of(model, "first")
    with torch.no_grad():
        states = game.trajectory(torch.randn(b, 1, 4, 4, dtype=DT))
    t = 1  # the block's first stage: conv and 1x1 shortcut (two output groups under gr)
    stage, x_t, x_next = game.stages[t], states[t], states[t + 1]
    vx_next = tuple(torch.randn_like(s) for s in x_next)
    u_next = tuple(0.05 * torch.randn(b, r, *s.shape[1:], dtype=DT) for s in x_next)
    solver = StageSolver(stage, info, "ekfac", coop_iters=200, coop_tol=1e-14)
    return stage, solver, x_t, vx_next, u_next


def _cols(u, b: int, r: int) -> torch.Tensor:
    cols = []
    for bb in range(b):
        for i in range(r):
            cols.append(torch.cat([torch.zeros_like(x[:, 0]).index_copy(
                0, torch.tensor([bb]), x[bb:bb + 1, i]).reshape(-1) for x in u]))
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("info", ["fne", "gr"])
@pytest.mark.parametrize("cache", [True, False])
def test_ekfac_vxx_refactor_matches_dense(info: str, cache: bool,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``V_xx^t = Σ_b W_bᵀ (I − Γ_b) W_b`` with ``Γ = Ψᵀ Q_θθ⁻¹ Ψ`` (EKFAC curvature, scaled
    blocks), whether the projections are kept from the scaling update or recomputed. At
    rank 2 the block's 3x3 conv keeps its projected rows (smaller than ``P``) and the 1x1
    shortcut its projections ``P``."""
    if not cache:
        monkeypatch.setattr(proj_cache, "PROJ_CACHE", 0)
    kinds: list[str | None] = []
    original = blocks.KronBlock.gram_chunk

    def spy(self, chunk, coef):  # type: ignore[no-untyped-def]
        kinds.append(self.kept.kind)
        return original(self, chunk, coef)

    monkeypatch.setattr(blocks.KronBlock, "gram_chunk", spy)
    stage, solver, x_t, vx_next, u_next = _setup(info)
    b, r = u_next[0].shape[:2]
    opts = SweepOptions(feedback=True, use_factors=True, weight_decay=0.01, damping=0.5,
                        decay=0.5, update_factors=True, refresh=True, record=True, rescale=True)
    with frozen_batchnorm(stage):
        sweep_stage(stage, solver, x_t, vx_next, u_next, opts, True)  # S from two batches
        sol, _, u_t = sweep_stage(stage, solver, x_t, vx_next, u_next, opts, True)
    assert all(blk.kept.kind is None for blk in solver._kron_blocks())  # released
    if info == "fne":
        assert set(kinds) == ({"rows", "proj"} if cache else {None}), kinds
    assert float(sol.stats["clipped_frac"]) == 0.0 and u_t is not None
    fn = _StageFn(stage, x_t)
    f_x, f_th = jacobian(fn, (flat(x_t), fn.theta()))
    cols = _cols(u_next, b, r)
    w, psi = f_x.T @ cols, f_th.T @ cols
    gram = psi.T @ dense_inverse(solver) @ psi
    dense = torch.zeros(w.shape[0], w.shape[0], dtype=DT)
    for bb in range(b):
        s = slice(bb * r, (bb + 1) * r)
        dense += w[:, s] @ (torch.eye(r, dtype=DT) - gram[s, s]) @ w[:, s].T
    torch.testing.assert_close(factors_dense(u_t), dense, atol=1e-10, rtol=1e-8)


def test_projections_are_kept_only_when_a_gram_follows() -> None:
    stage, solver, x_t, vx_next, u_next = _setup("fne")
    seen: list[bool] = []
    original = blocks.KronBlock.gram_chunk

    def spy(self, chunk, coef):  # type: ignore[no-untyped-def]
        seen.append(self.kept.kind is not None)
        return original(self, chunk, coef)

    blocks.KronBlock.gram_chunk = spy  # type: ignore[method-assign]
    try:
        opts = SweepOptions(feedback=True, use_factors=True, weight_decay=0.0, damping=0.5,
                            decay=0.5, update_factors=True, refresh=True)
        with frozen_batchnorm(stage):
            sweep_stage(stage, solver, x_t, vx_next, u_next, opts, True)
            assert seen and all(seen)
            seen.clear()
            sweep_stage(stage, solver, x_t, vx_next, u_next, opts, False)  # no V_xx^t
    finally:
        blocks.KronBlock.gram_chunk = original  # type: ignore[method-assign]
    assert not seen
    assert all(blk.kept.kind is None for blk in solver._kron_blocks())


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("info", ["fne", "gr"])
def test_rescale_from_rows_equals_one_jvp_per_unit(info: str, batch_norm: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The consistency rescaling computed from the factor pass's rows (``<ψ, k>``, one JVP
    in all) equals the one-JVP-per-unit form; stages whose BatchNorm couples the samples
    keep the JVP form (there ``<ψ_{b,i}, k>`` is not per-sample)."""
    from dgn_dist.dgnopt import sweep, tangents

    b, r = 4, 2
    game, states = _block_game(batch_norm, b)
    outs, jvps = {}, {}
    original, original_jvp = sweep.rescale_gains, tangents.Linearization.jvp
    for rows in (True, False):
        calls: list = []
        jvps[rows] = 0

        def spy(*args, rows=rows, calls=calls, **kwargs):  # type: ignore[no-untyped-def]
            if not rows:
                kwargs["batch"] = None
            out = original(*args, **kwargs)
            calls.append((args[1].scales, out))
            return out

        def count(*args, rows=rows, **kwargs):  # type: ignore[no-untyped-def]
            jvps[rows] += 1
            return original_jvp(*args, **kwargs)

        monkeypatch.setattr(sweep, "rescale_gains", spy)
        monkeypatch.setattr(tangents.Linearization, "jvp", count)
        torch.manual_seed(5)
        for t in (1, 2):
            stage = game.stages[t]
            solver = StageSolver(stage, info, "ekfac", coop_iters=200, coop_tol=1e-14)
            u_next = tuple(torch.randn(b, r, *s.shape[1:], dtype=DT) for s in states[t + 1])
            vx_next = tuple(torch.randn_like(s) for s in states[t + 1])
            opts = SweepOptions(feedback=True, use_factors=True, weight_decay=0.01, damping=0.1,
                                decay=0.0, update_factors=True, refresh=True, rescale=True)
            with frozen_batchnorm(stage):
                sweep.sweep_stage(stage, solver, states[t], vx_next, u_next, opts, True)
        outs[rows] = calls
    if batch_norm:  # the rows path is not taken
        assert jvps[True] == jvps[False], jvps
    elif info == "fne":  # one JVP direction per stage instead of one per player
        assert jvps[True] < jvps[False], jvps
    assert len(outs[True]) == len(outs[False]) == 2
    assert any(float(s) > 1.0 for scales, _ in outs[False] for s in scales)  # rescaling active
    for (s_rows, (k_rows, jk_rows)), (s_jvp, (k_jvp, jk_jvp)) in zip(outs[True], outs[False],
                                                                     strict=True):
        torch.testing.assert_close(torch.stack(s_rows), torch.stack(s_jvp))
        for x, y in zip(k_rows, k_jvp, strict=True):
            torch.testing.assert_close(x, y)
        for x, y in zip(jk_rows, jk_jvp, strict=True):
            torch.testing.assert_close(x, y)


def test_jvp_along_a_subset_of_parameters_equals_zero_directions_elsewhere() -> None:
    """The rescale's per-unit JVP runs forward mode along the unit's parameters only; it
    equals the JVP along all of the stage's parameters with zero directions for the others,
    through BatchNorm with batch statistics (and the units' JVPs add up to the full one)."""
    from dgn_dist.dgnopt.autodiff import jvp_params

    game, states = _block_game(True)
    stage = game.stages[1]
    players = [list(pl.parameters()) for pl in stage.players if list(pl.parameters())]
    assert len(players) >= 4  # convolutions and BatchNorms of the block
    params = [p for ps in players for p in ps]
    directions = [[torch.randn_like(p) for p in ps] for ps in players]
    with frozen_batchnorm(stage):
        total = jvp_params(stage, params, states[1], [d for ds in directions for d in ds])
        summed = None
        for n, (ps, ds) in enumerate(zip(players, directions, strict=True)):
            alone = jvp_params(stage, ps, states[1], ds)
            padded = jvp_params(stage, params, states[1], [
                d if m == n else torch.zeros_like(d)
                for m, dm in enumerate(directions) for d in dm])
            for x, y in zip(alone, padded, strict=True):
                torch.testing.assert_close(x, y)
            summed = list(alone) if summed is None else [a + b for a, b in
                                                         zip(summed, alone, strict=True)]
    assert summed is not None
    for x, y in zip(summed, total, strict=True):
        torch.testing.assert_close(x, y)


def test_dropping_kept_rows_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a stage whose BatchNorm couples the samples, the Kronecker players' rows are freed
    once their projections are kept (memory); the sweep's results are the same as with the
    rows kept to the end."""
    b, r = 4, 1
    game, states = _block_game(True, b)
    t = 1
    stage = game.stages[t]
    u_next = tuple(0.05 * torch.randn(b, r, *s.shape[1:], dtype=DT) for s in states[t + 1])
    vx_next = tuple(torch.randn_like(s) for s in states[t + 1])
    opts = SweepOptions(feedback=True, use_factors=True, weight_decay=0.01, damping=0.5,
                        decay=0.5, update_factors=True, refresh=True, rescale=True)
    original = StageSolver.drop_kept_rows
    dropped: list[int] = []

    def spy(self, batch):  # type: ignore[no-untyped-def]
        original(self, batch)
        dropped.append(sum(a is None for a in batch.a))

    results = []
    for drop in (True, False):
        monkeypatch.setattr(StageSolver, "drop_kept_rows",
                            spy if drop else lambda self, batch: None)
        solver = StageSolver(stage, "fne", "ekfac")
        with frozen_batchnorm(stage):
            results.append(sweep_stage(stage, solver, states[t], vx_next, u_next, opts, True))
    assert dropped and dropped[0] >= 1  # the 3x3 conv's rows were freed
    (sol_a, vx_a, u_a), (sol_b, vx_b, u_b) = results
    for x, y in zip([*sol_a.k, *vx_a, *u_a], [*sol_b.k, *vx_b, *u_b], strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
