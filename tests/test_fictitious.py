"""Fictitious players (eq. 16): the split keeps the network, the game places the copies as
one cooperative output group, the players collapse back for export, and the dense float64
oracle's game solve gives the closed forms of DESIGN.md section 3."""

from __future__ import annotations

import io

import pytest
import torch
from oracle import fictitious_total_update, solve_game
from torch import Tensor, nn

from dgn_dist.config.schema import ModelConfig
from dgn_dist.game import build_game
from dgn_dist.game.fictitious import (
    FictitiousLayer,
    collapse_players,
    collapsed_state_dict,
    split_players,
)
from dgn_dist.models import CooperativePair, ResidualBlock, build_model

SHAPES = {"digits_resnet": (1, 8, 8), "mlp": (1, 6, 6), "table3_cnn": (3, 8, 8),
          "coop_cnn": (3, 8, 8), "mnist_resnet": (1, 12, 12)}


def _model(name: str) -> nn.Module:
    return build_model(ModelConfig(name=name, width=4 if name != "digits_resnet" else 0),  # type: ignore[arg-type]
                       SHAPES[name], 10)


def _x(name: str, batch: int = 3) -> Tensor:
    return torch.randn(batch, *SHAPES[name])


# -- the split and the game ---------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("n", [2, 3])
def test_split_keeps_function_and_original(name: str, n: int) -> None:
    model = _model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    split = split_players(model, n)
    x = _x(name)
    torch.testing.assert_close(split(x), model(x), rtol=1e-5, atol=2e-6)
    layers = [m for m in split.modules() if isinstance(m, FictitiousLayer)]
    plain = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert len(layers) == len(plain) and all(f.num_players == n for f in layers)
    for fict, layer in zip(layers, plain, strict=True):
        for player in fict.players:
            torch.testing.assert_close(player.weight, layer.weight / n, rtol=0, atol=0)
            assert player.weight.data_ptr() != layer.weight.data_ptr()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, FictitiousLayer) for m in model.modules())


def test_split_float64_is_tight_and_n1_is_plain() -> None:
    model = _model("digits_resnet").double()
    x = _x("digits_resnet").double()
    torch.testing.assert_close(split_players(model, 5)(x), model(x), rtol=1e-13, atol=1e-14)
    same = split_players(model, 1)
    assert not any(isinstance(m, FictitiousLayer) for m in same.modules())
    assert torch.equal(same(x), model(x)) and same is not model


@pytest.mark.parametrize("alignment", ["first", "second"])
def test_game_places_players_in_one_output_group(alignment: str) -> None:
    n = 3
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(),
        ResidualBlock(3, 4, nn.ReLU, stride=2, batch_norm=True),  # 1x1 conv + BN shortcut
        ResidualBlock(4, 4, nn.Tanh),  # identity shortcut
        CooperativePair.conv2d(4, 4), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 10), nn.BatchNorm1d(10), nn.Linear(10, 4), nn.BatchNorm1d(4))
    model.eval()
    split = split_players(model, n).eval()
    plain_game, game = build_game(model, alignment), build_game(split, alignment)  # type: ignore[arg-type]
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(game(x), split(x))
    assert len(game.stages) == len(plain_game.stages)
    modules = dict(split.named_modules())
    for s_plain, s_split in zip(plain_game.stage_list(), game.stage_list(), strict=True):
        expected = []
        for p in s_plain.players:
            if p.curvature == "kron":
                expected += [(f"{p.name}.players.{i}", "kron", p.output_group) for i in range(n)]
            else:
                expected.append((p.name, p.curvature, p.output_group))
        assert [(p.name, p.curvature, p.output_group) for p in s_split.players] == expected
        for p in s_split.players:
            assert modules[p.name] is p.module
    player_params = [id(q) for _, pl in game.players() for q in pl.parameters()]
    assert sorted(player_params) == sorted(id(q) for q in split.parameters())
    # a BatchNorm after a split layer joins its stage, as after a plain layer
    assert [p.name for p in game.stage_list()[-1].players] == [
        f"8.players.{i}" for i in range(n)] + ["9"]
    groups = {p.output_group for p in game.stage_list()[1].players}
    assert groups == ({0, 1} if alignment == "first" else {0})


def test_game_on_split_linear_is_one_stage_and_root_split() -> None:
    split = split_players(nn.Linear(4, 3), 2)
    assert isinstance(split, FictitiousLayer)
    game = build_game(split)
    assert [(p.name, p.output_group) for p in game.stage_list()[0].players] == [
        ("players.0", 0), ("players.1", 0)]
    x = torch.randn(2, 4)
    assert torch.equal(game(x), split(x))


# -- collapse and export -----------------------------------------------------------------

def _perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("n", [1, 2, 4])
def test_split_then_collapse_is_exact_for_powers_of_two(n: int) -> None:
    model = _model("digits_resnet")
    back = collapsed_state_dict(split_players(model, n))
    ref = model.state_dict()
    assert list(back) == list(ref)
    assert all(torch.equal(back[k], ref[k]) for k in ref)


@pytest.mark.parametrize("name", ["digits_resnet", "coop_cnn"])
def test_collapsed_checkpoint_loads_into_plain_model(name: str) -> None:
    split = split_players(_model(name), 3)
    _perturb(split)  # trained players differ from each other
    state = collapsed_state_dict(split)
    collapsed = collapse_players(split)
    assert list(state) == list(collapsed.state_dict())
    assert all(torch.equal(v, collapsed.state_dict()[k]) for k, v in state.items())
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    plain = _model(name)
    plain.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    x = _x(name, 4)
    torch.testing.assert_close(plain(x), split(x), rtol=1e-5, atol=2e-6)
    assert not any(isinstance(m, FictitiousLayer) for m in collapsed.modules())
    assert any(isinstance(m, FictitiousLayer) for m in split.modules())  # left alone


def test_bad_arguments_and_shared_layers() -> None:
    model = _model("mlp")
    for bad in (0, -2, 2.0, True, "2"):
        with pytest.raises(ValueError, match="n \\(players per layer\\) must be an integer"):
            split_players(model, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already holds fictitious players"):
        split_players(split_players(model, 2), 2)
    with pytest.raises(ValueError, match="copies of one layer"):
        FictitiousLayer([nn.Linear(2, 3), nn.Linear(3, 3)])
    with pytest.raises(ValueError, match="nn.Linear or nn.Conv2d"):
        FictitiousLayer([nn.Tanh()])
    shared = nn.Linear(3, 3)
    split = split_players(nn.Sequential(shared, nn.Tanh(), shared), 2)
    assert split[0] is split[2] and isinstance(split[0], FictitiousLayer)


# -- the game solve on split players (dense float64 oracle) ------------------------------

def _linear_problem(batch: int = 4) -> tuple[nn.Linear, Tensor, Tensor]:
    layer = nn.Linear(5, 3).double()
    return layer, torch.randn(batch, 5, dtype=torch.float64), torch.tensor([0, 2, 1, 2])[:batch]


def _explicit_gn(layer: nn.Linear, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``g = Σ_b J_bᵀ ∇CE_b`` and ``F = Σ_b J_bᵀ H_b J_b`` for θ = [vec_row(W); b]."""
    b, out = x.shape[0], layer.out_features
    with torch.no_grad():
        probs = torch.softmax(layer(x), dim=1)
    eye = torch.eye(out, dtype=torch.float64)
    g = torch.zeros(out * (x.shape[1] + 1), dtype=torch.float64)
    f = torch.zeros(g.numel(), g.numel(), dtype=torch.float64)
    for i in range(b):
        jac = torch.cat([torch.kron(eye, x[i][None]), eye], dim=1)  # d logits / d θ
        grad = (probs[i] - eye[y[i]]) / b
        hess = (torch.diag(probs[i]) - torch.outer(probs[i], probs[i])) / b
        g += jac.T @ grad
        f += jac.T @ hess @ jac
    return g, f


def _own_identity(sizes: list[int]):  # type: ignore[no-untyped-def]
    """Curvature override: own blocks I, cross blocks the Gauss-Newton ones (game SGD)."""
    def override(t: int, q: Tensor) -> Tensor:
        out, start = q.clone(), 0
        p = sizes[t]
        while start < q.shape[0]:
            out[start:start + p, start:start + p] = torch.eye(p, dtype=q.dtype)
            start += p
        return out
    return override


def _player_sum(k: Tensor, n: int) -> Tensor:
    return k.reshape(n, -1).sum(0)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_gr_game_extended_sgd_closed_form(n: int) -> None:
    layer, x, y = _linear_problem()
    g, f = _explicit_gn(layer, x, y)
    game = build_game(split_players(nn.Sequential(layer), n))
    res = solve_game(game, x, y, info="gr", curvature_override=_own_identity([g.numel()]))
    st = res.stages[0]
    p = g.numel()
    for i in range(n):  # every player sees the layer's gradient and GN blocks
        torch.testing.assert_close(st.Q_theta[i * p:(i + 1) * p], g, rtol=1e-10, atol=1e-13)
        for j in range(n):
            torch.testing.assert_close(st.Q_thetatheta[i * p:(i + 1) * p, j * p:(j + 1) * p], f,
                                       rtol=1e-10, atol=1e-13)
    total = _player_sum(st.k, n)
    expected = n * torch.linalg.solve(torch.eye(p, dtype=torch.float64) + (n - 1) * f, g)
    torch.testing.assert_close(total, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(total, fictitious_total_update(g, f, n), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(st.k.reshape(n, -1), (total / n).expand(n, -1), rtol=1e-9,
                               atol=1e-12)  # the joint solve splits the update evenly
    if n == 1:
        torch.testing.assert_close(total, g, rtol=1e-12, atol=1e-14)  # SGD
    else:
        assert (total - n * g).norm() > 1e-3 * g.norm()  # the cross curvature acts


@pytest.mark.parametrize("n", [1, 2, 4])
def test_gr_gauss_newton_on_players_divides_damping(n: int) -> None:
    """Own and cross blocks Q, damping λ: (11ᵀ ⊗ Q + λI) k = 1 ⊗ g gives Σ k_n = (Q + λ/N)⁻¹ g."""
    layer, x, y = _linear_problem()
    g, f = _explicit_gn(layer, x, y)
    damping = 0.3
    game = build_game(split_players(nn.Sequential(layer), n))
    total = _player_sum(solve_game(game, x, y, info="gr", damping=damping).stages[0].k, n)
    eye = torch.eye(g.numel(), dtype=torch.float64)
    torch.testing.assert_close(total, torch.linalg.solve(f + damping / n * eye, g), rtol=1e-8,
                               atol=1e-11)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_fne_identity_is_n_sgd_steps_split_evenly(n: int) -> None:
    """fne ignores the cross blocks: each player takes the whole SGD step, the layer N steps."""
    torch.manual_seed(1)
    plain = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y, lr = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 1, 0]), 0.1
    grads = torch.autograd.grad(nn.functional.cross_entropy(plain(x), y),
                                list(plain.parameters()))
    split = split_players(plain, n)
    res = solve_game(build_game(split), x, y, info="fne", curvature="identity", lr=lr,
                     zero_feedback=True)
    for (name, param), grad in zip(plain.named_parameters(), grads, strict=True):
        layer, leaf = name.rsplit(".", 1)
        keys = [f"{layer}.players.{i}.{leaf}" if n > 1 else name for i in range(n)]
        for key in keys:
            torch.testing.assert_close(res.deltas[key], lr * grad, rtol=1e-10, atol=1e-13)
        new = sum(res.new_params[key] for key in keys)
        torch.testing.assert_close(new, param.detach() - n * lr * grad, rtol=1e-10, atol=1e-13)


def test_gr_game_extended_sgd_every_stage_of_a_deeper_net() -> None:
    """Per stage of a split MLP (V carried by the game, feedback on), the players' total open
    gain is N (I + (N−1) F_t)⁻¹ g_t with F_t the stage's cross block; at the last stage g and
    F are the unsplit layer's."""
    n = 2
    torch.manual_seed(2)
    plain = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    sizes = [sum(q.numel() for q in m.parameters()) for m in (plain[0], plain[2])]
    res = solve_game(build_game(split_players(plain, n)), x, y, info="gr",
                     curvature_override=_own_identity(sizes))
    base = solve_game(build_game(plain), x, y, info="gr", curvature="gn")
    for t, st in enumerate(res.stages):
        p = sizes[t]
        g, f = st.Q_theta[:p], st.Q_thetatheta[:p, p:2 * p]
        torch.testing.assert_close(_player_sum(st.k, n), fictitious_total_update(g, f, n),
                                   rtol=1e-9, atol=1e-12)
        assert st.K.abs().max() > 0  # the feedback gains exist and are carried
    torch.testing.assert_close(res.stages[-1].Q_theta[:sizes[-1]], base.stages[-1].Q_theta)
    torch.testing.assert_close(res.stages[-1].Q_thetatheta[sizes[-1]:, :sizes[-1]],
                               base.stages[-1].Q_thetatheta)
