"""Fictitious players in training (eq. 16): game-extended SGD against the dense oracle, the
trainer's split/evaluate/export path, and the configuration rules."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from oracle import fictitious_total_update, solve_game
from torch import Tensor, nn

from dgn_dist.config import Config, ConfigError, load_config
from dgn_dist.dgnopt import DGNOpt
from dgn_dist.dgnopt.extended import CopyCoupledBlock
from dgn_dist.game import build_game
from dgn_dist.game.fictitious import FictitiousLayer, split_players
from dgn_dist.game.training import EXPORT_NAME, build_training_optimizer, prepare_model
from dgn_dist.models import build_model
from dgn_dist.trainer import evaluate, train


def _own_identity(sizes: list[int]):  # type: ignore[no-untyped-def]
    """Oracle curvature: own blocks I, cross blocks the Gauss-Newton ones (game SGD)."""
    def override(t: int, q: Tensor) -> Tensor:
        out, p = q.clone(), sizes[t]
        for start in range(0, q.shape[0], p):
            out[start:start + p, start:start + p] = torch.eye(p, dtype=q.dtype)
        return out
    return override


def _fast_deltas(split: nn.Module, x: Tensor, y: Tensor, lr: float,
                 zero_feedback: bool) -> dict[str, Tensor]:
    model = copy.deepcopy(split)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = DGNOpt(model, lr=lr, info="gr", curvature="identity", game_extended=True,
                 zero_feedback=zero_feedback, ema_decay=0.0)
    assert any(isinstance(b, CopyCoupledBlock) for s in opt.solvers for b in s.blocks)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return {n: before[n] - p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("n", [2, 3])
def test_game_extended_sgd_matches_closed_form_and_oracle(n: int) -> None:
    """One Linear layer, B = 1 (the Kronecker factors are exact): every copy moves by
    ``lr (I + (N-1) F)^-1 g`` and the layer by ``N`` times that (DESIGN.md section 3)."""
    torch.manual_seed(3)
    plain = nn.Sequential(nn.Linear(4, 3)).double()
    x, y, lr = torch.randn(1, 4, dtype=torch.float64), torch.tensor([2]), 0.7
    split = split_players(plain, n)
    fast = _fast_deltas(split, x, y, lr, zero_feedback=True)
    logits = plain(x).detach().requires_grad_(True)
    (v_x,) = torch.autograd.grad(F.cross_entropy(logits, y), logits)
    size = sum(p.numel() for p in plain.parameters())
    res = solve_game(build_game(split), x, y, info="gr", lr=lr, terminal_factors=v_x[:, None],
                     curvature_override=_own_identity([size]), zero_feedback=True)
    for name, delta in fast.items():
        torch.testing.assert_close(delta, res.deltas[name], rtol=1e-9, atol=1e-12)
    st = res.stages[0]
    g, f = st.Q_theta[:size], st.Q_thetatheta[:size, size:2 * size]
    total = torch.cat([sum(fast[f"0.players.{i}.{leaf}"] for i in range(n)).reshape(-1)
                       for leaf in ("weight", "bias")])
    torch.testing.assert_close(total, lr * fictitious_total_update(g, f, n), rtol=1e-9,
                               atol=1e-12)
    assert (total - n * lr * g).norm() > 1e-3 * g.norm()  # the cross curvature acts


def test_game_extended_with_feedback_matches_oracle_on_a_deeper_net() -> None:
    """Two split layers, feedback kept: V_x, V_xx and K dx go through the coupled solve."""
    torch.manual_seed(4)
    plain = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    with torch.no_grad():  # small weights keep Γ = ψᵀ M⁻¹ ψ < 1: V_xx is not clipped, so
        for p in plain.parameters():  # the fast path is exact (B = 1, r = 1, Linear)
            p.mul_(0.3)
    x, y, lr = torch.randn(1, 3, dtype=torch.float64), torch.tensor([1]), 0.5
    split = split_players(plain, 2)
    fast = _fast_deltas(split, x, y, lr, zero_feedback=False)
    logits = plain(x).detach().requires_grad_(True)
    (v_x,) = torch.autograd.grad(F.cross_entropy(logits, y), logits)
    sizes = [sum(p.numel() for p in m.parameters()) for m in (plain[0], plain[2])]
    res = solve_game(build_game(split), x, y, info="gr", lr=lr, terminal_factors=v_x[:, None],
                     curvature_override=_own_identity(sizes))
    assert res.stages[0].K.abs().max() > 0
    for name, delta in fast.items():
        torch.testing.assert_close(delta, res.deltas[name], rtol=1e-8, atol=1e-11)


def test_game_extended_with_one_player_is_sgd_and_copies_stay_equal() -> None:
    torch.manual_seed(5)
    plain = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    sgd_model, game_model = copy.deepcopy(plain), copy.deepcopy(plain)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.3, weight_decay=0.01)
    opt = DGNOpt(game_model, lr=0.3, info="gr", curvature="identity", game_extended=True,
                 zero_feedback=True, weight_decay=0.01)
    split = split_players(plain, 3)
    opt3 = DGNOpt(split, lr=0.3, info="gr", curvature="identity", game_extended=True,
                  zero_feedback=True)
    for _ in range(3):
        for model, o in ((sgd_model, sgd), (game_model, opt), (split, opt3)):
            loss = F.cross_entropy(model(x), y)
            o.zero_grad()
            loss.backward()
            o.step()
    for a, b in zip(sgd_model.parameters(), game_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # N = 1 is SGD (Theorem 6)
    for layer in (m for m in split.modules() if isinstance(m, FictitiousLayer)):
        first = layer.players[0].weight
        for other in layer.players[1:]:
            torch.testing.assert_close(other.weight, first, rtol=0, atol=1e-6)


def _cfg(tmp_path: Path, *overrides: str) -> Config:
    return load_config(None, [
        "run.device=cpu", "run.quiet=true", f"run.dir=\"{tmp_path}\"", "run.epochs=1",
        "run.max_steps=6", "data.dataset=\"synthetic\"", "data.synthetic_shape=[1, 6, 6]",
        "data.synthetic_train_size=96", "data.synthetic_test_size=40", "data.batch_size=16",
        "model.name=\"mlp\"", "model.width=8", "logging.tensorboard=false", *overrides])


def test_trainer_splits_evaluates_and_exports_the_plain_model(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "optim.name=\"sgd\"", "optim.lr=0.2", "game.players_per_layer=2")
    summary = train(cfg)
    state = torch.load(tmp_path / EXPORT_NAME, weights_only=True)
    from dgn_dist.data import build_data

    data = build_data(cfg.data, cfg.run.seed)
    plain = build_model(cfg.model, data.input_shape, data.num_classes)
    plain.load_state_dict(state)  # strict: the export has exactly the plain model's keys
    loader = torch.utils.data.DataLoader(data.test, batch_size=64)
    acc, _ = evaluate(plain, loader, torch.device("cpu"))
    assert acc == pytest.approx(summary["test_acc"], abs=1e-9)
    ckpt = torch.load(next((tmp_path / "checkpoints").glob("*.pt")), weights_only=True)
    assert any(".players.1." in k for k in ckpt["model"])  # training state keeps the players


def test_optimizer_choice_and_config_errors(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 4))
    cfg = _cfg(tmp_path, "optim.name=\"sgd\"")
    assert isinstance(build_training_optimizer(cfg, prepare_model(cfg, model)), torch.optim.SGD)
    cfg = _cfg(tmp_path, "optim.name=\"sgd\"", "game.players_per_layer=2")
    opt = build_training_optimizer(cfg, prepare_model(cfg, model))
    assert isinstance(opt, DGNOpt) and opt.game_extended and not opt.feedback
    for bad, words in ((["optim.name=\"adam\"", "game.players_per_layer=2"], "game-extended"),
                       (["optim.name=\"sgd\"", "optim.momentum=0.9", "game.players_per_layer=2"],
                        "momentum")):
        with pytest.raises(ConfigError, match=words):
            train(_cfg(tmp_path, *bad))
