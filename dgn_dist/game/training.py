"""The game-theoretic applications of §5.2 inside the ordinary training loop.

The trainer calls four functions; everything else stays the plain loop
``model(x) → loss.backward() → opt.step()``:

* :func:`prepare_model` -- ``game.players_per_layer = N > 1`` splits every Linear/Conv2d
  into ``N`` fictitious players (eq. 16, :func:`~dgn_dist.game.fictitious.split_players`)
  before the optimizer is built. Training and evaluation run the split model (the same
  function up to float rounding); :func:`export_model` writes ``model_export.pt``, the
  collapsed state dict that loads into the plain model.
* :func:`build_training_optimizer` -- the optimizer, with:

  - **game-extended SGD** (Table 3, Fig. 7): ``optim.name = "sgd"`` with ``N > 1`` is DGNOpt
    with ``info = "gr"``, own curvature ``I`` and the Gauss-Newton cross blocks between the
    copies of each layer (:mod:`dgn_dist.dgnopt.extended`), feedback off. §5.2: "N = 1
    corresponds to the original method. For N > 1, we apply the transformation (16) then
    solve for the cooperative update as in DGNOpt"; with the feedback off the only change
    from SGD is the cooperative cross terms, and N = 1 is SGD exactly (Theorem 6). Other
    baselines have no game-extended form here (use ``optim.name = "dgnopt"``).
  - **the Fig. 6 ablation** (``game.ablation``): DGNOpt whose parameter curvature is the
    named baseline's preconditioner (sgd: ``I``; rmsprop/adam: their diagonal rules with
    ``optim.alpha``/``betas``/``eps``, :mod:`dgn_dist.dgnopt.baselines`; ekfac:
    ``[curvature]``), ``optim.lr`` as the baseline's learning rate, and the information
    structure of ``game.info`` (``fne``: η^C, ``gr``: η^C-CG, ``olne``: the baseline again).
  - **alignment strategies** (Table 4, Fig. 8, Alg. 2): ``game.alignment_strategy`` =
    ``random`` / ``adaptive`` builds one game per alignment inside DGNOpt and attaches an
    :class:`AlignmentDriver` that draws each step's alignment; ``adaptive`` (EXP3++) is
    rewarded with the accuracy on the next held-out validation batch after the step.
    ``fixed`` uses ``game.alignment`` throughout.
* :func:`game_scalars` -- TensorBoard ``bandit/arm<m>/prob`` and ``bandit/reward`` (mean
  reward since the last call).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import Dataset

from dgn_dist.config.loader import check_game_config
from dgn_dist.config.schema import Config
from dgn_dist.game.bandit import AlignmentStrategy, make_alignment_strategy
from dgn_dist.game.builder import ALIGNMENTS
from dgn_dist.game.fictitious import collapsed_state_dict, split_players

#: File name of the collapsed (plain-model) state dict written at the end of a run.
EXPORT_NAME = "model_export.pt"
#: Baselines that ``game.ablation`` can lift.
ABLATIONS: tuple[str, ...] = ("sgd", "rmsprop", "adam", "ekfac")


def prepare_model(cfg: Config, model: nn.Module) -> nn.Module:
    """``model`` split into ``game.players_per_layer`` fictitious players per layer (eq. 16);
    ``model`` itself when the setting is 1."""
    n = cfg.game.players_per_layer
    return split_players(model, n) if n > 1 else model


def export_model(model: nn.Module, path: Path) -> Path:
    """Write the collapsed state dict of ``model`` (the plain model's keys; fictitious players
    summed, eq. 16) atomically to ``path``; ``torch.load(weights_only=True)`` reads it."""
    from dgn_dist.checkpoint import atomic_write_bytes

    state = collapsed_state_dict(model)
    atomic_write_bytes(path, lambda handle: torch.save(state, handle))
    return path


def _ablation_kwargs(cfg: Config) -> dict[str, Any]:
    """DGNOpt keyword arguments of ``game.ablation`` (module docstring).

    The baseline's step is ``lr · P⁻¹ Q_θ``; the curvature "implied by the best-tuned setup"
    (App. E.1) is ``Q_θθ = P / lr``, so DGNOpt runs with ``gain_scale = lr`` and ``lr = 1``:
    ``k`` is then the baseline's step itself, and ``K = lr P⁻¹ Q_θx`` and
    ``V_x = Q_x − Q_xθ k`` describe the step actually taken. EKFAC's curvature is used as is
    for ``k`` (no :func:`~dgn_dist.dgnopt.sweep.rescale_gains`: with ``Q_θx := 0`` the run is
    the baseline), with its KL clipping of the step length (``optim.ekfac_kl_clip``).

    ``game.ablation_consistency`` (default on) scales the curvature of the closed-loop
    terms only -- ``K``, ``V_x``, ``V_xx`` -- up to the per-sample Gauss-Newton curvature
    (:func:`~dgn_dist.dgnopt.sweep.feedback_consistency_scale`): ``P / lr`` lies far below
    it at the DIGITS net's 320-input head (SGD: ``λ_max(Γ)`` up to 7; EKFAC with damping
    0.01: about 100), where the unscaled lift reverses the co-state of the earlier stages
    and over-corrects by ``1 − Γ`` (SGD diverged, EKFAC never trained). With the scale the
    lift needs nothing beyond the baseline's own Table-2 setup: ``curvature.damping`` (EKFAC's
    0.01) and ``game.feedback_scale = 1`` stay as they are (all Fig. 6 runs stable).
    """
    from dgn_dist.dgnopt.baselines import DiagRule

    o, kind = cfg.optim, cfg.game.ablation
    out: dict[str, Any] = {"lr": 1.0, "gain_scale": o.lr, "rescale": False,
                           "feedback_consistency": cfg.game.ablation_consistency}
    if kind == "sgd":
        return {**out, "curvature": "identity", "game_extended": cfg.game.info == "gr"}
    if kind == "rmsprop":
        return {**out, "curvature": "diag",
                "diag_rule": DiagRule("rmsprop", alpha=o.alpha, eps=o.eps)}
    if kind == "adam":
        return {**out, "curvature": "diag",
                "diag_rule": DiagRule("adam", betas=(o.betas[0], o.betas[1]), eps=o.eps)}
    return {**out, "curvature": "ekfac", "kl_clip": o.ekfac_kl_clip}


def build_training_optimizer(cfg: Config, model: nn.Module,
                             val: Dataset | None = None) -> Optimizer:
    """The optimizer of a run, with the §5.2 extensions of the module docstring.

    Args:
        cfg: the run's configuration.
        model: the (possibly split) model to train.
        val: held-out validation split; needed by ``game.alignment_strategy='adaptive'``.

    Raises:
        ValueError: an impossible combination of settings (the message says what to change).
    """
    from dgn_dist.dgnopt import DGNOpt, dgnopt_kwargs
    from dgn_dist.dgnopt.alignment import games_differ
    from dgn_dist.optim import build_optimizer

    check_game_config(cfg)
    g = cfg.game
    kwargs: dict[str, Any] = dgnopt_kwargs(cfg)
    if cfg.optim.name == "sgd" and g.players_per_layer > 1:
        kwargs.update(info="gr", curvature="identity", zero_feedback=True, game_extended=True)
        return DGNOpt(model, **kwargs)
    if cfg.optim.name != "dgnopt":
        return build_optimizer(cfg, model)
    if g.ablation != "none":
        kwargs.update(_ablation_kwargs(cfg))
    if g.alignment_strategy == "fixed":
        return DGNOpt(model, **kwargs)
    opt = DGNOpt(model, alignments=ALIGNMENTS, **kwargs)
    if not games_differ(opt.games):
        warnings.warn(f"game.alignment_strategy='{g.alignment_strategy}': every alignment of "
                      f"this model gives the same game (no residual block with a shortcut "
                      "player); use model.shortcut='conv' for the Table-4 nets",
                      RuntimeWarning, stacklevel=2)
    strategy = make_alignment_strategy(g.alignment_strategy, ALIGNMENTS, seed=cfg.run.seed,
                                       fixed_arm=g.alignment)
    reward = None
    if g.alignment_strategy == "adaptive":
        if val is None or len(val) == 0:  # type: ignore[arg-type]
            raise ValueError("game.alignment_strategy='adaptive' is rewarded with validation "
                             "accuracy (Alg. 2): set data.val_fraction > 0")
        reward = ValidationReward(model, val, g.reward_batch_size, seed=cfg.run.seed)
    opt.alignment_hook = AlignmentDriver(strategy, reward)
    return opt


class ValidationReward:
    """Accuracy in ``[0, 1]`` of ``model`` on the next validation batch (Alg. 2's reward).

    Batches of ``batch_size`` walk through a fixed permutation of ``dataset`` (seeded) and
    wrap around; the position is checkpointed, so a resumed run sees the same batches.
    """

    def __init__(self, model: nn.Module, dataset: Dataset, batch_size: int, seed: int) -> None:
        self.model, self.dataset = model, dataset
        size = len(dataset)  # type: ignore[arg-type]
        self.order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
        self.batch_size = min(batch_size, size)
        self.cursor = 0

    @torch.no_grad()
    def __call__(self) -> float:
        idx = [int(self.order[(self.cursor + i) % len(self.order)])
               for i in range(self.batch_size)]
        self.cursor = (self.cursor + self.batch_size) % len(self.order)
        items = [self.dataset[i] for i in idx]
        device = next(self.model.parameters()).device
        x = torch.stack([item[0] for item in items]).to(device)
        y = torch.as_tensor([int(item[1]) for item in items], device=device)
        was_training = self.model.training
        self.model.eval()
        try:
            correct = (self.model(x).argmax(dim=1) == y).sum().item()
        finally:
            self.model.train(was_training)
        return correct / len(idx)

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = int(state["cursor"])


class AlignmentDriver:
    """Alg. 2 around a DGNOpt step: draw an alignment, train, reward the arm.

    Attached as ``opt.alignment_hook``; DGNOpt calls :meth:`before_step` (sample an arm and
    ``opt.set_alignment``) and :meth:`after_step` (``strategy.update(arm, reward())`` when a
    reward is given) inside every ``step``, and saves :meth:`state_dict` with its own state.

    Args:
        strategy: a strategy of :mod:`dgn_dist.game.bandit` whose arms are alignments.
        reward: ``() -> float`` in ``[0, 1]`` after the step, or ``None`` (no bandit update,
            e.g. the random strategy).
    """

    def __init__(self, strategy: AlignmentStrategy,
                 reward: Callable[[], float] | None = None) -> None:
        self.strategy, self.reward = strategy, reward
        self.arm: int | None = None
        self.counts = [0] * strategy.num_arms
        self._rewards: list[float] = []

    def before_step(self, opt: Any) -> None:
        self.arm = self.strategy.sample()
        self.counts[self.arm] += 1
        opt.set_alignment(self.strategy.arm_name(self.arm))

    def after_step(self, opt: Any) -> None:
        del opt
        if self.reward is None or self.arm is None:
            return
        value = float(self.reward())
        self.strategy.update(self.arm, value)
        self._rewards.append(value)
        self.arm = None

    def scalars(self) -> dict[str, float]:
        """``bandit/arm<m>/prob`` (the distribution of the next draw), ``bandit/arm<m>/share``
        (fraction of steps so far) and ``bandit/reward`` (mean since the last call)."""
        out: dict[str, float] = {}
        total = max(sum(self.counts), 1)
        for m, p in enumerate(self.strategy.probabilities()):
            out[f"bandit/arm{m}/prob"] = p
            out[f"bandit/arm{m}/share"] = self.counts[m] / total
        if self._rewards:
            out["bandit/reward"] = math.fsum(self._rewards) / len(self._rewards)
            self._rewards = []
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy.state_dict(), "counts": list(self.counts),
                "reward": None if self.reward is None or not hasattr(self.reward, "state_dict")
                else self.reward.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strategy.load_state_dict(state["strategy"])
        self.counts = [int(c) for c in state["counts"]]
        if state.get("reward") is not None and hasattr(self.reward, "load_state_dict"):
            self.reward.load_state_dict(state["reward"])  # type: ignore[union-attr]


def game_scalars(optimizer: object) -> dict[str, float]:
    """The bandit scalars of an optimizer driven by an :class:`AlignmentDriver`, else ``{}``."""
    hook = getattr(optimizer, "alignment_hook", None)
    return hook.scalars() if isinstance(hook, AlignmentDriver) else {}
