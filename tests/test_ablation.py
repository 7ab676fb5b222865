"""The Fig. 6 ablation switch (DESIGN.md §2.3): a baseline's preconditioner inside DGNOpt.

With the feedback zeroed (``game.info = "olne"``) the lifted baseline must BE the baseline
(Theorem 6): SGD, RMSprop and Adam exactly as torch.optim, EKFAC exactly as our EKFAC
(without KL clipping, momentum and weight decay; DGNOpt's stage cost puts ``wd`` into the
damping). With the feedback kept the step changes by ``K δx``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dgn_dist.config import Config, ConfigError, load_config
from dgn_dist.dgnopt import DGNOpt
from dgn_dist.dgnopt.baselines import AdamBlock, DiagRule, TorchRmsBlock
from dgn_dist.game.training import build_training_optimizer
from dgn_dist.optim import EKFAC
from dgn_dist.trainer import train

STEPS = 4


def _net() -> nn.Module:
    torch.manual_seed(11)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(),
                         nn.Linear(5, 3)).double()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(12)
    return [(torch.randn(8, 6, generator=gen, dtype=torch.float64),
             torch.randint(0, 3, (8,), generator=gen)) for _ in range(STEPS)]


def _cfg(ablation: str, info: str, *overrides: str) -> Config:
    return load_config(None, ["optim.name=\"dgnopt\"", f"game.ablation=\"{ablation}\"",
                              f"game.info=\"{info}\"", "optim.weight_decay=0.01",
                              "curvature.rescale=false", *overrides])


def _train(model: nn.Module, opt: torch.optim.Optimizer) -> nn.Module:
    for x, y in _batches():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _assert_same(a: nn.Module, b: nn.Module, tol: float = 1e-12) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters(),
                                                          strict=True))


BASELINES = {
    "sgd": (("optim.lr=0.3",),
            lambda m: torch.optim.SGD(m.parameters(), lr=0.3, weight_decay=0.01)),
    "rmsprop": (("optim.lr=0.01", "optim.alpha=0.9", "optim.eps=1e-6"),
                lambda m: torch.optim.RMSprop(m.parameters(), lr=0.01, alpha=0.9, eps=1e-6,
                                              weight_decay=0.01)),
    "adam": (("optim.lr=0.01", "optim.betas=[0.8, 0.95]", "optim.eps=1e-6"),
             lambda m: torch.optim.Adam(m.parameters(), lr=0.01, betas=(0.8, 0.95), eps=1e-6,
                                        weight_decay=0.01)),
}


@pytest.mark.parametrize("name", list(BASELINES))
def test_lifted_baseline_without_feedback_is_the_baseline(name: str) -> None:
    overrides, make = BASELINES[name]
    net = _net()
    ref_model = copy.deepcopy(net)
    _train(ref_model, make(ref_model))
    model = copy.deepcopy(net)
    opt = build_training_optimizer(_cfg(name, "olne", *overrides), model)
    assert isinstance(opt, DGNOpt) and not opt.feedback
    _train(model, opt)
    _assert_same(model, ref_model)
    assert _max_diff(model, net) > 1e-3  # the runs moved


@pytest.mark.parametrize("kl_clip", [0.0, 1e-3])
def test_lifted_ekfac_without_feedback_is_ekfac(kl_clip: float) -> None:
    net = _net()
    ref_model = copy.deepcopy(net)
    ekfac = EKFAC(ref_model, lr=0.1, damping=0.1, ema_decay=0.9, inverse_interval=2,
                  kl_clip=kl_clip)
    _train(ref_model, ekfac)
    model = copy.deepcopy(net)
    opt = build_training_optimizer(_cfg("ekfac", "olne", "optim.lr=0.1", "optim.weight_decay=0",
                                        "curvature.damping=0.1", "curvature.ema_decay=0.9",
                                        "curvature.inverse_interval=2",
                                        f"optim.ekfac_kl_clip={kl_clip}"), model)
    assert isinstance(opt, DGNOpt) and opt.curvature == "ekfac"
    _train(model, opt)
    _assert_same(model, ref_model)
    assert opt.last_kl_scale == pytest.approx(ekfac.last_kl_scale, rel=1e-10)
    assert (ekfac.last_kl_scale < 1.0) == (kl_clip > 0)  # the clipping acts when on


@pytest.mark.parametrize("name", [*BASELINES, "ekfac"])
def test_feedback_lifts_the_baseline_to_a_different_step(name: str) -> None:
    overrides = BASELINES[name][0] if name in BASELINES else ("optim.lr=0.1",)
    net = _net()
    closed, plain = copy.deepcopy(net), copy.deepcopy(net)
    _train(closed, build_training_optimizer(_cfg(name, "fne", *overrides), closed))
    _train(plain, build_training_optimizer(_cfg(name, "olne", *overrides), plain))
    assert _max_diff(closed, plain) > 1e-6  # K δx acts (the feedback of η^C)


def test_ablation_builds_the_baseline_blocks() -> None:
    model = _net()
    opt = build_training_optimizer(_cfg("adam", "fne", "optim.betas=[0.5, 0.9]"), model)
    assert isinstance(opt, DGNOpt)
    blocks = [b for s in opt.solvers for b in s.blocks]
    assert blocks and all(isinstance(b, AdamBlock) and b.beta1 == 0.5 for b in blocks)
    opt = build_training_optimizer(_cfg("rmsprop", "fne"), _net())
    assert all(isinstance(b, TorchRmsBlock) for s in opt.solvers for b in s.blocks)
    gr = build_training_optimizer(_cfg("sgd", "gr"), _net())
    assert isinstance(gr, DGNOpt) and gr.game_extended and gr.curvature == "identity"


def test_adam_block_state_round_trip() -> None:
    net = _net()
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    opt_a = DGNOpt(a, lr=0.01, info="fne", curvature="diag", diag_rule=DiagRule("adam"))
    _train(a, opt_a)
    opt_b = DGNOpt(b, lr=0.01, info="fne", curvature="diag", diag_rule=DiagRule("adam"))
    b.load_state_dict(a.state_dict())
    opt_b.load_state_dict(opt_a.state_dict())
    _train(a, opt_a)
    _train(b, opt_b)
    _assert_same(a, b)


def test_ablation_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="optim.name='dgnopt'"):
        train(load_config(None, ["game.ablation=\"adam\"", "optim.name=\"adam\"",
                                 f"run.dir=\"{tmp_path}\"", "run.quiet=true"]))
    with pytest.raises(ValueError, match="kind must be one of"):
        DiagRule("sgd")
    with pytest.raises(ValueError, match="gr"):
        build_training_optimizer(_cfg("adam", "gr"), _net())
