"""Validation of DGNOpt's hyper-parameters (shared by the optimizer and the config check)."""

from __future__ import annotations

from dgn_dist.dgnopt.gains import CURVATURES, INFOS
from dgn_dist.dgnopt.terminal import VXX_KINDS
from dgn_dist.game import ALIGNMENTS


def check_options(*, lr: float, info: str, curvature: str, vxx: str, rank: int,
                  damping: float, ema_decay: float, factor_interval: int,
                  inverse_interval: int, weight_decay: float, feedback_scale: float,
                  alignment: str, coop_iters: int = 20, coop_tol: float = 1e-8,
                  stats_every: int = 0, rescale: bool = True, chunk_mb: float = 0.0,
                  kl_clip: float = 0.0, feedback_consistency: bool = False) -> None:
    """Validate DGNOpt hyper-parameters; raises ``ValueError`` stating the constraint."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(msg)

    need(lr > 0, f"lr must be > 0; got {lr}")
    need(info in INFOS, f"info must be one of {', '.join(INFOS)}; got {info!r}")
    need(curvature in CURVATURES,
         f"curvature must be one of {', '.join(CURVATURES)}; got {curvature!r}")
    need(vxx in VXX_KINDS, f"vxx must be one of {', '.join(VXX_KINDS)}; got {vxx!r}")
    need(rank >= 1, f"rank must be >= 1; got {rank}")
    need(damping >= 0, f"damping must be >= 0; got {damping}")
    need(curvature == "identity" or damping > 0,
         f"damping must be > 0 for curvature={curvature!r} (the curvature can be singular)")
    need(0.0 <= ema_decay < 1.0, f"ema_decay must satisfy 0 <= ema_decay < 1; got {ema_decay}")
    need(factor_interval >= 1, f"factor_interval must be >= 1; got {factor_interval}")
    need(inverse_interval >= 1, f"inverse_interval must be >= 1; got {inverse_interval}")
    need(weight_decay >= 0, f"weight_decay must be >= 0; got {weight_decay}")
    need(feedback_scale >= 0, f"feedback_scale must be >= 0; got {feedback_scale}")
    need(alignment in ALIGNMENTS,
         f"alignment must be one of {', '.join(ALIGNMENTS)}; got {alignment!r}")
    need(not (info == "gr" and curvature == "diag"),
         "info='gr' needs a curvature with a cooperative form (identity, kfac or ekfac); "
         "curvature='diag' has none -- use info='fne' or a Kronecker curvature")
    need(coop_iters >= 0, f"coop_iters must be >= 0; got {coop_iters}")
    need(coop_tol >= 0, f"coop_tol must be >= 0; got {coop_tol}")
    need(stats_every >= 0, f"stats_every must be >= 0; got {stats_every}")
    need(chunk_mb >= 0, f"chunk_mb must be >= 0 (0 = auto); got {chunk_mb}")
    need(kl_clip >= 0, f"kl_clip must be >= 0 (0 = off); got {kl_clip}")
    need(isinstance(feedback_consistency, bool),
         f"feedback_consistency must be true or false; got {feedback_consistency!r}")
