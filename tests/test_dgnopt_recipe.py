"""The closed-loop settings of the DIGITS recipe (README "Small batches: bound the closed
loop"): ``optim.dgnopt_kl_clip`` and ``game.feedback_consistency`` on a plain DGNOpt run."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dgn_dist.config import load_config
from dgn_dist.dgnopt import DGNOpt
from dgn_dist.game.training import build_training_optimizer
from dgn_dist.repro.common import config_path, run_config


def _net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 4)).double()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    return (torch.randn(4, 12, generator=gen, dtype=torch.float64),
            torch.randint(0, 4, (4,), generator=gen))


def _opt(model: nn.Module, *overrides: str) -> DGNOpt:
    cfg = load_config(None, ['optim.name="dgnopt"', "optim.lr=0.5", "curvature.damping=0.01",
                             "curvature.rescale=false", "logging.curvature_every=1",
                             *overrides])
    opt = build_training_optimizer(cfg, model)
    assert isinstance(opt, DGNOpt)
    return opt


def _step(model: nn.Module, opt: DGNOpt) -> None:
    x, y = _batch()
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_kl_clip_scales_the_whole_step_by_nu() -> None:
    """The first stage's input never changes (δX_0 = 0), so its step is ``lr ν k``: the
    clipped step is ν times the unclipped one, with ν < 1 the factor the optimizer reports."""
    net = _net()
    plain, clipped = copy.deepcopy(net), copy.deepcopy(net)
    _step(plain, _opt(plain))
    opt = _opt(clipped, "optim.dgnopt_kl_clip=1e-4")
    _step(clipped, opt)
    nu = opt.last_kl_scale
    assert 0.0 < nu < 1.0
    assert opt.curvature_stats()["update/kl_scale"] == nu
    first = [(p0, p1, p2) for p0, p1, p2 in zip(net[0].parameters(), plain[0].parameters(),
                                                clipped[0].parameters(), strict=True)]
    for p0, p1, p2 in first:
        torch.testing.assert_close(p2 - p0, nu * (p1 - p0), rtol=1e-10, atol=1e-14)


def test_feedback_consistency_bounds_the_gram_blocks() -> None:
    """At batch 4 with 16 and 272 parameters per player and damping 0.01, ``Γ_b`` exceeds 1:
    without the scale the refactoring clips ``V_xx``; with it the stages report their scale
    ``s ≥ 1`` (> 1 somewhere) and nothing is clipped."""
    model = _net()
    opt = _opt(model)
    _step(model, opt)
    stats = opt.curvature_stats()
    assert max(v for k, v in stats.items() if k.endswith("/clipped_frac")) > 0
    assert not any(k.endswith("/feedback_consistency") for k in stats)
    model = _net()
    opt = _opt(model, "game.feedback_consistency=true")
    _step(model, opt)
    stats = opt.curvature_stats()
    scales = [v for k, v in stats.items() if k.endswith("/feedback_consistency")]
    assert scales and min(scales) >= 1.0 and max(scales) > 1.0
    assert all(v == 0 for k, v in stats.items() if k.endswith("/clipped_frac"))


def test_the_digits_recipe_trains(tmp_path: Path) -> None:
    """The README main job's DGNOpt config, two epochs (324 steps at batch 8) on DIGITS, seed
    0: 97.2 % test accuracy measured; the damping-0.3 recipe it replaced reached 94.2 %."""
    summary = run_config(config_path("digits_dgnopt.toml"), [
        "run.epochs=2", "run.quiet=true", f'run.dir="{tmp_path}/run"',
        "logging.tensorboard=false"])
    assert summary["steps"] == 324
    assert summary["test_acc"] > 96.0
