"""Self-checks of the dense oracle (tests/oracle.py): Theorem 6, Prop. 2, eq. 16, terminals."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from oracle import (
    OracleResult,
    ce_hessian,
    exact_terminal_factors,
    factors_to_dense,
    fictitious_total_update,
    flatten_state,
    solve_game,
)
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as tnf

from dgn_dist.game import Game, Player, SumStage, build_game
from dgn_dist.models import CooperativePair, ResidualBlock

TOL = {"atol": 1e-10, "rtol": 1e-8}
LR, WD = 0.3, 1e-2


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(),
                         nn.Linear(3, 3))


def _residual(out: int = 2, batch_norm: bool = False) -> nn.Module:
    """Fig. 2 block (identity shortcut when ``out == 2``, else a 1x1-conv shortcut)."""
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(),
                         ResidualBlock(2, out, nn.Tanh, batch_norm=batch_norm),
                         nn.Flatten(), nn.Linear(out * 9, 3))


def _cooperative() -> nn.Module:
    """Fig. 3a block: two parallel convs sharing input and output."""
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), CooperativePair.conv2d(2, 2),
                         nn.Tanh(), nn.Flatten(), CooperativePair.linear(18, 3))


GAMES: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "residual-first": (_residual, "first"),
    "residual-second": (_residual, "second"),
    "cooperative": (_cooperative, "second"),
    "conv-shortcut-first": (lambda: _residual(out=3), "first"),
    "conv-shortcut-second": (lambda: _residual(out=3), "second"),
    "conv-bn-shortcut-first": (lambda: _residual(out=3, batch_norm=True), "first"),
}


def _data(model: nn.Module) -> tuple[Tensor, Tensor]:
    shape = (3, 4) if isinstance(model[0], nn.Flatten) else (3, 1, 3, 3)
    return torch.randn(*shape, dtype=torch.float64), torch.tensor([0, 2, 1])


def _setup(key: str) -> tuple[nn.Module, Game, Tensor, Tensor]:
    make, alignment = GAMES[key]
    model = make().double()
    x, y = _data(model)
    return model, build_game(model, alignment=alignment), x, y  # type: ignore[arg-type]


def _sgd(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Parameters after one torch.optim.SGD step on a copy of ``model``."""
    import copy

    clone = copy.deepcopy(model)
    opt = torch.optim.SGD(clone.parameters(), lr=LR, weight_decay=WD)
    tnf.cross_entropy(clone(x), y).backward()
    opt.step()
    return {n: p.detach() for n, p in clone.named_parameters()}


def _assert_params(result: OracleResult, expected: dict[str, Tensor]) -> None:
    assert result.new_params.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(result.new_params[name], value, **TOL)


def _assert_same_gains(a: OracleResult, b: OracleResult) -> None:
    for sa, sb in zip(a.stages, b.stages, strict=True):
        torch.testing.assert_close(sa.k, sb.k, **TOL)
        torch.testing.assert_close(sa.K, sb.K, **TOL)
    _assert_params(a, b.new_params)


def test_olne_identity_is_sgd_on_mlp() -> None:
    model = _mlp().double()
    x, y = _data(model)
    result = solve_game(build_game(model), x, y, info="olne", curvature="identity", lr=LR,
                        weight_decay=WD)
    _assert_params(result, _sgd(model, x, y))


@pytest.mark.parametrize("key", list(GAMES))
def test_theorem6(key: str) -> None:
    model, game, x, y = _setup(key)
    kw = {"lr": LR, "weight_decay": WD, "damping": 1e-2}
    fne = solve_game(game, x, y, info="fne", **kw)
    # Bullet 1: (11) with P_uv := 0 gives (9).
    _assert_same_gains(solve_game(game, x, y, info="gr", zero_cross=True, **kw), fne)
    # ...and the cross blocks do matter where a stage has several players (an identity
    # shortcut is a dummy player, so the plain residual block has one player per stage).
    gr = solve_game(game, x, y, info="gr", **kw)
    coupled = [t for t, s in enumerate(gr.stages) if len(s.names) > 1]
    assert bool(coupled) == (not key.startswith("residual"))
    for t in coupled:
        assert not torch.allclose(gr.stages[t].k, fne.stages[t].k, atol=1e-6)
    sgd = _sgd(model, x, y)
    # Bullet 2: (9) with (Q_θx, Q_θθ) := (0, I) gives SGD.
    _assert_params(solve_game(game, x, y, info="fne", zero_feedback=True, curvature="identity",
                              **kw), sgd)
    # Bullet 3: (11) with (P_uv, P_ux, P_uu) := (0, 0, I) gives SGD.
    _assert_params(solve_game(game, x, y, info="gr", zero_cross=True, zero_feedback=True,
                              curvature="identity", **kw), sgd)
    # Without Q_θx := 0 the closed loop changes the update (the switch is not a no-op).
    closed = solve_game(game, x, y, info="fne", curvature="identity", **kw)
    assert any(not torch.allclose(closed.new_params[n], sgd[n], atol=1e-6) for n in sgd)


def test_exact_terminal_hessian_three_ways() -> None:
    logits = torch.randn(3, 4, dtype=torch.float64)
    y = torch.tensor([1, 0, 3])
    b, c = logits.shape
    p = torch.softmax(logits, dim=1)
    eye = torch.eye(c, dtype=torch.float64)
    blocks = [sum(p[i, j] * torch.outer(eye[j] - p[i], eye[j] - p[i]) for j in range(c)) / b
              for i in range(b)]
    expected = torch.block_diag(*blocks)
    torch.testing.assert_close(ce_hessian(logits), expected, **TOL)
    u = exact_terminal_factors(logits)
    assert u.shape == (b, c, c)
    torch.testing.assert_close(factors_to_dense(u), expected, **TOL)
    hess = torch.autograd.functional.hessian(
        lambda z: tnf.cross_entropy(z.reshape(b, c), y), logits.reshape(-1))
    torch.testing.assert_close(hess, expected, **TOL)


def test_factor_terminal_matches_exact_and_empirical_differs() -> None:
    model, game, x, y = _setup("residual-second")
    exact = solve_game(game, x, y, info="fne", damping=1e-2)
    with torch.no_grad():
        logits = model(x)
    factored = solve_game(game, x, y, info="fne", damping=1e-2,
                          terminal_factors=exact_terminal_factors(logits))
    _assert_same_gains(factored, exact)
    empirical = (x.shape[0] ** 0.5 * exact.V_x[-1].reshape(3, 1, 3))  # u_b = sqrt(B) V_x,b
    other = solve_game(game, x, y, info="fne", damping=1e-2, terminal_factors=empirical)
    assert not torch.allclose(other.stages[0].k, exact.stages[0].k, atol=1e-6)


@pytest.mark.parametrize("key", ["residual-first", "cooperative", "conv-bn-shortcut-first"])
def test_olne_costate_is_backprop_gradient(key: str) -> None:
    _, game, x, y = _setup(key)
    result = solve_game(game, x, y, info="olne", damping=1e-2)
    states = [tuple(s.detach().requires_grad_(True) for s in st) for st in result.states]
    for t in range(len(game.stages)):
        state: tuple[Tensor, ...] = states[t]
        for later in game.stages[t:]:
            state = later(state)
        grads = torch.autograd.grad(tnf.cross_entropy(state[0], y), states[t])
        torch.testing.assert_close(result.V_x[t], flatten_state(grads), **TOL)


def test_feedback_scale_zero_is_open_loop() -> None:
    _, game, x, y = _setup("conv-shortcut-second")
    kw = {"info": "fne", "lr": LR, "damping": 1e-2, "weight_decay": WD}
    open_loop = solve_game(game, x, y, feedback_scale=0.0, **kw)
    closed = solve_game(game, x, y, **kw)
    for res in (open_loop, closed):
        for stage, dx in zip(res.stages, res.dX[:-1], strict=True):
            k_delta = torch.cat([res.deltas[n].reshape(-1) for n in stage.param_names])
            expected = LR * stage.k
            if res is closed:
                expected = expected + LR * stage.K @ dx
            torch.testing.assert_close(k_delta, expected, **TOL)
    assert closed.dX[-1].abs().max() > 1e-6
    assert not torch.allclose(closed.new_params["4.weight"], open_loop.new_params["4.weight"],
                              atol=1e-8)


def test_update_pass_states_and_no_mutation() -> None:
    model, game, x, y = _setup("conv-bn-shortcut-first")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    result = solve_game(game, x, y, info="gr", lr=LR, damping=1e-2, weight_decay=WD)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    with torch.no_grad():
        out = functional_call(model, result.new_params, (x,))
    torch.testing.assert_close(result.new_states[-1][0], out, **TOL)
    for t, dx in enumerate(result.dX):
        torch.testing.assert_close(
            dx, flatten_state(result.new_states[t]) - flatten_state(result.states[t]), **TOL)


def test_single_linear_stage_fne_is_damped_newton() -> None:
    """A Linear layer on the logits: Gauss-Newton = true Hessian, so k = (∇²L + λ)⁻¹ ∇L."""
    model = nn.Sequential(nn.Linear(3, 4)).double()
    x, y = torch.randn(3, 3, dtype=torch.float64), torch.tensor([0, 3, 1])
    result = solve_game(build_game(model), x, y, info="fne", damping=0.1)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(th: Tensor) -> Tensor:
        w, b = th[:12].reshape(4, 3), th[12:]
        return tnf.cross_entropy(x @ w.T + b, y)

    grad = torch.autograd.functional.jacobian(loss, theta)
    hess = torch.autograd.functional.hessian(loss, theta)
    newton = torch.linalg.solve(hess + 0.1 * torch.eye(16, dtype=torch.float64), grad)
    torch.testing.assert_close(result.stages[0].k, newton, **TOL)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_fictitious_players_closed_form(n: int) -> None:
    """N identical copies summing into one output, own curvature I, cross curvature F."""
    base = nn.Linear(3, 2).double()
    copies = [nn.Linear(3, 2).double() for _ in range(n)]
    for c in copies:
        c.load_state_dict(base.state_dict())
    players = [Player(f"copy{i}", c, "kron", 0) for i, c in enumerate(copies)]
    game = Game([SumStage("fictitious", [], [[(p.name, p.module)] for p in players], [],
                          players)])
    x, y = torch.randn(3, 3, dtype=torch.float64), torch.tensor([1, 0, 1])
    size = 8
    a = torch.randn(size, size, dtype=torch.float64)
    cross = 0.2 * a @ a.T / size
    eye = torch.eye(size, dtype=torch.float64)

    def joint(t: int, q: Tensor) -> Tensor:
        return torch.cat([torch.cat([eye if i == j else cross for j in range(n)], 1)
                          for i in range(n)], 0)

    result = solve_game(game, x, y, info="gr", curvature_override=joint)
    stage = result.stages[0]
    g = stage.Q_theta[stage.slices[0]]
    for i in range(n):
        torch.testing.assert_close(stage.Q_theta[stage.slices[i]], g, **TOL)
    total = sum(stage.k_of(i) for i in range(n))
    torch.testing.assert_close(total, fictitious_total_update(g, cross, n), **TOL)
    if n == 1:
        torch.testing.assert_close(total, g, **TOL)  # SGD at N = 1


@pytest.mark.parametrize("key,info", [
    ("mlp", "fne"), ("mlp", "gr"), ("residual-first", "fne"), ("residual-second", "gr"),
    ("cooperative", "gr"), ("conv-shortcut-first", "gr"), ("conv-shortcut-second", "gr"),
    ("conv-bn-shortcut-first", "gr")])
def test_closed_loop_sweep_is_full_gauss_newton_step(key: str, info: str) -> None:
    """Independent check of V_x, V_xx, K and the update pass (DDP on the LQ subproblem).

    With every stage solved jointly, the backward sweep solves the linear-quadratic model of
    the whole network exactly: the policy δθ = ε k + K δX is optimal for that model with its
    linear terms scaled by ε. With lr = ε and feedback_scale = 1/ε, as ε -> 0 the applied
    update divided by ε tends to the damped Gauss-Newton step on all parameters,
    (Jᵀ H J + (λ + wd) I)⁻¹ (Jᵀ ∇φ + wd θ).
    """
    if key == "mlp":
        model = _mlp().double()
        x, y = _data(model)
        game = build_game(model)
    else:
        model, game, x, y = _setup(key)
    lam, eps = 0.1, 1e-7
    result = solve_game(game, x, y, info=info, lr=eps, feedback_scale=1 / eps,  # type: ignore[arg-type]
                        damping=lam, weight_decay=WD)
    names = [n for n, _ in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def logits(th: Tensor) -> Tensor:
        parts = torch.split(th, [s.numel() for s in shapes])
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return functional_call(model, params, (x,)).reshape(-1)

    jac = torch.autograd.functional.jacobian(logits, theta)
    z = logits(theta).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(tnf.cross_entropy(z.reshape(3, -1), y), z)
    hess = ce_hessian(z.detach().reshape(3, -1))
    eye = torch.eye(theta.numel(), dtype=torch.float64)
    step = torch.linalg.solve(jac.T @ hess @ jac + (lam + WD) * eye, jac.T @ grad + WD * theta)
    applied = torch.cat([result.deltas[n].reshape(-1) for n in names]) / eps
    torch.testing.assert_close(applied, step, atol=1e-6, rtol=1e-4)
    # The open-loop part alone (no feedback) is not the joint step.
    assert not torch.allclose(torch.cat([s.k for s in result.stages]).norm(), step.norm(),
                              rtol=1e-3)
