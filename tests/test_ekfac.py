"""EKFAC optimizer: first step against dense Kronecker solves, hooks, state, validation."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgn_dist.optim.ekfac import EKFAC
from dgn_dist.optim.kronecker import grad_to_matrix, input_rows, output_rows, weight_to_matrix

DT = torch.float64


def vec(mat: Tensor) -> Tensor:
    return mat.T.reshape(-1)


def linear_model() -> tuple[nn.Sequential, Tensor, Tensor]:
    return (nn.Sequential(nn.Linear(4, 3)).to(DT), torch.randn(8, 4, dtype=DT),
            torch.randint(0, 3, (8,)))


def conv_model() -> tuple[nn.Sequential, Tensor, Tensor]:
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(),
                          nn.Linear(27, 3))
    return model.to(DT), torch.randn(6, 2, 5, 5, dtype=DT), torch.randint(0, 3, (6,))


def expected_first_step(model: nn.Sequential, x: Tensor, y: Tensor, lr: float, damping: float,
                        mode: str, q_bases: dict[int, tuple[Tensor, Tensor]]) -> dict[int, Tensor]:
    """New ``[W | b]`` of each Kronecker layer by dense solves, from explicit statistics."""
    inputs, outputs, h = [], [], x
    for module in model:
        inputs.append(h)
        h = module(h)
        outputs.append(h)
    losses = F.cross_entropy(h, y, reduction="none")
    b = x.shape[0]
    layer_ids = [i for i, m in enumerate(model) if isinstance(m, nn.Linear | nn.Conv2d)]
    per_ex_out = torch.autograd.grad(losses.sum(), [outputs[i] for i in layer_ids],
                                     retain_graph=True)
    model.zero_grad()
    losses.mean().backward(retain_graph=True)
    grads = {i: grad_to_matrix(model[i]).clone() for i in layer_ids}
    per_ex_grads: dict[int, list[Tensor]] = {i: [] for i in layer_ids}
    for n in range(b):
        model.zero_grad()
        losses[n].backward(retain_graph=True)
        for i in layer_ids:
            per_ex_grads[i].append(grad_to_matrix(model[i]).clone())
    model.zero_grad()
    new = {}
    for i, gout in zip(layer_ids, per_ex_out, strict=True):
        module = model[i]
        a, g = input_rows(module, inputs[i].detach()), output_rows(module, gout)
        a_mat, g_mat = a.T @ a / a.shape[0], g.T @ g / b
        if mode == "kfac":
            dense = torch.kron(a_mat, g_mat)
        else:
            q_a, q_g = q_bases[i]
            torch.testing.assert_close(q_a @ torch.diag(torch.linalg.eigvalsh(a_mat)) @ q_a.T,
                                       a_mat)
            s = ((q_g.T @ torch.stack(per_ex_grads[i]) @ q_a) ** 2).mean(0)
            q = torch.kron(q_a, q_g)
            dense = q @ torch.diag(vec(s)) @ q.T
        step = torch.linalg.solve(dense + damping * torch.eye(dense.shape[0], dtype=DT),
                                  vec(grads[i]))
        old = weight_to_matrix(module.weight, module.bias).detach()
        new[i] = old - lr * step.reshape(old.shape[1], old.shape[0]).T
    return new


@pytest.mark.parametrize("build", [linear_model, conv_model])
@pytest.mark.parametrize("mode", ["kfac", "ekfac"])
def test_first_step_equals_dense_kronecker_solve(build, mode: str) -> None:
    model, x, y = build()
    reference, _, _ = build()
    reference.load_state_dict(model.state_dict())
    lr, damping = 0.3, 0.02
    # kfac: the first EMA update copies the batch; ekfac: decay 0 so S is the batch's too
    opt = EKFAC(model, lr=lr, damping=damping, ema_decay=0.95 if mode == "kfac" else 0.0,
                mode=mode)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    bases = {int(name): (f.q_a, f.q_g) for name, f in opt.factors.items()}
    expected = expected_first_step(reference, x, y, lr, damping, mode, bases)
    assert set(expected) == set(bases)
    for i, new in expected.items():
        got = weight_to_matrix(model[i].weight, model[i].bias).detach()
        torch.testing.assert_close(got, new, rtol=1e-8, atol=1e-10)


def relu_net(inplace: bool) -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(inplace=inplace), nn.Flatten(),
                         nn.Linear(4 * 16, 8), nn.ReLU(inplace=inplace), nn.Linear(8, 3))


def test_inplace_relu_matches_out_of_place() -> None:
    nets = [relu_net(True), relu_net(False)]
    opts = [EKFAC(net, lr=0.1, damping=1e-2, inverse_interval=2) for net in nets]
    x, y = torch.randn(10, 2, 4, 4), torch.randint(0, 3, (10,))
    for _ in range(3):
        for net, opt in zip(nets, opts, strict=True):
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert (nets[0][3](nets[0][2](torch.relu(nets[0][0](x)))) <= 0).any()  # ReLU clips units
    for p, q in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for f0, f1 in zip(opts[0].factors.values(), opts[1].factors.values(), strict=True):
        torch.testing.assert_close(f0.G, f1.G, rtol=0, atol=0)


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, batches: list) -> list[float]:
    losses = []
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_state_dict_round_trip_resumes_exactly() -> None:
    batches = [(torch.randn(6, 2, 4, 4), torch.randint(0, 3, (6,))) for _ in range(7)]
    kwargs = dict(lr=0.05, damping=1e-2, inverse_interval=2, momentum=0.9, weight_decay=1e-3)
    model_a = relu_net(True)
    opt_a = EKFAC(model_a, **kwargs)
    train_steps(model_a, opt_a, batches[:3])
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model_b = relu_net(True)
    model_b.load_state_dict(ckpt["model"])
    opt_b = EKFAC(model_b, **kwargs)
    opt_b.load_state_dict(ckpt["opt"])
    assert opt_b.steps == 3
    losses_a = train_steps(model_a, opt_a, batches[3:])
    losses_b = train_steps(model_b, opt_b, batches[3:])
    assert losses_a == losses_b
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="EKFAC state"):
        opt_b.load_state_dict(torch.optim.SGD(model_b.parameters(), lr=0.1).state_dict())


def test_curvature_stats_and_damping_setter() -> None:
    model = relu_net(False)
    opt = EKFAC(model, lr=0.1, damping=1e-3)
    assert opt.curvature_stats() == {}
    train_steps(model, opt, [(torch.randn(6, 2, 4, 4), torch.randint(0, 3, (6,)))])
    opt.damping = 0.5
    stats = opt.curvature_stats()
    expected = {f"curvature/{layer}/{key}" for layer in ("0", "3", "5")
                for key in ("A_eig_max", "A_eig_min", "A_cond", "G_eig_max", "G_eig_min",
                            "G_cond", "damping")}
    assert set(stats) == expected
    assert stats["curvature/3/damping"] == 0.5
    assert stats["curvature/0/A_eig_max"] >= stats["curvature/0/A_eig_min"] >= 0
    assert stats["curvature/0/A_cond"] >= 1.0
    with pytest.raises(ValueError, match="damping"):
        opt.damping = 0.0


def test_hooks_idle_in_eval_and_between_factor_updates() -> None:
    model = relu_net(False)
    opt = EKFAC(model, lr=0.1, mode="kfac", factor_interval=2)
    x, y = torch.randn(4, 2, 4, 4), torch.randint(0, 3, (4,))
    model.eval()
    model(x)
    assert all(not recs for recs in opt.capture.records.values())
    model.train()
    train_steps(model, opt, [(x, y)])
    model(x)  # step 1: no factor update due, so nothing is captured
    assert all(not recs for recs in opt.capture.records.values())


@pytest.mark.parametrize("kwargs,name", [
    (dict(lr=0.0), "lr"), (dict(damping=-1.0), "damping"), (dict(ema_decay=1.0), "ema_decay"),
    (dict(factor_interval=0), "factor_interval"), (dict(inverse_interval=1.5), "inverse_interval"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(momentum=1.0), "momentum"),
    (dict(mode="shampoo"), "mode"),
])
def test_bad_hyper_parameters(kwargs: dict, name: str) -> None:
    args = dict(lr=0.1) | kwargs
    with pytest.raises(ValueError, match=name):
        EKFAC(relu_net(False), **args)
    with pytest.raises(ValueError, match="no Linear or Conv2d"):
        EKFAC(nn.Sequential(nn.BatchNorm1d(3)), lr=0.1)


def test_trains_a_small_problem() -> None:
    torch.manual_seed(3)
    centers = torch.randn(3, 10) * 2
    y = torch.randint(0, 3, (64,))
    x = centers[y] + 0.5 * torch.randn(64, 10)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.BatchNorm1d(16), nn.Linear(16, 3))
    opt = EKFAC(model, lr=0.2, damping=1e-2, inverse_interval=5)
    losses = train_steps(model, opt, [(x, y)] * 25)
    assert losses[-1] < 0.2 * losses[0]


def test_kl_clip_scales_the_kronecker_step() -> None:
    """ν = min(1, sqrt(c / (lr² Σ <d, g>))) multiplies the preconditioned directions."""
    x, y = torch.randn(6, 2, 4, 4), torch.randint(0, 3, (6,))
    lr, clip = 0.5, 1e-4
    deltas, grads, opts = [], [], []
    for kl_clip in (0.0, clip):
        model = relu_net(False)
        before = [p.detach().clone() for p in model.parameters()]
        opt = EKFAC(model, lr=lr, damping=1e-2, kl_clip=kl_clip)
        train_steps(model, opt, [(x, y)])
        grads.append([p.grad.clone() for p in model.parameters()])
        deltas.append([b - p.detach() for b, p in zip(before, model.parameters(), strict=True)])
        opts.append(opt)
    vg = sum(float((d / lr * g).sum()) for d, g in zip(deltas[0], grads[0], strict=True))
    nu = opts[1].last_kl_scale
    assert opts[0].last_kl_scale == 1.0 and nu < 1.0
    assert nu == pytest.approx((clip / (lr ** 2 * vg)) ** 0.5, rel=1e-4)
    for d_plain, d_clip in zip(deltas[0], deltas[1], strict=True):
        torch.testing.assert_close(d_clip, nu * d_plain, rtol=1e-4, atol=1e-7)


def test_bfloat16_autocast_keeps_float32_factors() -> None:
    model = relu_net(True)
    opt = EKFAC(model, lr=0.1, damping=1e-2, kl_clip=1e-2)
    x, y = torch.randn(8, 2, 4, 4), torch.randint(0, 3, (8,))
    losses = []
    for _ in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    for factor in opt.factors.values():
        assert factor.A is not None and factor.A.dtype == torch.float32
        assert factor.q_g is not None and factor.q_g.dtype == torch.float32
    assert losses[-1] < losses[0]
