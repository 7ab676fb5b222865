"""Baseline preconditioners as DGNOpt curvature blocks (the Fig. 6 ablation, DESIGN.md §2.3).

App. E.1 lifts a best-tuned baseline to the closed-loop structure by running DGNOpt "with
its parameter curvature set to the precondition matrix implied by the best-tuned setup".
With ``Q_θx := 0`` (``info="olne"`` or ``zero_feedback``) the update is then the baseline's
own step (Theorem 6); with the feedback kept the two runs differ only by ``K δx``.

* :class:`TorchRmsBlock`: ``Q_θθ = diag(sqrt(v)) + ε`` with ``v ← α v + (1 − α) Q_θ²``,
  ``v_0 = 0`` -- exactly ``torch.optim.RMSprop`` (no momentum, not centred);
* :func:`kl_clip_scale`: EKFAC's KL clipping of the step length (Ba et al., 2017), part of
  the best-tuned EKFAC setup that ``game.ablation = "ekfac"`` lifts;
* :class:`AdamBlock`: ``Q_θθ = diag(sqrt(v̂)) + ε`` with Adam's bias-corrected second moment,
  and the open gain's right-hand side replaced by the bias-corrected first moment ``m̂``
  (Adam's momentum is part of the baseline's step, not of its preconditioner, so it enters
  ``k`` only; ``K δx`` uses ``Q_θθ`` alone) -- exactly ``torch.optim.Adam`` (no amsgrad).

Weight decay is the stage cost ``ℓ = wd/2 ‖θ‖²`` of the game: ``Q_θ`` already contains
``wd θ``, as torch's coupled ``weight_decay`` adds it to the gradient. The moments advance
once per step on the step's ``Q_θ`` whatever ``curvature.factor_interval`` is (they are the
baseline's rule, not amortised curvature).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dgn_dist.dgnopt.blocks import Block, Native, StageBatch
from dgn_dist.dgnopt.players import PlayerView

DIAG_RULES: tuple[str, ...] = ("rmsprop", "adam")


def kl_clip_scale(k: Sequence[Tensor], q_theta: Sequence[Tensor], clip: float, lr: float,
                  gain_scale: float) -> float:
    """``ν = min(1, sqrt(c / ((lr·gain)² Σ ⟨d, Q_θ⟩)))`` with ``d = k / gain`` the
    preconditioned direction -- :class:`dgn_dist.optim.EKFAC`'s rule for its step
    ``lr · ν · d``; 1 when the sum is not positive."""
    total = float(sum((kn.double() * qn.double()).sum() for kn, qn in
                      zip(k, q_theta, strict=True))) / gain_scale
    if total <= 0.0:
        return 1.0
    return min(1.0, (clip / ((lr * gain_scale) ** 2 * total)) ** 0.5)


@dataclass(frozen=True)
class DiagRule:
    """A baseline's diagonal preconditioner for ``curvature="diag"``.

    Attributes:
        kind: ``"rmsprop"`` or ``"adam"``.
        alpha: RMSprop smoothing constant (``optim.alpha``).
        betas: Adam's ``(β1, β2)`` (``optim.betas``).
        eps: the baseline's epsilon, added to ``sqrt(v)`` (``optim.eps``).
    """

    kind: str
    alpha: float = 0.99
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.kind not in DIAG_RULES:
            raise ValueError(f"DiagRule.kind must be one of {', '.join(DIAG_RULES)}; got "
                             f"{self.kind!r}")
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1); got {self.alpha}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1); got {self.betas}")
        if self.eps <= 0.0:
            raise ValueError(f"eps must be > 0; got {self.eps}")

    def block(self, member: int, view: PlayerView) -> Block:
        """The curvature block of one player under this rule."""
        if self.kind == "rmsprop":
            return TorchRmsBlock(member, view, self.alpha, self.eps)
        return AdamBlock(member, view, self.betas, self.eps)


class TorchRmsBlock(Block):
    """``diag(sqrt(v)) + ε``, ``v ← α v + (1 − α) Q_θ²`` from ``v = 0`` (torch RMSprop)."""

    def __init__(self, member: int, view: PlayerView, alpha: float, eps: float) -> None:
        super().__init__([member], [view])
        self.alpha, self.eps = alpha, eps
        self.v: Tensor | None = None

    def update(self, batch: StageBatch, decay: float, update_factors: bool,
               refresh: bool) -> None:
        q = batch.q_theta[self.members[0]]
        v = q.new_zeros(q.shape) if self.v is None else self.v
        self.v = v.mul(self.alpha).addcmul_(q, q, value=1.0 - self.alpha)

    def solve(self, rhs: Native) -> Native:
        if self.v is None:
            raise RuntimeError("TorchRmsBlock.solve before its first update")
        n = self.members[0]
        return {n: rhs[n] / (self.v.sqrt() + self.eps)}

    def state(self) -> dict[str, Tensor]:
        return {} if self.v is None else {"v": self.v}

    def load_state(self, state: dict[str, Tensor]) -> None:
        self.v = state.get("v")


class AdamBlock(Block):
    """Adam's ``diag(sqrt(v̂)) + ε`` with ``m̂`` as the open gain's right-hand side."""

    def __init__(self, member: int, view: PlayerView, betas: tuple[float, float],
                 eps: float) -> None:
        super().__init__([member], [view])
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.m: Tensor | None = None
        self.v: Tensor | None = None
        self.t = 0

    def update(self, batch: StageBatch, decay: float, update_factors: bool,
               refresh: bool) -> None:
        q = batch.q_theta[self.members[0]]
        m = q.new_zeros(q.shape) if self.m is None else self.m
        v = q.new_zeros(q.shape) if self.v is None else self.v
        self.m = m.mul(self.beta1).add_(q, alpha=1.0 - self.beta1)
        self.v = v.mul(self.beta2).addcmul_(q, q, value=1.0 - self.beta2)
        self.t += 1

    def _denominator(self) -> Tensor:
        if self.v is None or self.t == 0:
            raise RuntimeError("AdamBlock.solve before its first update")
        return (self.v / (1.0 - self.beta2 ** self.t)).sqrt() + self.eps

    def open_rhs(self, q_theta: Native) -> Native:
        assert self.m is not None, "AdamBlock.open_rhs before its first update"
        return {self.members[0]: self.m / (1.0 - self.beta1 ** self.t)}

    def solve(self, rhs: Native) -> Native:
        n = self.members[0]
        return {n: rhs[n] / self._denominator()}

    def state(self) -> dict[str, Tensor]:
        if self.m is None or self.v is None:
            return {}
        return {"m": self.m, "v": self.v, "t": torch.tensor(self.t)}

    def load_state(self, state: dict[str, Tensor]) -> None:
        self.m, self.v = state.get("m"), state.get("v")
        t = state.get("t")
        self.t = 0 if t is None else int(t)
