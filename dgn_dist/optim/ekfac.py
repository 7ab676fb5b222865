"""EKFAC (George et al., 2018): eigenvalue-corrected Kronecker-factored preconditioning.

Linear and Conv2d layers (``groups == 1``) are preconditioned with
:class:`~dgn_dist.optim.kronecker.KroneckerFactor`; every other parameter (BatchNorm affine
parameters, grouped convs, free parameters) takes a plain SGD step with the same learning
rate, weight decay and momentum.

Used as any PyTorch optimizer (``opt.zero_grad(); loss.backward(); opt.step()``): hooks
registered on the model in the constructor capture the layer inputs (forward hooks) and the
output gradients (tensor hooks on the outputs, so in-place activations after a layer are fine);
see :mod:`dgn_dist.optim.capture`. ``loss`` must be a mean over the ``B`` examples of the batch:
the captured output gradients are multiplied by ``B`` to give per-example gradients, the
convention of the factors in :mod:`dgn_dist.optim.kronecker`.

Per step ``k`` and layer: every ``factor_interval`` steps the EMA factors ``A, G`` are updated
(the first update copies the batch statistics); every ``inverse_interval`` steps (and at the
first opportunity) the eigenbases are recomputed; in ``ekfac`` mode the scaling ``S`` is
updated from the per-example projected gradients at every step (it restarts from
``λ_G λ_Aᵀ`` at each refresh). The update direction is ``(A ⊗ G + λI)⁻¹ (∇L + wd·θ)``
(``ekfac``: with ``S`` in place of ``λ_G λ_Aᵀ``): weight decay is an L2 term of the
objective, so it is preconditioned with the gradient. With ``kl_clip > 0`` the directions are
scaled by the KL-clipping factor ``ν`` (Ba et al., 2017); without it, small batches give huge
empirical-Fisher steps unless the damping is large. Then ``θ ← θ - lr · buf`` with the
momentum buffer ``buf ← momentum · buf + direction``. Before a layer's first factors exist
(no captured batch yet) its step is plain SGD.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from dgn_dist.optim.capture import CallRecord, LayerCapture
from dgn_dist.optim.kronecker import (
    KroneckerFactor,
    Mode,
    grad_to_matrix,
    input_rows,
    is_kronecker_layer,
    matrix_to_param_updates,
    output_rows,
    weight_and_bias,
    weight_to_matrix,
)


def kronecker_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{dotted name: module}`` of the trainable Linear / Conv2d (groups=1) layers."""
    return {name: m for name, m in model.named_modules()
            if is_kronecker_layer(m) and m.weight.requires_grad}


def _check(name: str, value: object, ok: bool, constraint: str) -> None:
    if not ok:
        raise ValueError(f"{name} must satisfy {constraint}, got {value!r}")


class EKFAC(torch.optim.Optimizer):
    """EKFAC / K-FAC optimizer over a model's Linear and Conv2d layers.

    Args:
        model: the model; hooks are registered on its Kronecker layers.
        lr: learning rate (> 0).
        damping: Tikhonov damping ``λ`` added to the Kronecker product (> 0); settable later
            through the ``damping`` attribute (e.g. a decaying schedule).
        ema_decay: EMA decay of ``A``, ``G`` and ``S``, in ``[0, 1)``.
        factor_interval: update ``A, G`` every this many steps (>= 1).
        inverse_interval: recompute the eigenbases every this many steps (>= 1).
        weight_decay: L2 coefficient (>= 0), preconditioned with the gradient.
        momentum: heavy-ball momentum in ``[0, 1)``.
        mode: ``"ekfac"`` (eigenvalue correction) or ``"kfac"``.
        kl_clip: KL clipping (Ba et al., 2017) when > 0: the Kronecker layers' directions are
            scaled by ``ν = min(1, sqrt(kl_clip / (lr² Σ <direction, gradient>)))``;
            ``last_kl_scale`` holds the last ``ν``. 0 (default) is George et al.'s plain step.
    """

    def __init__(self, model: nn.Module, lr: float, damping: float = 1e-3,
                 ema_decay: float = 0.95, factor_interval: int = 1, inverse_interval: int = 20,
                 weight_decay: float = 0.0, momentum: float = 0.0, mode: Mode = "ekfac",
                 kl_clip: float = 0.0) -> None:
        _check("lr", lr, lr > 0, "lr > 0")
        _check("damping", damping, damping > 0, "damping > 0")
        _check("ema_decay", ema_decay, 0 <= ema_decay < 1, "0 <= ema_decay < 1")
        for key, val in (("factor_interval", factor_interval),
                         ("inverse_interval", inverse_interval)):
            _check(key, val, isinstance(val, int) and val >= 1, "an integer >= 1")
        _check("weight_decay", weight_decay, weight_decay >= 0, "weight_decay >= 0")
        _check("momentum", momentum, 0 <= momentum < 1, "0 <= momentum < 1")
        _check("mode", mode, mode in ("kfac", "ekfac"), "mode in {'kfac', 'ekfac'}")
        _check("kl_clip", kl_clip, kl_clip >= 0, "kl_clip >= 0 (0 turns clipping off)")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no trainable parameters")
        self.layers = kronecker_layers(model)
        if not self.layers:
            raise ValueError("EKFAC found no Linear or Conv2d layer in the model; use a "
                             "first-order optimizer (sgd, adam) for this model")
        defaults = dict(lr=lr, damping=damping, weight_decay=weight_decay, momentum=momentum)
        super().__init__(params, defaults)
        self.ema_decay = ema_decay
        self.factor_interval = factor_interval
        self.inverse_interval = inverse_interval
        self.mode: Mode = mode
        self.kl_clip = kl_clip
        self.last_kl_scale = 1.0
        self.factors = {name: KroneckerFactor(mode) for name in self.layers}
        self.steps = 0
        self._layer_param_ids = {id(p) for m in self.layers.values() for p in m.parameters()}
        gate: Callable[[], bool] = self._needs_capture
        self.capture = LayerCapture(self.layers, enabled=gate)

    @property
    def damping(self) -> float:
        return float(self.param_groups[0]["damping"])

    @damping.setter
    def damping(self, value: float) -> None:
        _check("damping", value, value > 0, "damping > 0")
        for group in self.param_groups:
            group["damping"] = float(value)

    def _needs_capture(self) -> bool:
        return self.mode == "ekfac" or self.steps % self.factor_interval == 0

    def _rows(self, module: nn.Module, records: list[CallRecord]) -> tuple[Tensor, Tensor, int]:
        """Input rows, per-example output-gradient rows (``B ×`` captured) and ``B``."""
        a, g = [], []
        for r in records:
            assert r.grad_output is not None
            a.append(input_rows(module, r.inputs))
            g.append(output_rows(module, r.grad_output * r.batch_size))
        n = sum(r.batch_size for r in records)
        return torch.cat(a), torch.cat(g), n

    def _update_curvature(self, name: str, module: nn.Module) -> None:
        factor = self.factors[name]
        records = self.capture.complete(name)
        rows = self._rows(module, records) if records else None
        if rows is not None and self.steps % self.factor_interval == 0:
            factor.update(rows[0], rows[1], self.ema_decay, rows[2])
        if factor.A is not None and (not factor.has_eigenbasis
                                     or self.steps % self.inverse_interval == 0):
            factor.refresh_eigenbasis()
        if self.mode == "ekfac" and rows is not None and factor.has_eigenbasis:
            factor.update_scaling(rows[0], rows[1], self.ema_decay, rows[2])

    def _apply(self, param: Tensor, direction: Tensor, group: dict[str, Any]) -> None:
        if group["momentum"] > 0:
            state = self.state[param]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = direction.detach().clone()
            else:
                buf.mul_(group["momentum"]).add_(direction)
            direction = buf
        param.add_(direction, alpha=-group["lr"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """Update curvature from the captured batch, then take the preconditioned step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        wd = group["weight_decay"]
        directions: dict[str, Tensor] = {}
        vg: list[Tensor] = []  # <direction, gradient> per Kronecker layer, for KL clipping
        for name, module in self.layers.items():
            weight, bias = weight_and_bias(module)
            if weight.grad is None:
                continue
            self._update_curvature(name, module)
            grad = grad_to_matrix(module)
            if wd:
                grad = grad + wd * weight_to_matrix(weight, bias)
            factor = self.factors[name]
            directions[name] = factor.precondition(grad, group["damping"]) \
                if factor.has_eigenbasis else grad
            if self.kl_clip > 0:
                vg.append((directions[name] * grad).sum())
        nu = 1.0
        total = float(torch.stack(vg).sum()) if vg else 0.0  # one device sync per step
        if total > 0:
            nu = min(1.0, (self.kl_clip / (group["lr"] ** 2 * total)) ** 0.5)
        self.last_kl_scale = nu
        for name, direction in directions.items():
            module = self.layers[name]
            for param, upd in zip(module.parameters(),
                                  matrix_to_param_updates(module, direction * nu), strict=True):
                self._apply(param, upd, group)
        for group_ in self.param_groups:
            for param in group_["params"]:
                if id(param) in self._layer_param_ids or param.grad is None:
                    continue
                direction = param.grad
                if group_["weight_decay"]:
                    direction = direction.add(param, alpha=group_["weight_decay"])
                self._apply(param, direction, group_)
        self.capture.clear()
        self.steps += 1
        return loss

    def curvature_stats(self) -> dict[str, float]:
        """``curvature/<layer>/{A,G}_{eig_max,eig_min,cond}`` and ``.../damping`` per layer;
        ``update/kl_scale`` (the last step's KL-clipping ``ν``) when clipping is on."""
        out: dict[str, float] = {}
        for name, factor in self.factors.items():
            stats = factor.stats()
            if not stats:
                continue
            for key, value in stats.items():
                out[f"curvature/{name}/{key}"] = value
            out[f"curvature/{name}/damping"] = self.damping
        if self.kl_clip > 0:
            out["update/kl_scale"] = float(self.last_kl_scale)
        return out

    def curvature_eigenvalues(self) -> dict[str, Tensor]:
        """Eigenvalues of every layer's factors (``curvature/<layer>/{A,G}_eig``), from the
        last eigenbasis refresh, for TensorBoard histograms."""
        out: dict[str, Tensor] = {}
        for name, factor in self.factors.items():
            if factor.eig_a is not None and factor.eig_g is not None:
                out[f"curvature/{name}/A_eig"] = factor.eig_a.detach()
                out[f"curvature/{name}/G_eig"] = factor.eig_g.detach()
        return out

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus ``kronecker`` (per-layer factors) and ``ekfac_steps``."""
        state = super().state_dict()
        state["kronecker"] = {name: f.state_dict() for name, f in self.factors.items()}
        state["ekfac_steps"] = self.steps
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (factors, eigenbases, scalings, step counter)."""
        state = dict(state_dict)
        try:
            kron = state.pop("kronecker")
            steps = state.pop("ekfac_steps")
        except KeyError as err:
            raise ValueError(f"not an EKFAC state dict: missing {err}") from None
        if set(kron) != set(self.factors):
            raise ValueError(f"state holds layers {sorted(kron)}, the model has "
                             f"{sorted(self.factors)}; build the optimizer on the same model")
        super().load_state_dict(state)
        for name, factor in self.factors.items():
            factor.load_state_dict(kron[name], device=weight_and_bias(self.layers[name])[0].device)
        self.steps = int(steps)
