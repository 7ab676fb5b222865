"""DGNOpt: the backward sweep, gains and update pass of the game a network defines.

``DGNOpt`` is the optimizer (see :mod:`dgn_dist.dgnopt.optimizer` for the call sequence);
``build_dgnopt(cfg, model)`` builds it from the typed config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from dgn_dist.dgnopt.optimizer import DGNOpt, check_options

if TYPE_CHECKING:
    from dgn_dist.config.schema import Config

__all__ = ["DGNOpt", "build_dgnopt", "check_config", "dgnopt_kwargs"]


def dgnopt_kwargs(cfg: Config) -> dict[str, object]:
    return {
        "lr": cfg.optim.lr, "info": cfg.game.info, "curvature": cfg.curvature.kind,
        "vxx": cfg.curvature.vxx, "rank": cfg.curvature.rank, "damping": cfg.curvature.damping,
        "ema_decay": cfg.curvature.ema_decay, "factor_interval": cfg.curvature.factor_interval,
        "inverse_interval": cfg.curvature.inverse_interval,
        "weight_decay": cfg.optim.weight_decay, "feedback_scale": cfg.game.feedback_scale,
        "alignment": cfg.game.alignment, "stats_every": max(cfg.logging.curvature_every, 0),
        "rescale": cfg.curvature.rescale, "chunk_mb": cfg.curvature.chunk_mb,
        "kl_clip": cfg.optim.dgnopt_kl_clip,
        "feedback_consistency": cfg.game.feedback_consistency,
    }


def check_config(cfg: Config) -> None:
    """Validate the DGNOpt settings of ``cfg`` before anything is built (``ValueError``)."""
    check_options(**dgnopt_kwargs(cfg))  # type: ignore[arg-type]


def build_dgnopt(cfg: Config, model: nn.Module) -> DGNOpt:
    """DGNOpt for ``model`` from ``cfg.optim``, ``cfg.curvature``, ``cfg.game``, ``cfg.logging``."""
    return DGNOpt(model, **dgnopt_kwargs(cfg))  # type: ignore[arg-type]
