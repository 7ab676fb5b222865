"""Alignment strategies in training (Alg. 2, Table 4): DGNOpt holding one game per alignment,
the per-step switch, the validation reward, checkpoints and TensorBoard tags."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dgnopt_helpers import conv_projection, conv_residual
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import TensorDataset

from dgn_dist.config import Config, ConfigError, load_config
from dgn_dist.dgnopt import DGNOpt
from dgn_dist.dgnopt.alignment import games_differ
from dgn_dist.game.bandit import Exp3PlusPlus
from dgn_dist.game.training import AlignmentDriver, ValidationReward, build_training_optimizer
from dgn_dist.trainer import train

KW = {"lr": 0.2, "curvature": "kfac", "damping": 0.1, "rescale": False}


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(4, 1, 4, 4, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 2, 1])


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
          y: torch.Tensor) -> None:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _delta(before: nn.Module, after: nn.Module) -> torch.Tensor:
    return torch.cat([(p - q).detach().reshape(-1) for p, q in
                      zip(before.parameters(), after.parameters(), strict=True)])


@pytest.mark.parametrize("info", ["fne", "gr"])
def test_set_alignment_selects_the_game_of_the_next_step(info: str) -> None:
    torch.manual_seed(8)
    net = conv_projection()  # the residual block has a 1x1-conv shortcut player
    x, y = _batch()
    deltas = {}
    for name in ("first", "second"):
        multi_model, single_model = copy.deepcopy(net), copy.deepcopy(net)
        multi = DGNOpt(multi_model, info=info, alignments=("first", "second"), **KW)
        multi.set_alignment(name)
        assert multi.alignment == name and multi.game is multi.games[name]
        _step(multi_model, multi, x, y)
        single = DGNOpt(single_model, info=info, alignment=name, **KW)
        _step(single_model, single, x, y)
        torch.testing.assert_close(_delta(net, multi_model), _delta(net, single_model),
                                   rtol=1e-10, atol=1e-12)
        other = "second" if name == "first" else "first"
        assert not any(s.state() for s in multi.solver_sets[other])  # its own state, unused
        assert any(s.state() for s in multi.solver_sets[name])
        deltas[name] = _delta(net, multi_model)
    assert (deltas["first"] - deltas["second"]).norm() > 1e-4 * deltas["first"].norm()


def test_identity_shortcut_gives_one_game_and_bad_names_are_rejected() -> None:
    assert not games_differ(DGNOpt(conv_residual(), alignments=("first", "second")).games)
    opt = DGNOpt(conv_projection(), alignments=("first", "second"))
    assert games_differ(opt.games)
    with pytest.raises(ValueError, match="alignment must be one of first, second"):
        opt.set_alignment("third")
    with pytest.raises(ValueError, match="alignments must be distinct"):
        DGNOpt(conv_projection(), alignments=("first", "first"))


def test_validation_reward_is_batch_accuracy_and_wraps() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 3))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([1.0, 0.0, 0.0]))  # always predicts class 0
    labels = torch.tensor([0, 0, 1, 2, 0, 1])
    data = TensorDataset(torch.randn(6, 1, 2), labels)
    reward = ValidationReward(model, data, batch_size=4, seed=0)
    order = reward.order.tolist()
    first, second = reward(), reward()
    assert first == pytest.approx(float((labels[order[:4]] == 0).float().mean()))
    wrapped = [order[4], order[5], order[0], order[1]]
    assert second == pytest.approx(float((labels[wrapped] == 0).float().mean()))
    assert model.training  # restored after the eval-mode forward


def _driven(model: nn.Module, val: TensorDataset) -> DGNOpt:
    opt = DGNOpt(model, info="gr", alignments=("first", "second"), **KW)
    strategy = Exp3PlusPlus(2, seed=3, arms=("first", "second"))
    opt.alignment_hook = AlignmentDriver(strategy, ValidationReward(model, val, 3, seed=1))
    return opt


def test_bandit_state_is_checkpointed_with_the_optimizer(tmp_path: Path) -> None:
    torch.manual_seed(9)
    net = conv_projection()
    gen = torch.Generator().manual_seed(10)
    val = TensorDataset(torch.randn(5, 1, 4, 4, generator=gen, dtype=torch.float64),
                        torch.randint(0, 3, (5,), generator=gen))
    batches = [(torch.randn(4, 1, 4, 4, generator=gen, dtype=torch.float64),
                torch.randint(0, 3, (4,), generator=gen)) for _ in range(8)]
    a = copy.deepcopy(net)
    opt_a = _driven(a, val)
    for x, y in batches[:5]:
        _step(a, opt_a, x, y)
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, tmp_path / "ck.pt")
    ckpt = torch.load(tmp_path / "ck.pt", weights_only=True)
    b = copy.deepcopy(net)
    opt_b = _driven(b, val)
    b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    hook_a, hook_b = opt_a.alignment_hook, opt_b.alignment_hook
    assert isinstance(hook_a, AlignmentDriver) and isinstance(hook_b, AlignmentDriver)
    assert hook_b.strategy.rounds == 5 and hook_b.strategy.cum_loss == hook_a.strategy.cum_loss
    assert opt_b.alignment == opt_a.alignment
    for x, y in batches[5:]:
        _step(a, opt_a, x, y)
        _step(b, opt_b, x, y)
        assert opt_a.alignment == opt_b.alignment
    assert hook_a.strategy.state_dict()["cum_loss"] == hook_b.strategy.state_dict()["cum_loss"]
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def _cfg(run_dir: Path, *overrides: str) -> Config:
    return load_config(None, [
        "run.device=cpu", "run.quiet=true", f"run.dir=\"{run_dir}\"", "run.epochs=1",
        "data.dataset=\"synthetic\"", "data.synthetic_shape=[1, 6, 6]",
        "data.synthetic_train_size=80", "data.synthetic_test_size=20", "data.val_fraction=0.2",
        "data.batch_size=16", "model.name=\"digits_resnet\"", "model.width=2",
        "model.shortcut=\"conv\"", "optim.name=\"dgnopt\"", "optim.lr=0.05", "game.info=\"gr\"",
        "game.alignment_strategy=\"adaptive\"", "game.reward_batch_size=8",
        "curvature.kind=\"kfac\"", "logging.log_every=1", "logging.curvature_every=0",
        "checkpoint.every_steps=2", "checkpoint.keep_last=4", *overrides])


def test_trainer_writes_bandit_tags_and_resumes_exactly(tmp_path: Path) -> None:
    full = train(_cfg(tmp_path / "full"))
    acc = EventAccumulator(str(tmp_path / "full" / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"bandit/arm0/prob", "bandit/arm1/prob", "bandit/reward"} <= tags
    probs = [e.value for e in acc.Scalars("bandit/arm0/prob")]
    assert len(probs) == full["steps"] and all(0.0 < p < 1.0 for p in probs)
    ckpt = tmp_path / "full" / "checkpoints" / "step-2.pt"
    resumed = train(_cfg(tmp_path / "resumed", f"run.resume=\"{ckpt}\""))
    assert resumed["test_acc"] == full["test_acc"]
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], rel=1e-12)


def test_alignment_strategy_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="alignment_strategy='random' needs"):
        train(_cfg(tmp_path, "optim.name=\"sgd\"", "game.alignment_strategy=\"random\""))
    with pytest.raises(ValueError, match="val_fraction"):
        build_training_optimizer(_cfg(tmp_path), conv_projection().float(), val=None)
    cfg = _cfg(tmp_path, "model.shortcut=\"identity\"")
    with pytest.warns(RuntimeWarning, match="same game"):
        build_training_optimizer(cfg, conv_residual().float(), val=TensorDataset(
            torch.randn(2, 1, 4, 4), torch.tensor([0, 1])))
