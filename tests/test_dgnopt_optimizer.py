"""DGNOpt through the ordinary training loop: Theorem 6, SGD, BatchNorm, checkpoints, errors."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from dgnopt_helpers import conv_projection, conv_residual, game_of, linear_residual
from torch import nn

from dgn_dist.config.schema import Config
from dgn_dist.dgnopt import DGNOpt, build_dgnopt, check_config
from dgn_dist.dgnopt.skips import MAX_DAMPING, TrainingDiverged


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches) -> list[float]:
    losses = []
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def _batches(n: int, b: int, shape: tuple[int, ...], classes: int = 3, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, *shape, generator=g, dtype=dtype),
             torch.randint(0, classes, (b,), generator=g)) for _ in range(n)]


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor], atol: float = 1e-10) -> None:
    for x, y in zip(a, b, strict=False):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-8)


@pytest.mark.parametrize("alignment", ["first", "second"])
def test_theorem6_gr_with_cross_zeroed_is_fne(alignment: str) -> None:
    for make in (lambda: linear_residual(alignment), conv_projection):
        base = make()
        runs = []
        for info, zero_cross in (("gr", True), ("fne", False)):
            model = copy.deepcopy(base)
            game = model if isinstance(model, nn.Module) and hasattr(model, "stages") \
                else game_of(model, alignment)
            opt = DGNOpt(model, game=game, lr=0.2, info=info, curvature="kfac", vxx="exact",
                         damping=0.1, zero_cross=zero_cross, coop_iters=200, coop_tol=1e-14)
            shape = (4,) if hasattr(model, "stages") else (1, 4, 4)
            _train(model, opt, _batches(2, 3, shape))
            runs.append(_params(model))
        _assert_same(*runs)
    # and with the cross blocks on, gr differs from fne (the test can fail)
    model_a, model_b = linear_residual(alignment), None
    model_b = copy.deepcopy(model_a)
    for model, info in ((model_a, "gr"), (model_b, "fne")):
        opt = DGNOpt(model, game=model, lr=0.2, info=info, curvature="kfac", vxx="exact",
                     damping=0.1)
        _train(model, opt, _batches(1, 3, (4,)))
    assert not torch.allclose(model_a.stages[1].players[0].module.weight,
                              model_b.stages[1].players[0].module.weight)


@pytest.mark.parametrize("info,zero_cross", [("fne", False), ("gr", True)])
def test_theorem6_feedback_off_identity_is_sgd(info: str, zero_cross: bool) -> None:
    """(Q_θx, Q_θθ) := (0, I) (and P_uv := 0 for gr) gives torch SGD with weight decay."""
    model = conv_projection()
    ref = copy.deepcopy(model)
    opt = DGNOpt(model, lr=0.1, info=info, curvature="identity", damping=0.0,
                 weight_decay=0.01, zero_feedback=True, zero_cross=zero_cross,
                 alignment="first")
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, weight_decay=0.01)
    batches = _batches(3, 4, (1, 4, 4))
    _train(model, opt, batches)
    _train(ref, sgd, batches)
    _assert_same(_params(model), _params(ref))


def test_olne_identity_equals_torch_sgd_on_real_model() -> None:
    """olne + identity is back-propagation + SGD, BatchNorm included, float32."""
    torch.manual_seed(3)
    from dgn_dist.models.blocks import ResidualBlock
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                          nn.ReLU(), ResidualBlock(4, 4, nn.ReLU, batch_norm=True),
                          ResidualBlock(4, 6, nn.ReLU, stride=2, batch_norm=True),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10))
    ref = copy.deepcopy(model)
    opt = DGNOpt(model, lr=0.05, info="olne", curvature="identity", damping=0.0,
                 weight_decay=1e-3)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.05, weight_decay=1e-3)
    batches = _batches(3, 8, (1, 8, 8), classes=10, dtype=torch.float32)
    _train(model, opt, batches)
    _train(ref, sgd, batches)
    _assert_same(_params(model), _params(ref), atol=1e-6)
    for a, b in zip(model.buffers(), ref.buffers(), strict=False):
        torch.testing.assert_close(a, b)


def test_batchnorm_running_stats_updated_once_per_step() -> None:
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    opt = DGNOpt(model, lr=0.1, info="gr", curvature="kfac", damping=0.1, vxx="exact")
    bn = model[1]
    for step, (x, y) in enumerate(_batches(3, 8, (5,), dtype=torch.float32), start=1):
        loss = F.cross_entropy(model(x), y)
        mean, var = bn.running_mean.clone(), bn.running_var.clone()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert int(bn.num_batches_tracked) == step
        assert torch.equal(mean, bn.running_mean) and torch.equal(var, bn.running_var)
        assert bn.track_running_stats


@pytest.mark.parametrize("info", ["fne", "gr"])
def test_few_steps_lower_the_loss_on_digits_like_data(info: str) -> None:
    torch.manual_seed(0)
    model = (conv_projection() if info == "gr" else conv_residual()).float()
    opt = DGNOpt(model, lr=0.1, info=info, curvature="ekfac", damping=0.1,
                 inverse_interval=2, ema_decay=0.9, alignment="first")
    x = torch.randn(16, 1, 4, 4)
    y = torch.randint(0, 3, (16,))
    losses = _train(model, opt, [(x, y)] * 15)
    assert losses[-1] < 0.7 * losses[0]


def test_state_dict_round_trip_is_exact() -> None:
    torch.manual_seed(0)
    model = conv_projection()
    opt = DGNOpt(model, lr=0.1, info="gr", curvature="ekfac", damping=0.1, ema_decay=0.8,
                 inverse_interval=3, vxx="exact", alignment="first", stats_every=1)
    batches = _batches(4, 4, (1, 4, 4))
    _train(model, opt, batches[:2])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    clone = copy.deepcopy(model)
    opt2 = DGNOpt(clone, lr=0.5, info="gr", curvature="ekfac", damping=0.1, ema_decay=0.8,
                  inverse_interval=3, vxx="exact", alignment="first")
    opt2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == 0.1 and opt2.param_groups[0]["dgn_step"] == 2
    _train(model, opt, batches[2:])
    _train(clone, opt2, batches[2:])
    for a, b in zip(model.parameters(), clone.parameters(), strict=False):
        assert torch.equal(a, b)


def test_curvature_stats_tags() -> None:
    model = conv_projection()
    opt = DGNOpt(model, lr=0.1, info="gr", curvature="kfac", damping=0.1, stats_every=2,
                 alignment="first")
    _train(model, opt, _batches(1, 4, (1, 4, 4)))
    assert not any(k.startswith(("value/", "update/")) for k in opt.curvature_stats())
    _train(model, opt, _batches(1, 4, (1, 4, 4)))
    stats = opt.curvature_stats()
    for key in ("curvature/2.conv1/A_cond", "curvature/2.conv1/G_eig_max",
                "curvature/2.conv1/damping", "value/2_2/Vx_norm", "value/2_2/Vxx_trace",
                "value/2_2/Vxx_eff_rank", "value/2_2/clipped_frac", "value/terminal/Vx_norm",
                "update/4/open_norm", "update/4/feedback_norm", "update/4/feedback_ratio",
                "coop/2_1/cross_ratio"):
        assert key in stats, key
    assert all(isinstance(v, float) for v in stats.values())
    assert stats["update/0/feedback_norm"] == 0.0 and stats["update/4/feedback_norm"] > 0
    assert set(opt.curvature_eigenvalues()) >= {"curvature/2.conv1/A_eig"}


def test_step_without_capture_and_bad_input_raise() -> None:
    model = conv_residual()
    opt = DGNOpt(model, lr=0.1)
    with pytest.raises(RuntimeError, match="captured batch"):
        opt.step()
    model.eval()
    F.cross_entropy(model(torch.randn(2, 1, 4, 4, dtype=torch.float64)),
                    torch.tensor([0, 1])).backward()
    with pytest.raises(RuntimeError, match="captured batch"):
        opt.step()
    model.train()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    x[0, 0, 0, 0] = float("nan")
    F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    with pytest.raises(ValueError, match="NaN"):
        opt.step()


def test_non_finite_loss_skips_step_and_raises_damping() -> None:
    model = conv_residual()
    opt = DGNOpt(model, lr=0.1, damping=1e-3)
    before = _params(model)
    logits = model(torch.randn(2, 1, 4, 4, dtype=torch.float64))
    loss = (logits * float("inf")).sum()
    loss.backward()
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    _assert_same(before, _params(model), atol=0.0)
    assert opt.param_groups[0]["damping"] == pytest.approx(1e-2)
    assert opt.param_groups[0]["skipped"] == 1


def test_skipped_step_restores_the_forwards_batchnorm_running_statistics() -> None:
    """A finite batch whose activations overflow leaves inf in the forward's running
    statistics; when the step is then skipped (here: an infinite loss), they are back at
    their values before the forward, and an evaluation afterwards is finite."""
    from dgn_dist.models.blocks import ResidualBlock

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Tanh(),
                          ResidualBlock(2, 2, nn.Tanh, batch_norm=True), nn.Flatten(),
                          nn.Linear(2 * 4 * 4, 3)).double()
    opt = DGNOpt(model, lr=0.1, damping=1e-3)
    _train(model, opt, _batches(1, 4, (1, 4, 4)))  # one ordinary step moves the statistics
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    x = torch.full((4, 1, 4, 4), 1e300, dtype=torch.float64)
    x[0] = -1e300
    logits = model(x)
    assert not all(torch.isfinite(model.state_dict()[k]).all() for k in before)
    (logits * float("inf")).sum().backward()
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    after = model.state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)
    model.eval()
    assert torch.isfinite(model(torch.randn(2, 1, 4, 4, dtype=torch.float64))).all()


def test_repeated_skips_stop_at_the_damping_cap_with_a_clear_error() -> None:
    """The damping rises tenfold per skip up to MAX_DAMPING; a skip at the cap means the run
    diverged and ends it with what to change (it used to climb to inf)."""
    model = conv_residual()
    opt = DGNOpt(model, lr=0.1, damping=1e-3)
    before = _params(model)
    seen = []
    with pytest.warns(RuntimeWarning, match="skipped"), \
            pytest.raises(TrainingDiverged, match="lower optim.lr or a larger curvature.damping"):
        for _ in range(20):
            opt.zero_grad()
            (model(torch.randn(2, 1, 4, 4, dtype=torch.float64)) * float("inf")).sum().backward()
            opt.step()
            seen.append(opt.param_groups[0]["damping"])
    assert seen == pytest.approx([1e-3 * 10 ** (i + 1) for i in range(len(seen))])
    assert seen[-1] == MAX_DAMPING and opt.param_groups[0]["skipped"] == len(seen) == 11
    _assert_same(before, _params(model), atol=0.0)


@pytest.mark.parametrize("kwargs,match", [
    ({"lr": 0.0}, "lr must be > 0"), ({"info": "nash"}, "info must be one of"),
    ({"curvature": "full"}, "curvature must be one of"), ({"vxx": "gn"}, "vxx must be"),
    ({"rank": 0}, "rank must be >= 1"), ({"damping": 0.0}, "damping must be > 0"),
    ({"ema_decay": 1.0}, "ema_decay"), ({"factor_interval": 0}, "factor_interval"),
    ({"inverse_interval": 0}, "inverse_interval"), ({"weight_decay": -1.0}, "weight_decay"),
    ({"feedback_scale": -1.0}, "feedback_scale"), ({"alignment": "third"}, "alignment"),
    ({"info": "gr", "curvature": "diag"}, "cooperative form"),
    ({"kl_clip": -1e-3}, "kl_clip must be >= 0"),
    ({"feedback_consistency": "yes"}, "feedback_consistency must be true or false"),
])
def test_hyper_parameters_validated(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DGNOpt(conv_residual(), **kwargs)


def test_build_from_config() -> None:
    cfg = Config()
    cfg.optim.name, cfg.optim.lr = "dgnopt", 0.05
    cfg.game.info, cfg.curvature.kind = "gr", "kfac"
    model = conv_residual()
    opt = build_dgnopt(cfg, model)
    assert isinstance(opt, DGNOpt) and opt.info == "gr" and opt.param_groups[0]["lr"] == 0.05
    cfg.curvature.kind = "diag"
    with pytest.raises(ValueError, match="cooperative form"):
        check_config(cfg)


def test_cut_graph_skips_the_model_backward_and_changes_nothing() -> None:
    """The default hook returns the logits as a leaf: ``loss.backward()`` fills no ``.grad``
    and the steps equal those of a run that back-propagates through the whole model."""
    runs = {}
    for full in (False, True):
        torch.manual_seed(0)
        model = conv_residual().double()
        opt = DGNOpt(model, lr=0.1, info="fne", curvature="ekfac", damping=0.1,
                     full_backward=full)
        batches = _batches(2, 4, (1, 4, 4))
        loss = F.cross_entropy(model(batches[0][0]), batches[0][1])
        opt.zero_grad()
        loss.backward()
        filled = [p.grad is not None for p in model.parameters()]
        assert all(filled) if full else not any(filled)
        opt.step()
        _train(model, opt, batches[1:])
        runs[full] = _params(model)
    _assert_same(runs[False], runs[True], atol=0.0)
