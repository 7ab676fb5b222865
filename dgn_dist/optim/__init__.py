"""Optimizer registry: ``build_optimizer(cfg, model)`` for every ``optim.name``.

``sgd``, ``rmsprop``, ``adam`` are torch.optim; ``ekfac`` (:mod:`.ekfac`, ``curvature.kind``
``kfac`` or ``ekfac``) and ``emsa`` (:mod:`.emsa`) are ours; ``dgnopt`` is built by
``dgn_dist.dgnopt.build_dgnopt``. Every optimizer is driven by the ordinary loop
``loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()``.
Optimizers that report curvature have ``curvature_stats() -> dict[str, float]``.
"""

from __future__ import annotations

import importlib

from torch import nn
from torch.optim import Optimizer

from dgn_dist.config.schema import Config
from dgn_dist.optim.ekfac import EKFAC
from dgn_dist.optim.emsa import EMSA

OPTIMIZERS = ("sgd", "rmsprop", "adam", "ekfac", "emsa", "dgnopt")

__all__ = ["EKFAC", "EMSA", "OPTIMIZERS", "build_optimizer"]


def build_optimizer(cfg: Config, model: nn.Module) -> Optimizer:
    """The optimizer ``cfg.optim.name`` over ``model``'s trainable parameters.

    Raises:
        ValueError: unknown ``optim.name``, a curvature kind EKFAC cannot use, or ``dgnopt``
            when its module cannot be imported.
    """
    o, c = cfg.optim, cfg.curvature
    params = [p for p in model.parameters() if p.requires_grad]
    match o.name:
        case "sgd":
            from torch.optim import SGD
            return SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        case "rmsprop":
            from torch.optim import RMSprop
            return RMSprop(params, lr=o.lr, alpha=o.alpha, eps=o.eps,
                           weight_decay=o.weight_decay, momentum=o.momentum)
        case "adam":
            from torch.optim import Adam
            if len(o.betas) != 2:
                raise ValueError(f"optim.betas must have two values, got {o.betas}")
            return Adam(params, lr=o.lr, betas=(o.betas[0], o.betas[1]), eps=o.eps,
                        weight_decay=o.weight_decay)
        case "ekfac":
            if c.kind not in ("kfac", "ekfac"):
                raise ValueError(f"optim.name=ekfac needs curvature.kind 'kfac' or 'ekfac', got "
                                 f"{c.kind!r}")
            return EKFAC(model, lr=o.lr, damping=c.damping, ema_decay=c.ema_decay,
                         factor_interval=c.factor_interval, inverse_interval=c.inverse_interval,
                         weight_decay=o.weight_decay, momentum=o.momentum,
                         mode="kfac" if c.kind == "kfac" else "ekfac", kl_clip=o.ekfac_kl_clip)
        case "emsa":
            return EMSA(model, lr=o.lr, rho=o.emsa_rho, lbfgs_iters=o.emsa_lbfgs_iters,
                        weight_decay=o.weight_decay, line_search=o.emsa_line_search)
        case "dgnopt":
            try:
                build_dgnopt = importlib.import_module("dgn_dist.dgnopt").build_dgnopt
            except (ImportError, AttributeError) as err:
                raise ValueError(f"optim.name=dgnopt is unavailable: dgn_dist.dgnopt.build_dgnopt "
                                 f"cannot be imported ({err})") from err
            optimizer: Optimizer = build_dgnopt(cfg, model)
            return optimizer
        case _:
            raise ValueError(f"unknown optim.name {o.name!r}; choose one of "
                             f"{', '.join(OPTIMIZERS)}")
