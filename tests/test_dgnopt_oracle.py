"""DGNOpt fast path == dense float64 oracle where the approximations are exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dgnopt_helpers import (
    conv_projection,
    conv_residual,
    copy_model,
    dense_inverse,
    factors_dense,
    fast_step,
    flat,
    game_of,
    linear_residual,
    mlp,
    stage_param_names,
)
from oracle import solve_game

from dgn_dist.game import Game

TOL = dict(atol=1e-9, rtol=1e-7)
COOP = dict(coop_iters=200, coop_tol=1e-14)


def _models(name: str):
    if name == "mlp":
        m = mlp()
        return m, game_of(m)
    g = linear_residual(name.split("_")[1])
    return g, g


def _compare(model, game, opt, res, x_shape_b: int) -> None:
    names = stage_param_names(game, model)
    sweep = opt.last_sweep
    for t, st in enumerate(res.stages):
        pairs = zip(opt.solvers[t].views, sweep["k"][t], strict=True)
        k_fast = torch.cat([p.reshape(-1) for v, kn in pairs for p in v.from_native(kn)])
        torch.testing.assert_close(k_fast, st.k, **TOL)
        if t > 0:
            torch.testing.assert_close(flat(sweep["vx"][t]), res.V_x[t], **TOL)
            torch.testing.assert_close(factors_dense(sweep["u"][t]), res.V_xx[t], **TOL)
    del names
    for _, player in game.players():
        for n, p in player.named_parameters():
            torch.testing.assert_close(p.detach(), res.new_params[n], **TOL)


@pytest.mark.parametrize("info", ["fne", "gr"])
@pytest.mark.parametrize("name", ["mlp", "res_first", "res_second"])
def test_kfac_equals_oracle_b1_r1(info: str, name: str) -> None:
    """B=1, r=1, Linear players, first step: K-FAC is exact, so the step is the oracle's."""
    model, game = _models(name)
    ref_model, ref_game = copy_model(model, game)
    x, y = torch.randn(1, 4, dtype=torch.float64), torch.tensor([1])
    kw = dict(lr=0.5, info=info, curvature="kfac", vxx="empirical", damping=0.1,
              weight_decay=0.01, feedback_scale=1.0, ema_decay=0.0, **COOP)
    opt = fast_step(model, game, x, y, **kw)
    logits = ref_game(x).detach()
    v_x = torch.softmax(logits, 1) - F.one_hot(y, 3).double()
    res = solve_game(ref_game, x, y, info=info, lr=0.5, damping=0.1, weight_decay=0.01,
                     terminal_factors=v_x[:, None, :])
    _compare(model, game, opt, res, 1)


@pytest.mark.parametrize("info", ["fne", "gr"])
@pytest.mark.parametrize("name", ["res_first", "conv_projection", "conv_residual"])
def test_full_step_equals_oracle_with_fast_curvature(info: str, name: str) -> None:
    """B=1, exact V_xx factors (r=C): with the fast solver's own Q_θθ given to the oracle,
    V_x, V_xx, k and the new parameters agree at every stage (Conv2d and residual blocks)."""
    if name.startswith("conv"):
        model = conv_projection() if name == "conv_projection" else conv_residual()
        game = game_of(model, "first")
        x = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    else:
        model, game = _models(name)
        x = torch.randn(1, 4, dtype=torch.float64)
    y = torch.tensor([2])
    ref_model, ref_game = copy_model(model, game)
    opt = fast_step(model, game, x, y, lr=0.3, info=info, curvature="kfac", vxx="exact",
                    damping=0.05, weight_decay=0.0, ema_decay=0.0, **COOP)
    mats = [torch.linalg.inv(dense_inverse(s)) for s in opt.solvers]
    res = solve_game(ref_game, x, y, info=info, lr=0.3, damping=0.05,
                     curvature_override=lambda t, q: mats[t])
    _compare(model, game, opt, res, 1)


@pytest.mark.parametrize("info", ["fne", "gr"])
def test_identity_curvature_equals_oracle_conv(info: str) -> None:
    """Identity curvature has no approximation at B=1 (small weights, so that I − Γ stays
    PSD and nothing is clipped): the conv net's step is the oracle's."""
    model = conv_projection()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.3)
    game = game_of(model, "first")
    ref_model, ref_game = copy_model(model, game)
    x, y = 0.5 * torch.randn(1, 1, 4, 4, dtype=torch.float64), torch.tensor([0])
    opt = fast_step(model, game, x, y, lr=0.05, info=info, curvature="identity", vxx="exact",
                    damping=0.0, weight_decay=0.02, stats_every=1)
    stats = opt.curvature_stats()
    clipped = [v for k, v in stats.items() if k.endswith("clipped_frac")]
    assert clipped and max(clipped) == 0.0
    res = solve_game(ref_game, x, y, info=info, lr=0.05, weight_decay=0.02,
                     curvature="identity")
    _compare(model, game, opt, res, 1)


def test_kronecker_qthth_equals_dense_where_exact() -> None:
    """B=1, r=1, Linear: (A ⊗ G + (λ + wd) I) is the dense ℓ_θθ + F_θᵀ V_xx F_θ + λ I."""
    model = mlp()
    game = game_of(model)
    ref_model, ref_game = copy_model(model, game)
    x, y = torch.randn(1, 4, dtype=torch.float64), torch.tensor([0])
    opt = fast_step(model, game, x, y, lr=0.1, info="fne", curvature="kfac", damping=0.3,
                    weight_decay=0.1, ema_decay=0.0)
    logits = ref_game(x).detach()
    v_x = torch.softmax(logits, 1) - F.one_hot(y, 3).double()
    res = solve_game(ref_game, x, y, info="fne", lr=0.1, damping=0.3, weight_decay=0.1,
                     terminal_factors=v_x[:, None, :])
    for solver, st in zip(opt.solvers, res.stages, strict=False):
        torch.testing.assert_close(torch.linalg.inv(dense_inverse(solver)), st.Q_thetatheta,
                                   atol=1e-9, rtol=1e-7)


def test_game_type_is_used_as_model() -> None:
    g = linear_residual("second")
    assert isinstance(g, Game) and len(list(g.players())) == 5
