"""Alignment strategies for residual blocks (paper §5.2, App. E.1, Alg. 2-3).

The same residual block admits several games: its shortcut aligned with the block's first
or second layer (Fig. 8a). Alg. 2 picks an alignment (an *arm*) per iteration, trains one
DGNOpt step with the game of that alignment, and rewards the arm with the accuracy on a
held-out validation batch. Three strategies share one interface:

* :class:`FixedAlignment`: always the same arm;
* :class:`RandomAlignment`: uniform per iteration;
* :class:`Exp3PlusPlus`: the adaptive EXP3++ bandit (Alg. 3; Seldin & Slivkins, 2014).

Interface: ``sample() -> int`` (the arm for this iteration), ``update(arm, reward)`` with a
reward in ``[0, 1]``, ``probabilities() -> list[float]`` (the distribution ``sample`` draws
from now), ``arms`` (names, e.g. ``("first", "second")``), ``state_dict()`` /
``load_state_dict()`` holding only primitives and tensors (checkpoints load with
``torch.load(weights_only=True)``). Sampling uses the strategy's own ``torch.Generator``
(seeded, its state checkpointed), so runs are reproducible and never touch the global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch

from dgn_dist.game.builder import ALIGNMENTS

StrategyKind = Literal["fixed", "random", "adaptive"]
STRATEGY_KINDS: tuple[str, ...] = ("fixed", "random", "adaptive")


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    return value


def _check_float(name: str, value: object, *, positive: bool, hint: str) -> float:
    bound = "> 0" if positive else ">= 0"
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number < 0.0 or (positive and number == 0.0):
        raise ValueError(f"{name} must be a finite number {bound} ({hint}); got {value!r}")
    return number


def _arm_names(num_arms: int, arms: Sequence[str] | None) -> tuple[str, ...]:
    if arms is None:
        return tuple(str(m) for m in range(num_arms))
    names = tuple(arms)
    if len(names) != num_arms or len(set(names)) != len(names) or not all(
            isinstance(a, str) for a in names):
        raise ValueError(f"arms must be {num_arms} distinct names (one per arm); got {arms!r}")
    return names


class _Strategy:
    """Shared plumbing: arm names, argument checks, the generator and the last reward."""

    kind: str = ""

    def __init__(self, num_arms: int, seed: int, arms: Sequence[str] | None) -> None:
        self.num_arms = _check_int("num_arms", num_arms, 1)
        _check_int("seed", seed, 0)
        self.arms = _arm_names(num_arms, arms)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self.rounds = 0  # completed update() calls
        self.last_reward = float("nan")

    def probabilities(self) -> list[float]:  # pragma: no cover - overridden
        raise TypeError(f"{type(self).__name__} must override probabilities()")

    def sample(self) -> int:
        """Draw this iteration's arm from :meth:`probabilities` with the own generator."""
        probs = self.probabilities()
        u = float(torch.rand((), generator=self.generator, dtype=torch.float64))
        cumulative = 0.0
        for arm, p in enumerate(probs):
            cumulative += p
            if u < cumulative:
                return arm
        # u fell above the rounded total: the last arm with positive probability.
        return max(m for m, p in enumerate(probs) if p > 0.0)

    def arm_name(self, arm: int) -> str:
        """The name of arm ``arm`` (e.g. the alignment ``"second"``)."""
        self._check_arm(arm)
        return self.arms[arm]

    def _check_arm(self, arm: int) -> None:
        if isinstance(arm, bool) or not isinstance(arm, int) or not 0 <= arm < self.num_arms:
            raise ValueError(f"arm must be an integer in [0, {self.num_arms - 1}] "
                             f"({', '.join(self.arms)}); got {arm!r}")

    def _check_update(self, arm: int, reward: float) -> float:
        self._check_arm(arm)
        r = float(reward)
        if not 0.0 <= r <= 1.0:  # also rejects NaN
            raise ValueError(f"reward must be a number in [0, 1] (e.g. validation accuracy); "
                             f"got {reward!r}")
        return r

    def update(self, arm: int, reward: float) -> None:
        """Record the reward of the arm played this iteration (checked, otherwise unused)."""
        self.last_reward = self._check_update(arm, reward)
        self.rounds += 1

    def state_dict(self) -> dict[str, Any]:
        """Primitives and tensors only (``torch.load(weights_only=True)`` safe)."""
        return {"kind": self.kind, "num_arms": self.num_arms, "arms": list(self.arms),
                "rounds": self.rounds, "last_reward": self.last_reward,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; sampling then continues exactly where it stopped.

        Raises:
            ValueError: the state is of another strategy kind or another set of arms.
        """
        if state.get("kind") != self.kind or state.get("num_arms") != self.num_arms or tuple(
                state.get("arms", ())) != self.arms:
            raise ValueError(
                f"state is for a {state.get('kind')!r} strategy over arms {state.get('arms')!r}; "
                f"this is a {self.kind!r} strategy over {list(self.arms)!r}: build the strategy "
                "with the checkpoint's kind and arms")
        self.rounds = int(state["rounds"])
        self.last_reward = float(state["last_reward"])
        self.generator.set_state(state["generator"])


class FixedAlignment(_Strategy):
    """Always the arm ``arm`` (Table 4, "fixed").

    Args:
        num_arms: number of arms ``M`` >= 1.
        arm: the arm played, an index or a name from ``arms``.
        arms: arm names (default ``"0" … "M-1"``).
    """

    kind = "fixed"

    def __init__(self, num_arms: int, arm: int | str = 0, arms: Sequence[str] | None = None,
                 seed: int = 0) -> None:
        super().__init__(num_arms, seed, arms)
        if isinstance(arm, str):
            if arm not in self.arms:
                raise ValueError(f"arm must be one of {', '.join(self.arms)}; got {arm!r}")
            arm = self.arms.index(arm)
        self._check_arm(arm)
        self.arm = arm

    def probabilities(self) -> list[float]:
        return [1.0 if m == self.arm else 0.0 for m in range(self.num_arms)]

    def sample(self) -> int:
        return self.arm

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "arm": self.arm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.arm = int(state["arm"])


class RandomAlignment(_Strategy):
    """A uniformly random arm at every iteration (Table 4, "random").

    Args:
        num_arms: number of arms ``M`` >= 1.
        seed: seed of the own generator.
        arms: arm names (default ``"0" … "M-1"``).
    """

    kind = "random"

    def __init__(self, num_arms: int, seed: int = 0, arms: Sequence[str] | None = None) -> None:
        super().__init__(num_arms, seed, arms)

    def probabilities(self) -> list[float]:
        return [1.0 / self.num_arms] * self.num_arms


class Exp3PlusPlus(_Strategy):
    """EXP3++ (Alg. 3; Seldin & Slivkins, "One Practical Algorithm for Both Stochastic and
    Adversarial Bandits", ICML 2014, Algorithm 1 with the parameters of their Theorems 1, 3).

    Round ``k = 1, 2, …`` with ``L_k(m)`` the importance-weighted cumulative loss of arm ``m``
    over rounds ``1 … k−1`` (``L_1 = 0``):

    * ``β_k = η_k = beta · sqrt(ln M / (k M))`` (``beta = 1/2`` in the paper: ``η_t = β_t``
      of SS14 Thm. 1; Alg. 3's ``½ sqrt(ln M / (kM))``);
    * gap estimate ``Δ̂_k(m) = min{1, (L_k(m) − min_m' L_k(m')) / (k−1)}`` (SS14 Thm. 3;
      ``Δ̂ = 0`` before the first update);
    * ``ξ_k(m) = c (ln k)² / (k Δ̂_k(m)²)`` (SS14 Thm. 3, ``c = 18`` there), ``ξ = ∞``
      when ``Δ̂_k(m) = 0`` (the empirically best arm);
    * exploration ``ε_k(m) = min{1/(2M), β_k, ξ_k(m)}``;
    * ``ρ_k(m) ∝ exp(−η_k L_k(m))`` and ``ρ̃_k(m) = (1 − Σ_m' ε_k(m')) ρ_k(m) + ε_k(m)``,
      the distribution :meth:`sample` draws from; hence ``ρ̃_k(m) >= ε_k(m)``;
    * :meth:`update` with reward ``r`` of the played arm ``m``: loss ``ℓ = (1 − r) / ρ̃_k(m)``,
      ``L_{k+1}(m) = L_k(m) + ℓ``, ``k ← k + 1``.

    Args:
        num_arms: number of arms ``M`` >= 1 (alignments).
        seed: seed of the own generator.
        c: gap-exploration constant of ``ξ``, >= 0 (18 as in SS14's Theorem 3).
        beta: scale of ``β_k = η_k``, > 0 (1/2 as in the paper).
        arms: arm names (default ``"0" … "M-1"``).

    Raises:
        ValueError: an argument out of range (the message names it and its valid values).
    """

    kind = "adaptive"

    def __init__(self, num_arms: int, seed: int = 0, c: float = 18.0, beta: float = 0.5,
                 arms: Sequence[str] | None = None) -> None:
        super().__init__(num_arms, seed, arms)
        self.c = _check_float("c", c, positive=False, hint="SS14 use 18")
        self.beta = _check_float("beta", beta, positive=True, hint="the paper uses 0.5")
        self.cum_loss = [0.0] * self.num_arms  # L_k(m)
        self.pulls = [0] * self.num_arms

    @property
    def k(self) -> int:
        """The current round ``k`` (1-based): the next :meth:`sample` is round ``k``."""
        return self.rounds + 1

    def learning_rate(self) -> float:
        """``η_k = β_k = beta · sqrt(ln M / (k M))``."""
        m = self.num_arms
        return self.beta * math.sqrt(math.log(m) / (self.k * m))

    def gaps(self) -> list[float]:
        """Empirical gaps ``Δ̂_k(m) = min{1, (L_k(m) − min L_k) / (k−1)}`` (0 at ``k = 1``)."""
        if self.rounds == 0:
            return [0.0] * self.num_arms
        best = min(self.cum_loss)
        return [min(1.0, (loss - best) / self.rounds) for loss in self.cum_loss]

    def exploration(self) -> list[float]:
        """``ε_k(m) = min{1/(2M), β_k, ξ_k(m)}``, the floor of :meth:`probabilities`."""
        k, m = self.k, self.num_arms
        cap = min(1.0 / (2 * m), self.learning_rate())
        out = []
        for gap in self.gaps():
            xi = math.inf if gap <= 0.0 else self.c * math.log(k) ** 2 / (k * gap * gap)
            out.append(min(cap, xi))
        return out

    def weights(self) -> list[float]:
        """``ρ_k(m) = exp(−η_k L_k(m)) / Σ_m' exp(−η_k L_k(m'))`` (shifted by ``min L``)."""
        eta, best = self.learning_rate(), min(self.cum_loss)
        raw = [math.exp(-eta * (loss - best)) for loss in self.cum_loss]
        total = math.fsum(raw)
        return [w / total for w in raw]

    def probabilities(self) -> list[float]:
        """``ρ̃_k(m) = (1 − Σ ε_k) ρ_k(m) + ε_k(m)``: what :meth:`sample` draws from."""
        eps = self.exploration()
        keep = 1.0 - math.fsum(eps)
        return [keep * rho + e for rho, e in zip(self.weights(), eps, strict=True)]

    def update(self, arm: int, reward: float) -> None:
        """Importance-weighted loss of the played arm: ``L(m) += (1 − r) / ρ̃_k(m)``."""
        r = self._check_update(arm, reward)
        p = self.probabilities()[arm]
        if p <= 0.0:
            raise ValueError(f"arm {arm} has probability 0 this round, so it cannot have been "
                             "sampled; update only the arm that sample() returned")
        self.cum_loss[arm] += (1.0 - r) / p
        self.pulls[arm] += 1
        self.last_reward = r
        self.rounds += 1

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "c": self.c, "beta": self.beta,
                "cum_loss": list(self.cum_loss), "pulls": list(self.pulls)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.c = float(state["c"])
        self.beta = float(state["beta"])
        self.cum_loss = [float(v) for v in state["cum_loss"]]
        self.pulls = [int(v) for v in state["pulls"]]


AlignmentStrategy = FixedAlignment | RandomAlignment | Exp3PlusPlus


def make_alignment_strategy(kind: str, arms: Sequence[str] = ALIGNMENTS, seed: int = 0, *,
                            fixed_arm: int | str = 0, c: float = 18.0,
                            beta: float = 0.5) -> AlignmentStrategy:
    """Build an alignment strategy of Table 4.

    Args:
        kind: ``"fixed"`` (always ``fixed_arm``), ``"random"`` (uniform per iteration) or
            ``"adaptive"`` (EXP3++ rewarded with validation accuracy, Alg. 2-3).
        arms: arm names; the default is the residual alignments ``("first", "second")``.
        seed: seed of the strategy's own generator.
        fixed_arm: the arm of ``"fixed"`` (index or name, e.g. ``cfg.game.alignment``).
        c: EXP3++ gap-exploration constant (``"adaptive"`` only).
        beta: EXP3++ learning-rate scale (``"adaptive"`` only).

    Raises:
        ValueError: unknown ``kind`` or an invalid argument of the strategy.
    """
    names = tuple(arms)
    if kind == "fixed":
        return FixedAlignment(len(names), fixed_arm, names, seed)
    if kind == "random":
        return RandomAlignment(len(names), seed, names)
    if kind == "adaptive":
        return Exp3PlusPlus(len(names), seed, c=c, beta=beta, arms=names)
    raise ValueError(f"kind must be one of {', '.join(STRATEGY_KINDS)}; got {kind!r}")
