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
from dgnopt_helpers import fast_step
from torch import nn

from dgn_dist.config import Config, ConfigError, load_config
from dgn_dist.dgnopt import DGNOpt
from dgn_dist.dgnopt.baselines import AdamBlock, DiagRule, TorchRmsBlock
from dgn_dist.dgnopt.reduction import Reducer
from dgn_dist.dgnopt.sweep import feedback_consistency_scale
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
    # ... and TensorBoard gets it (update/kl_scale) exactly when the clipping is on
    assert ("update/kl_scale" in opt.curvature_stats()) == (kl_clip > 0)
    assert ("update/kl_scale" in ekfac.curvature_stats()) == (kl_clip > 0)
    if kl_clip > 0:
        assert opt.curvature_stats()["update/kl_scale"] == pytest.approx(ekfac.last_kl_scale)


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


# -- the closed-loop lift against a dense float64 computation of DESIGN.md §2.3 -------------
#
# Lifting a baseline with preconditioner P and learning rate η: Q_θθ := P / η for the open
# gain k = η P⁻¹ Q_θ (the baseline's step), and, for the closed-loop terms, the consistent
# curvature Q̃_t = s_t P / η with s_t = max(1, λ_max(Q_θθ⁻¹ H_t)), H_t = F_θᵀ V_xx F_θ the
# Gauss-Newton curvature (at B = 1 its nonzero spectrum is that of the Gram Γ):
#   K = Q̃⁻¹ Q_θx,  V_x = Q_x − Q_xθ k / s,  V_xx = Q_xx − Q_xθ K,  δθ = k + K δx.


def _lift_oracle(game, x, y, lr: float, p_diag, weight_decay: float, apply: bool = True):
    """Dense sweep with ``Q̃_t = s_t P_t / lr`` (``p_diag(t)``: P's diagonal), the scales
    ``s_t``, and (``apply``) the dense update pass ``θ ← θ − (s_t k̃_t + K_t δx_t)`` applied
    to ``game``."""
    from oracle import flatten_state, solve_game

    scales: dict[int, float] = {}

    def override(t: int, q: torch.Tensor) -> torch.Tensor:
        gn = q - weight_decay * torch.eye(q.shape[0], dtype=q.dtype)  # F_θᵀ V_xx F_θ
        inv_sqrt = (lr / p_diag(t)).sqrt()
        top = float(torch.linalg.eigvalsh(inv_sqrt[:, None] * gn * inv_sqrt[None, :]).max())
        scales[t] = max(1.0, top) if t > 0 else 1.0  # stage 0: δx_0 = 0, K unused
        return torch.diag(scales[t] * p_diag(t) / lr)

    res = solve_game(game, x, y, info="fne", weight_decay=weight_decay, curvature="gn",
                     curvature_override=override)
    if not apply:
        return res, scales
    x_new = res.states[0]
    with torch.no_grad():
        for t, stage in enumerate(game.stage_list()):
            st = res.stages[t]
            dx = flatten_state(x_new) - flatten_state(res.states[t])
            delta = scales[t] * st.k + st.K @ dx
            params = [p for pl in stage.players for p in pl.parameters()]
            offset = 0
            for p in params:
                p.sub_(delta[offset:offset + p.numel()].reshape(p.shape))
                offset += p.numel()
            x_new = stage(x_new)
    return res, scales


def _lift_fast(model, game, x, y, lr: float, consistent: bool = True, **kw: object) -> DGNOpt:
    return fast_step(model, game, x, y, lr=1.0, info="fne", gain_scale=lr, rescale=False,
                     vxx="exact", ema_decay=0.0, stats_every=1,
                     feedback_consistency=consistent, **kw)


def _param_count(game, t: int) -> int:
    """Parameters of stage ``t``'s players (the length of its stacked θ)."""
    return sum(p.numel() for pl in game.stage_list()[t].players for p in pl.parameters())


def _lift_case():
    from dgnopt_helpers import conv_residual, copy_model, game_of

    model = conv_residual()
    game = game_of(model, "second")
    _, ref_game = copy_model(model, game)
    gen = torch.Generator().manual_seed(3)
    x = 2.0 * torch.randn(1, 1, 4, 4, generator=gen, dtype=torch.float64)
    return model, game, ref_game, x, torch.tensor([1])


def _check_lift(opt: DGNOpt, game, ref_game, res, scales: dict[int, float]) -> None:
    from dgnopt_helpers import factors_dense, flat

    tol = dict(atol=1e-9, rtol=1e-7)
    stats = opt.curvature_stats()
    for t in range(1, len(res.stages)):
        name = game.stages[t].name.replace(":", "_").replace(".", "_")
        fast_s = [v for k, v in stats.items()
                  if k.endswith("/feedback_consistency") and f"/{name}/" in k]
        assert fast_s == [pytest.approx(scales[t], rel=1e-9)], (t, fast_s, scales)
        torch.testing.assert_close(flat(opt.last_sweep["vx"][t]), res.V_x[t], **tol)
        torch.testing.assert_close(factors_dense(opt.last_sweep["u"][t]), res.V_xx[t], **tol)
    clipped = [v for k, v in stats.items() if k.endswith("clipped_frac")]
    assert clipped and max(clipped) == 0.0  # Γ/s ⪯ I: the Schur complement stays PSD
    for (_, pa), (_, pb) in zip(game.players(), ref_game.players(), strict=True):
        for a, b in zip(pa.parameters(), pb.parameters(), strict=True):
            torch.testing.assert_close(a.detach(), b.detach(), **tol)


def test_lifted_sgd_equals_dense_closed_loop() -> None:
    """SGD (P = I) at a learning rate where Γ > 1: V_x, V_xx, the scales and the step
    (baseline k plus the consistent feedback) equal the dense float64 computation."""
    lr, wd = 0.8, 0.01
    model, game, ref_game, x, y = _lift_case()
    opt = _lift_fast(model, game, x, y, lr, curvature="identity", weight_decay=wd)
    res, scales = _lift_oracle(ref_game, x, y, lr, lambda t: torch.ones(
        _param_count(ref_game, t), dtype=torch.float64), wd)
    assert max(scales.values()) > 1.5  # the over-correcting regime is exercised
    _check_lift(opt, game, ref_game, res, scales)


def test_lifted_rmsprop_equals_dense_closed_loop() -> None:
    """RMSprop's diagonal (first step: v = (1 − α) Q_θ²) lifted the same way."""
    lr, alpha, eps, wd = 0.05, 0.9, 1e-3, 0.0
    model, game, ref_game, x, y = _lift_case()
    opt = _lift_fast(model, game, x, y, lr, curvature="diag",
                     diag_rule=DiagRule("rmsprop", alpha=alpha, eps=eps))

    q_theta: dict[int, torch.Tensor] = {}

    def p_diag(t: int) -> torch.Tensor:
        q = q_theta.get(t, torch.zeros(_param_count(ref_game, t), dtype=torch.float64))
        return ((1.0 - alpha) * q * q).sqrt() + eps

    # Q_θ of stage t is F_θᵀ V_x^{t+1} (the closed-loop co-state, not the back-propagated
    # gradient) and depends only on later stages: T passes make every stage's P exact.
    for _ in game.stage_list():
        res, _ = _lift_oracle(ref_game, x, y, lr, p_diag, wd, apply=False)
        q_theta = {t: st.Q_theta for t, st in enumerate(res.stages)}
    res, scales = _lift_oracle(ref_game, x, y, lr, p_diag, wd)
    assert max(scales.values()) > 1.5
    _check_lift(opt, game, ref_game, res, scales)


@pytest.mark.parametrize("name", ["sgd", "ekfac"])
def test_unscaled_lift_breaks_the_schur_complement(name: str) -> None:
    """Without the consistency scale the same step clips V_xx (Γ > I): what made the lifted
    SGD diverge and the lifted EKFAC never train in Fig. 6; with it nothing is clipped."""
    kw = {"curvature": "identity"} if name == "sgd" else {"curvature": "ekfac",
                                                          "damping": 0.01}
    clipped = {}
    for consistent in (False, True):
        model, game, _, x, y = _lift_case()
        opt = _lift_fast(model, game, x, y, 0.8, consistent=consistent, **kw)
        clipped[consistent] = max(v for k, v in opt.curvature_stats().items()
                                  if k.endswith("clipped_frac"))
    assert clipped[False] > 0.0 and clipped[True] == 0.0


def test_ablation_consistency_switch() -> None:
    on = build_training_optimizer(_cfg("sgd", "fne"), _net())
    off = build_training_optimizer(_cfg("sgd", "fne", "game.ablation_consistency=false"), _net())
    assert isinstance(on, DGNOpt) and isinstance(off, DGNOpt)
    assert on.feedback_consistency and not off.feedback_consistency


class _StubSolver:
    """Just what :func:`feedback_consistency_scale` reads: ``gram``, ``views``, scales."""

    def __init__(self, gram: torch.Tensor) -> None:
        self._gram, self.views, self.scales = gram, [object(), object()], []

    def gram(self, batch: object) -> torch.Tensor:
        return self._gram

    def set_scales(self, scales: list[torch.Tensor]) -> None:
        self.scales = scales


class _TwoEqualReplicas(Reducer):
    """Two data-parallel replicas holding the same values: every sum doubles."""

    world = 2

    def reduce(self, tensors, category, mean=False, symmetric=False) -> None:  # type: ignore[override]
        for t in tensors:
            t.mul_(1.0 if mean else 2.0)


def test_feedback_consistency_scale_bounds_the_largest_gram_eigenvalue() -> None:
    gen = torch.Generator().manual_seed(5)
    m = torch.randn(4, 3, 3, generator=gen, dtype=torch.float64)
    gram = m @ m.transpose(1, 2)  # PSD per-sample blocks
    top = float(torch.linalg.eigvalsh(gram).max())
    assert top > 1.0
    solver = _StubSolver(gram)
    scaled, s = feedback_consistency_scale(solver, None)  # type: ignore[arg-type]
    assert float(s) == pytest.approx(top, rel=1e-12)
    assert float(torch.linalg.eigvalsh(scaled).max()) == pytest.approx(1.0, rel=1e-12)
    assert [float(x) for x in solver.scales] == [pytest.approx(top)] * 2
    # two replicas: the same s on both, an upper bound within 2^(1/32) of the maximum
    _, s2 = feedback_consistency_scale(_StubSolver(gram), None,  # type: ignore[arg-type]
                                       _TwoEqualReplicas())
    assert float(s2) == pytest.approx(top * 2.0 ** (1 / 32), rel=1e-12)
    # below 1 nothing is scaled
    _, s3 = feedback_consistency_scale(_StubSolver(gram / (2 * top)), None)  # type: ignore[arg-type]
    assert float(s3) == 1.0
