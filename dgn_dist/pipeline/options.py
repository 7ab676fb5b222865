"""Options of the pipelined DGNOpt and how they are checked (DESIGN.md §4)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from dgn_dist.dgnopt.options import check_options

Mode = Literal["exact", "stale_k"]
MODES: tuple[str, ...] = ("exact", "stale_k")

#: DGNOpt keyword arguments the pipeline honours (with DGNOpt's defaults).
DEFAULTS: dict[str, Any] = {
    "lr": 0.1, "info": "fne", "curvature": "kfac", "vxx": "empirical", "rank": 1,
    "damping": 1e-3, "ema_decay": 0.95, "factor_interval": 1, "inverse_interval": 20,
    "weight_decay": 0.0, "feedback_scale": 1.0, "alignment": "second", "zero_cross": False,
    "zero_feedback": False, "coop_iters": 20, "coop_tol": 1e-8, "stats_every": 0,
    "rescale": True, "chunk_mb": 0.0,
}
#: DGNOpt features the pipeline does not implement (most need the whole game on one rank),
#: with the value that leaves them off; any other value is rejected with pp > 1.
UNSUPPORTED: dict[str, Any] = {
    "alignments": None, "game": None, "game_extended": False, "diag_rule": None,
    "gain_scale": 1.0, "kl_clip": 0.0, "feedback_consistency": False}


def _is_off(value: Any, off: Any) -> bool:
    """``value`` leaves a feature off: ``None``, or ``off`` itself (a bool only as a bool,
    since ``True == 1.0`` would pass ``gain_scale``'s neutral value)."""
    if value is None:
        return True
    if isinstance(off, bool) or isinstance(value, bool):
        return value is off
    return off is not None and value == off


@dataclass(frozen=True)
class PipelineOptions:
    """DGNOpt hyper-parameters of a pipelined run (see :class:`dgn_dist.dgnopt.DGNOpt`)."""

    lr: float
    info: str
    curvature: str
    vxx: str
    rank: int
    damping: float
    ema_decay: float
    factor_interval: int
    inverse_interval: int
    weight_decay: float
    feedback_scale: float
    alignment: str
    zero_cross: bool
    zero_feedback: bool
    coop_iters: int
    coop_tol: float
    stats_every: int
    rescale: bool
    chunk_mb: float

    @property
    def feedback(self) -> bool:
        """``Q_θx`` is kept (``fne`` / ``gr`` without ``zero_feedback``)."""
        return self.info != "olne" and not self.zero_feedback

    @property
    def use_factors(self) -> bool:
        """The ``V_xx`` factors travel (Kronecker curvature or feedback)."""
        return self.curvature in ("kfac", "ekfac") or self.feedback

    @property
    def rescaled(self) -> bool:
        return self.rescale and self.curvature in ("kfac", "ekfac")


def make_options(kwargs: Mapping[str, Any]) -> PipelineOptions:
    """Check DGNOpt keyword arguments for the pipeline.

    Raises:
        ValueError: an unknown or unsupported argument, or an invalid value (the message
            names it and says what to change).
    """
    bad = [k for k in kwargs if k in UNSUPPORTED and not _is_off(kwargs[k], UNSUPPORTED[k])]
    if bad:
        raise ValueError(f"DGNOpt options {bad} are not supported with pipeline parallelism "
                         "(the pipelined sweep does not implement them; most need the whole "
                         "game on one rank): turn them off or use parallel.pp=1")
    unknown = [k for k in kwargs if k not in DEFAULTS and k not in UNSUPPORTED]
    if unknown:
        raise ValueError(f"unknown DGNOpt options {unknown}; valid: {', '.join(DEFAULTS)}")
    merged = {**DEFAULTS, **{k: v for k, v in kwargs.items() if k in DEFAULTS}}
    check_options(**{k: merged[k] for k in DEFAULTS if k not in ("zero_cross", "zero_feedback")})
    return PipelineOptions(**merged)


def check_mode(mode: str, micro_batches: int) -> None:
    """Validate ``parallel.pipeline_mode`` and ``parallel.micro_batches``.

    Raises:
        ValueError: with the valid values.
    """
    if mode not in MODES:
        raise ValueError(f"parallel.pipeline_mode must be one of {', '.join(MODES)}; got "
                         f"{mode!r}")
    if not isinstance(micro_batches, int) or isinstance(micro_batches, bool) \
            or micro_batches < 1:
        raise ValueError(f"parallel.micro_batches must be a positive integer; got "
                         f"{micro_batches!r}")
