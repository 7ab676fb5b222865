"""EMSA: the augmented Hamiltonian (eq. 35) is feasible at θ_old and lowered by each step."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgn_dist.optim.emsa import EMSA


def bn_net() -> nn.Sequential:
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                         nn.Flatten(), nn.Linear(64, 3))


class ResidualNet(nn.Module):
    """``h = tanh(conv1(x)); out = conv2(h) + h``: conv2's input also feeds the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(48, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.conv1(x))
        return self.head((self.conv2(h) + h).flatten(1))


def backward(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Tensor:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    return loss.detach()


def batch() -> tuple[Tensor, Tensor]:
    return torch.randn(8, 2, 4, 4), torch.randint(0, 3, (8,))


@pytest.mark.parametrize("line_search", [False, True])
def test_step_lowers_each_layer_augmented_hamiltonian(line_search: bool) -> None:
    model = bn_net()
    wd = 1e-3
    opt = EMSA(model, lr=0.5, rho=0.5, lbfgs_iters=4, weight_decay=wd, line_search=line_search)
    x, y = batch()
    outputs: dict[str, Tensor] = {}
    handles = [m.register_forward_hook(
        lambda mod, inp, out, name=name: outputs.__setitem__(name, out.detach().clone()))
        for name, m in opt.layers.items()]
    out: dict[str, float] = {}
    logits = model(x)
    for h in handles:
        h.remove()
    loss = F.cross_entropy(logits, y)
    layer_outputs = list(outputs.items())
    opt.zero_grad()
    loss.backward()
    before = {name: opt.augmented_hamiltonian(name) for name in opt.layers}
    # at θ_old both penalties vanish: H^ρ = H_t = <∂L/∂z_{t+1}, z_{t+1}> + wd/2 |θ|²
    for name, z_next in layer_outputs:
        rec = opt.capture.complete(name)[0]
        out[name] = float((rec.grad_output * z_next).sum())
        l2 = sum(float((p.detach() ** 2).sum()) for p in opt.layers[name].parameters())
        assert before[name] == pytest.approx(out[name] + wd / 2 * l2, rel=1e-5, abs=1e-7)
    opt.step()
    after = {name: opt.augmented_hamiltonian(name) for name in opt.layers}
    assert set(before) == {"0", "1", "4"}
    for name in before:
        assert after[name] < before[name] - 1e-4, (name, before[name], after[name])
        assert len(opt.capture.records[name]) == 1  # the solve itself records nothing


def test_first_lbfgs_iteration_is_a_gradient_step() -> None:
    """Sign convention: ∇_θ H^ρ(θ_old) = ∇_θ L + wd θ, so one iteration is an SGD-like step."""
    model = bn_net()
    lr, wd = 0.3, 1e-2
    opt = EMSA(model, lr=lr, rho=0.5, lbfgs_iters=1, weight_decay=wd)
    backward(model, opt, *batch())
    old = {name: [(p.detach().clone(), p.grad.clone()) for p in m.parameters()]
           for name, m in opt.layers.items()}
    opt.step()
    for name, module in opt.layers.items():
        grads = [g + wd * p for p, g in old[name]]
        step = lr * min(1.0, 1.0 / float(sum(g.abs().sum() for g in grads)))
        for (p0, _), g, p in zip(old[name], grads, module.parameters(), strict=True):
            torch.testing.assert_close(p.detach(), p0 - step * g, rtol=1e-5, atol=1e-6)


def test_costate_excludes_skip_share_and_matches_vjp() -> None:
    model = ResidualNet()
    opt = EMSA(model, lr=0.1)
    x, y = batch()
    h = torch.tanh(model.conv1(x)).detach().requires_grad_(True)
    out = model.conv2(h) + h
    loss = F.cross_entropy(model.head(out.flatten(1)), y)
    (total,) = torch.autograd.grad(loss, h)
    backward(model, opt, x, y)
    rec = opt.capture.complete("conv2")[0]
    (own,) = torch.autograd.grad(model.conv2(h), h, rec.grad_output)
    assert rec.grad_input is not None
    torch.testing.assert_close(rec.grad_input, own)
    assert not torch.allclose(rec.grad_input, total)
    first = opt.capture.complete("conv1")[0]
    assert first.grad_input is None  # the data does not require grad: p_t comes from a VJP
    opt.augmented_hamiltonian("conv1")
    z = first.inputs.clone().requires_grad_(True)
    (vjp,) = torch.autograd.grad(model.conv1(z), z, first.grad_output)
    torch.testing.assert_close(first.grad_input, vjp)


@pytest.mark.parametrize("line_search", [False, True])
def test_few_steps_lower_training_loss(line_search: bool) -> None:
    torch.manual_seed(3)
    centers = torch.randn(3, 10) * 2
    y = torch.randint(0, 3, (64,))
    x = centers[y] + 0.5 * torch.randn(64, 10)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = EMSA(model, lr=0.5, rho=1.0, lbfgs_iters=4, line_search=line_search)
    losses = []
    for _ in range(10):
        losses.append(float(backward(model, opt, x, y)))
        opt.step()
    assert losses[-1] < 0.5 * losses[0]


def test_state_dict_round_trip() -> None:
    batches = [batch() for _ in range(5)]
    model_a = bn_net()
    opt_a = EMSA(model_a, lr=0.2, weight_decay=1e-3)
    for x, y in batches[:2]:
        backward(model_a, opt_a, x, y)
        opt_a.step()
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model_b = bn_net()
    model_b.load_state_dict(ckpt["model"])
    opt_b = EMSA(model_b, lr=0.2, weight_decay=1e-3)
    opt_b.load_state_dict(ckpt["opt"])
    assert opt_b.steps == 2
    for x, y in batches[2:]:
        for model, opt in ((model_a, opt_a), (model_b, opt_b)):
            backward(model, opt, x, y)
            opt.step()
    for p, q in zip(model_a.state_dict().values(), model_b.state_dict().values(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kwargs,name", [
    (dict(lr=-1.0), "lr"), (dict(rho=-0.1), "rho"), (dict(lbfgs_iters=0), "lbfgs_iters"),
    (dict(weight_decay=-1.0), "weight_decay"),
])
def test_bad_hyper_parameters(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        EMSA(bn_net(), **(dict(lr=0.1) | kwargs))
    with pytest.raises(ValueError, match="no captured batch"):
        EMSA(bn_net(), lr=0.1).augmented_hamiltonian("0")


def test_bfloat16_autocast_forward() -> None:
    """Captured bf16 activations are upcast to the parameters' dtype for the solve."""
    model = bn_net()
    opt = EMSA(model, lr=0.3)
    x, y = batch()
    losses = []
    for _ in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0]
