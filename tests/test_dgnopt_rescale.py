"""Consistency rescaling of Kronecker curvature (dgn_dist.dgnopt.sweep.rescale_gains).

At batch 8, below the layer widths, the Kronecker model ``A ⊗ G`` lies below the batch
Gauss-Newton model along the step it proposes; rescaling makes the two agree along the step,
and changes nothing where the curvature is exact (the oracle tests run with rescaling on).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from dgn_dist.dgnopt import DGNOpt


def _mlp() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 10)).double()


def _head_step(rescale: bool, damping: float = 1e-3) -> tuple[float, float]:
    """One ``olne``/kfac step; returns (model quad, batch quad) along the head's step."""
    model = _mlp()
    before = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (8,), generator=g)
    lr = 0.5
    opt = DGNOpt(model, lr=lr, info="olne", curvature="kfac", vxx="empirical", rank=1,
                 damping=damping, ema_decay=0.0, rescale=rescale)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    head, old = model[2], before[2]
    k = {n: (getattr(old, n) - getattr(head, n)).detach() / lr for n in ("weight", "bias")}
    # Q_θ of the head: gradient of the mean loss (dense, independent of the optimizer)
    params = {n: getattr(old, n).detach().requires_grad_(True) for n in ("weight", "bias")}
    feats = before[1](before[0](x)).detach()

    def logits(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(old, p, (feats,))

    q = torch.autograd.grad(F.cross_entropy(logits(params), y), list(params.values()))
    model_quad = sum((qi * k[n]).sum() for qi, n in zip(q, ("weight", "bias"), strict=True))
    params = {n: p.detach() for n, p in params.items()}
    jac = jacrev(logits)(params)  # [B, C, *param]
    jk = sum(torch.einsum("bc...,...->bc", jac[n], k[n]) for n in k)
    # empirical terminal factors u_b = sqrt(B) * dloss/dlogits_b (DESIGN.md section 3)
    p = torch.softmax(logits(params).detach(), dim=1)
    u = ((p - F.one_hot(y, 10)) / 8 ** 0.5)[:, None, :]  # [B, 1, C]
    batch_quad = (torch.einsum("bic,bc->bi", u, jk) ** 2).sum() + damping * sum(
        (v ** 2).sum() for v in k.values())
    return float(model_quad), float(batch_quad)


def test_kronecker_model_underestimates_batch_curvature_without_rescaling() -> None:
    model_quad, batch_quad = _head_step(rescale=False)
    assert batch_quad > 1.5 * model_quad > 0


def test_rescaling_makes_models_agree_along_the_step() -> None:
    model_quad, batch_quad = _head_step(rescale=True)
    assert batch_quad == pytest.approx(model_quad, rel=1e-8)


def test_rescaling_is_off_for_identity_curvature() -> None:
    model = _mlp()
    opt = DGNOpt(model, lr=0.1, info="fne", curvature="identity", vxx="empirical",
                 damping=0.1, rescale=True)
    assert opt.rescale is False


def test_zero_step_keeps_scale_one() -> None:
    """With a zero gradient the step and both quadratic models are 0: the scale stays 1
    (not 0/0) and no parameter moves."""
    model = _mlp()
    before = copy.deepcopy(model)
    opt = DGNOpt(model, lr=0.5, info="fne", curvature="kfac", vxx="empirical", rank=1,
                 damping=1e-3, ema_decay=0.0, rescale=True)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loss = (model(x) * 0.0).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    scales = [s for solver in opt.solvers for s in solver.scales]
    assert scales and all(float(s) == 1.0 for s in scales)
    for p, q in zip(model.parameters(), before.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
