"""Cooperative Kronecker solves == dense solves of the explicitly formed damped matrices."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dgn_dist.dgnopt.blocks import KronBlock, StageBatch
from dgn_dist.dgnopt.coop import CoopPairBlock, pcg
from dgn_dist.dgnopt.players import PlayerView
from dgn_dist.game.core import Player

DT = torch.float64


def _views(dims: list[tuple[int, int]], groups: list[int]) -> list[PlayerView]:
    return [PlayerView(Player(f"p{i}", nn.Linear(i_, o).double(), "kron", g))
            for i, ((i_, o), g) in enumerate(zip(dims, groups, strict=False))]


def _batch(views: list[PlayerView], n: int, shared_g: bool) -> StageBatch:
    a = [torch.randn(n, v.module.in_features, dtype=DT) for v in views]
    a = [torch.cat([x, torch.ones(n, 1, dtype=DT)], 1) for x in a]
    g0 = torch.randn(n, views[0].module.out_features, dtype=DT)
    g = [g0 if shared_g else torch.randn(n, v.module.out_features, dtype=DT) for v in views]
    return StageBatch(num=n, rank=1, q_theta=[], a=a, g=g)  # type: ignore[arg-type]


def _rhs(views: list[PlayerView]) -> dict[int, torch.Tensor]:
    return {i: torch.randn(v.module.out_features, v.module.in_features + 1, dtype=DT)
            for i, v in enumerate(views)}


def test_same_group_joint_input_solve_is_dense_solve() -> None:
    views = _views([(3, 4), (5, 4)], [0, 0])
    batch = _batch(views, 6, shared_g=True)
    blk = KronBlock([0, 1], views, "kfac")
    blk.damping = 0.2
    blk.update(batch, 0.0, True, True)
    a = torch.cat(batch.a, 1)  # type: ignore[arg-type]
    big_a, big_g = a.T @ a / a.shape[0], batch.g[0].T @ batch.g[0]  # type: ignore[union-attr]
    rhs = _rhs(views)
    joint = torch.cat([rhs[0], rhs[1]], 1)
    dense = torch.kron(big_g, big_a) + 0.2 * torch.eye(joint.numel(), dtype=DT)
    expected = torch.linalg.solve(dense, joint.reshape(-1)).reshape(joint.shape)
    got = blk.solve(rhs)
    torch.testing.assert_close(torch.cat([got[0], got[1]], 1), expected, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("iters,exact", [(200, True), (0, False)])
def test_separate_groups_solve_is_dense_solve(iters: int, exact: bool) -> None:
    """Two output groups: [[P_uu, A_uv⊗B_uv],[·ᵀ, P_vv]] + λ solved exactly by the Schur form
    with Prop.-5-preconditioned CG; with 0 iterations (paper's eq. 15) it is not exact."""
    views = _views([(3, 4), (3, 2)], [0, 1])
    batch = _batch(views, 7, shared_g=False)
    u, v = KronBlock([0], [views[0]], "kfac"), KronBlock([1], [views[1]], "kfac")
    blk = CoopPairBlock(u, v, iters, 1e-14)
    blk.damping = 0.1
    blk.update(batch, 0.0, True, True)
    a_u, a_v = batch.a  # type: ignore[misc]
    g_u, g_v = batch.g  # type: ignore[misc]
    n = a_u.shape[0]
    p_uu = torch.kron(g_u.T @ g_u, a_u.T @ a_u / n)
    p_vv = torch.kron(g_v.T @ g_v, a_v.T @ a_v / n)
    p_uv = torch.kron(g_u.T @ g_v, a_u.T @ a_v / n)
    dense = torch.cat([torch.cat([p_uu, p_uv], 1), torch.cat([p_uv.T, p_vv], 1)], 0)
    dense = dense + 0.1 * torch.eye(dense.shape[0], dtype=DT)
    rhs = _rhs(views)
    flat = torch.cat([rhs[0].reshape(-1), rhs[1].reshape(-1)])
    expected = torch.linalg.solve(dense, flat)
    got = blk.solve(rhs)
    got_flat = torch.cat([got[0].reshape(-1), got[1].reshape(-1)])
    close = torch.allclose(got_flat, expected, atol=1e-9, rtol=1e-7)
    assert close == exact
    # batched right-hand sides give the same answers
    batched = blk.solve({i: torch.stack([r, 2 * r]) for i, r in rhs.items()})
    torch.testing.assert_close(batched[0][1], 2 * got[0], atol=1e-9, rtol=1e-7)


def test_pcg_solves_spd_system() -> None:
    m = torch.randn(5, 5, dtype=DT)
    spd = m @ m.T + torch.eye(5, dtype=DT)
    rhs = torch.randn(2, 5, 1, dtype=DT)
    x = pcg(lambda z: spd @ z, lambda z: z, rhs, 50, 1e-14)
    torch.testing.assert_close(spd @ x, rhs)
