"""build_optimizer: every name builds from the config and takes a step; bad names fail."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dgn_dist.config.schema import Config
from dgn_dist.optim import EKFAC, EMSA, OPTIMIZERS, build_optimizer


def small_model() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(),
                         nn.Linear(2 * 16, 3))


def config(name: str, **optim: object) -> Config:
    cfg = Config()
    cfg.optim.name = name  # type: ignore[assignment]
    for key, value in optim.items():
        setattr(cfg.optim, key, value)
    return cfg


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n != "dgnopt"])
def test_every_name_builds_and_steps(name: str) -> None:
    model = small_model()
    opt = build_optimizer(config(name, lr=0.05, weight_decay=1e-4), model)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups[0]["lr"] == 0.05
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(4, 1, 4, 4), torch.randint(0, 3, (4,))
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_hyper_parameters_reach_the_optimizers() -> None:
    adam = build_optimizer(config("adam", betas=[0.8, 0.9], eps=1e-6), small_model())
    assert adam.param_groups[0]["betas"] == (0.8, 0.9) and adam.param_groups[0]["eps"] == 1e-6
    rms = build_optimizer(config("rmsprop", alpha=0.9, momentum=0.5), small_model())
    assert rms.param_groups[0]["alpha"] == 0.9 and rms.param_groups[0]["momentum"] == 0.5
    cfg = config("ekfac")
    cfg.curvature.kind = "kfac"
    cfg.curvature.damping = 0.03
    cfg.curvature.inverse_interval = 7
    ekfac = build_optimizer(cfg, small_model())
    assert isinstance(ekfac, EKFAC)
    assert (ekfac.mode, ekfac.damping, ekfac.inverse_interval) == ("kfac", 0.03, 7)
    emsa = build_optimizer(config("emsa", emsa_rho=2.0, emsa_lbfgs_iters=3), small_model())
    assert isinstance(emsa, EMSA) and (emsa.rho, emsa.lbfgs_iters) == (2.0, 3)
    from dgn_dist.dgnopt import DGNOpt
    cfg = config("dgnopt", dgnopt_kl_clip=2e-3)
    cfg.game.feedback_consistency = True
    cfg.curvature.rescale = False
    dgn = build_optimizer(cfg, small_model())
    assert isinstance(dgn, DGNOpt)
    assert (dgn.kl_clip, dgn.feedback_consistency, dgn.rescale) == (2e-3, True, False)
    plain = build_optimizer(config("dgnopt"), small_model())
    assert isinstance(plain, DGNOpt)
    assert (plain.kl_clip, plain.feedback_consistency) == (0.0, False)  # defaults: off


def test_bad_names_and_combinations() -> None:
    with pytest.raises(ValueError, match="unknown optim.name 'lbfgs'.*sgd"):
        build_optimizer(config("lbfgs"), small_model())
    cfg = config("ekfac")
    cfg.curvature.kind = "diag"
    with pytest.raises(ValueError, match="curvature.kind"):
        build_optimizer(cfg, small_model())


def test_dgnopt_is_built_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def build_dgnopt(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
        calls.append(cfg.optim.name)
        return torch.optim.SGD(model.parameters(), lr=cfg.optim.lr)

    fake = types.ModuleType("dgn_dist.dgnopt")
    fake.build_dgnopt = build_dgnopt  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dgn_dist.dgnopt", fake)
    opt = build_optimizer(config("dgnopt"), small_model())
    assert calls == ["dgnopt"] and isinstance(opt, torch.optim.SGD)
    monkeypatch.setitem(sys.modules, "dgn_dist.dgnopt", None)  # import now raises ImportError
    with pytest.raises(ValueError, match="dgnopt is unavailable"):
        build_optimizer(config("dgnopt"), small_model())
