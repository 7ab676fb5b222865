"""EMSA (Li et al., 2017): per-layer minimisation of the augmented Hamiltonian (eq. 35-36).

Players are the model's Linear, Conv2d and BatchNorm modules (layer function ``f_t`` = the
module itself, evaluated with ``torch.func.functional_call``); any other parameter takes a
plain SGD step. Hooks (see :mod:`dgn_dist.optim.capture`) record, for each layer and batch of
``B`` examples, the input ``z_t``, a copy of the output ``z_{t+1}``, and the co-states in the
per-example convention (Li et al. average per-sample Hamiltonians)::

    p_{t+1} = B ∂L/∂z_{t+1}          (L the batch-mean loss; tensor hook on the output)
    p_t     = ∇_{z_t} (p_{t+1}ᵀ f_t(z_t, θ_old))   (this layer's share of B ∂L/∂z_t)

``p_t`` comes from a tensor hook on an alias of the layer input (so a skip connection's share
is excluded); for an input that does not require grad (the data) it is computed by one VJP
at the old parameters. With this sign convention the Hamiltonian
``H_t = (1/B) Σ_b p_{t+1,b}ᵀ f_t(z_{t,b}, θ)`` has ``∇_θ H_t = ∇_θ L`` at ``θ_old``, so
minimising it decreases the loss. EMSA minimises, per layer (eq. 35-36, with weight decay)::

    H^ρ(θ) = H_t(θ) + (ρ/2B) ‖z_{t+1} - f_t(z_t, θ)‖² + (ρ/2B) ‖p_t - ∇_{z_t} H̄_t(θ)‖²
             + (wd/2) ‖θ‖²,        H̄_t = Σ_b p_{t+1,b}ᵀ f_t(z_{t,b}, θ)

with ``torch.optim.LBFGS`` started at ``θ_old`` (``lbfgs_iters`` iterations, step ``lr``,
optional strong-Wolfe line search). At ``θ_old`` both penalties vanish, so they act as a
proximal term keeping the forward states and co-states of the pass feasible. All layers use
the same forward/backward pass. The captured batch is kept until the layer's next forward
call, so :meth:`EMSA.augmented_hamiltonian` can evaluate ``H^ρ`` after the step. ``H^ρ`` is
evaluated in the parameters' dtype (captured tensors from an autocast forward are upcast).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from dgn_dist.optim.capture import CallRecord, LayerCapture

PLAYER_TYPES = (nn.Linear, nn.Conv2d, nn.modules.batchnorm._BatchNorm)


def emsa_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{dotted name: module}`` of the trainable Linear, Conv2d and BatchNorm modules."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, PLAYER_TYPES)
            and any(p.requires_grad for p in m.parameters(recurse=False))}


@contextmanager
def _train_mode(module: nn.Module) -> Iterator[None]:
    """Evaluate ``f_t`` as it ran in the captured (training-mode) forward pass."""
    was = module.training
    module.training = True
    try:
        yield
    finally:
        module.training = was


def _param_dtype(module: nn.Module) -> torch.dtype:
    """The dtype ``H^ρ`` is evaluated in (captured tensors may be lower precision)."""
    return next(module.parameters()).dtype


def _check(name: str, value: object, ok: bool, constraint: str) -> None:
    if not ok:
        raise ValueError(f"{name} must satisfy {constraint}, got {value!r}")


class EMSA(torch.optim.Optimizer):
    """Extended method of successive approximations, one L-BFGS solve per layer and step.

    Args:
        model: the model; hooks are registered on its player modules.
        lr: L-BFGS step length (> 0; the initial step when ``line_search``).
        rho: feasibility penalty ``ρ`` of eq. 35 (>= 0).
        lbfgs_iters: L-BFGS iterations per layer and step (>= 1).
        weight_decay: L2 coefficient ``wd`` (>= 0).
        line_search: use L-BFGS's strong-Wolfe line search.
    """

    def __init__(self, model: nn.Module, lr: float, rho: float = 0.5, lbfgs_iters: int = 4,
                 weight_decay: float = 0.0, line_search: bool = False) -> None:
        _check("lr", lr, lr > 0, "lr > 0")
        _check("rho", rho, rho >= 0, "rho >= 0")
        _check("lbfgs_iters", lbfgs_iters, isinstance(lbfgs_iters, int) and lbfgs_iters >= 1,
               "an integer >= 1")
        _check("weight_decay", weight_decay, weight_decay >= 0, "weight_decay >= 0")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no trainable parameters")
        self.layers = emsa_layers(model)
        if not self.layers:
            raise ValueError("EMSA found no Linear, Conv2d or BatchNorm layer in the model")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.rho = rho
        self.lbfgs_iters = lbfgs_iters
        self.line_search = line_search
        self.steps = 0
        self._layer_param_ids = {id(p) for m in self.layers.values()
                                 for p in m.parameters(recurse=False)}
        self.capture = LayerCapture(self.layers, keep_output=True, grad_input=True)

    def _params(self, module: nn.Module) -> dict[str, Tensor]:
        return {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}

    def _call(self, module: nn.Module, theta: dict[str, Tensor], z: Tensor) -> Tensor:
        """``f_t(z, θ)``; buffers (BatchNorm running stats) are copies, never updated."""
        tensors: dict[str, Tensor] = {n: b.clone() for n, b in module.named_buffers(
            recurse=False)}
        tensors.update({n: p for n, p in module.named_parameters(recurse=False)})
        tensors.update(theta)
        with _train_mode(module), self.capture.paused():
            return functional_call(module, tensors, (z,))

    def _costate_in(self, module: nn.Module, record: CallRecord) -> Tensor:
        """``p_t``: the hooked input gradient, or ``∇_z (p_{t+1}ᵀ f(z, θ_old))`` (one VJP)."""
        scale = record.batch_size
        dtype = _param_dtype(module)
        if record.grad_input is not None:
            return record.grad_input.to(dtype) * scale
        assert record.grad_output is not None
        with torch.enable_grad():
            z = record.inputs.detach().to(dtype).requires_grad_(True)
            out = self._call(module, {}, z)
            (grad,) = torch.autograd.grad(out, z, record.grad_output.to(dtype) * scale)
        record.grad_input = grad.detach() / scale
        return grad.detach()

    def _hamiltonian(self, module: nn.Module, records: list[CallRecord],
                     theta: dict[str, Tensor], wd: float) -> Tensor:
        """``H^ρ(θ)`` of eq. 35 summed over the layer's recorded calls (differentiable)."""
        total = sum(wd / 2 * (t ** 2).sum() for t in theta.values()) if wd else 0.0
        dtype = _param_dtype(module)
        for record in records:
            assert record.grad_output is not None and record.output is not None
            b = record.batch_size
            p_next = record.grad_output.to(dtype) * b
            p_in = self._costate_in(module, record)
            z = record.inputs.detach().to(dtype).requires_grad_(True)
            out = self._call(module, theta, z)
            h_bar = (p_next * out).sum()
            term = h_bar + self.rho / 2 * ((record.output.to(dtype) - out) ** 2).sum()
            if self.rho:
                (grad_z,) = torch.autograd.grad(h_bar, z, create_graph=True)
                term = term + self.rho / 2 * ((p_in - grad_z) ** 2).sum()
            total = total + term / b
        assert isinstance(total, Tensor)
        return total

    def augmented_hamiltonian(self, name: str) -> float:
        """``H^ρ`` of layer ``name`` at its current parameters on the last captured batch."""
        records = self.capture.complete(name)
        if not records:
            raise ValueError(f"no captured batch for layer {name!r}: run a training-mode "
                             f"forward and backward first")
        module = self.layers[name]
        with torch.enable_grad():
            theta = {n: p.detach().requires_grad_(True) for n, p in self._params(module).items()}
            value = self._hamiltonian(module, records, theta,
                                      self.param_groups[0]["weight_decay"])
        return float(value.detach())

    def _solve_layer(self, module: nn.Module, records: list[CallRecord],
                     group: dict[str, Any]) -> None:
        params = self._params(module)
        theta = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
        lbfgs = torch.optim.LBFGS(list(theta.values()), lr=group["lr"],
                                  max_iter=self.lbfgs_iters,
                                  line_search_fn="strong_wolfe" if self.line_search else None)

        def closure() -> Tensor:
            lbfgs.zero_grad()
            value = self._hamiltonian(module, records, theta, group["weight_decay"])
            value.backward()
            return value

        with torch.enable_grad():
            lbfgs.step(closure)
        for n, p in params.items():
            p.copy_(theta[n].detach())

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """Minimise each layer's augmented Hamiltonian; SGD for the other parameters."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        for name, module in self.layers.items():
            records = self.capture.complete(name)
            if records:
                self._solve_layer(module, records, group)
        for group_ in self.param_groups:
            for param in group_["params"]:
                if id(param) in self._layer_param_ids or param.grad is None:
                    continue
                param.add_(param.grad.add(param, alpha=group_["weight_decay"]),
                           alpha=-group_["lr"])
        self.capture.mark_consumed()
        self.steps += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus ``emsa_steps`` (L-BFGS restarts every step)."""
        state = super().state_dict()
        state["emsa_steps"] = self.steps
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        state = dict(state_dict)
        if "emsa_steps" not in state:
            raise ValueError("not an EMSA state dict: missing 'emsa_steps'")
        self.steps = int(state.pop("emsa_steps"))
        super().load_state_dict(state)
