"""What a skipped DGNOpt step does to the hyper-parameters (issue "Bad input").

A step whose loss gradient, curvature statistics, gain or update is not finite changes no
parameter; the damping ``λ`` is multiplied by :data:`DAMPING_BUMP` so that the next step is
more conservative. The damping stops at :data:`MAX_DAMPING`: a step skipped at that damping
means that the run has diverged (the steps are already negligible), and
:class:`TrainingDiverged` ends it with what to change instead of skipping forever (a diverged
run used to reach ``λ = inf``).
"""

from __future__ import annotations

import warnings
from typing import Any

#: Damping is multiplied by this factor when a step is skipped as non-finite.
DAMPING_BUMP = 10.0
#: The largest damping a skip raises it to (from the default 1e-3: eleven skips).
MAX_DAMPING = 1e8


class TrainingDiverged(RuntimeError):
    """A step was skipped with the damping already at :data:`MAX_DAMPING`."""


def skip_step(group: dict[str, Any], reason: str, who: str = "DGNOpt") -> None:
    """Record a skipped step in the param ``group`` and raise its damping (module docstring).

    Raises:
        TrainingDiverged: the damping was already at :data:`MAX_DAMPING`.
    """
    step = group["dgn_step"]
    if group["damping"] >= MAX_DAMPING:
        raise TrainingDiverged(
            f"{who} skipped step {step} ({reason}) with the damping already at its cap "
            f"{MAX_DAMPING:g} after {group['skipped']} skipped steps: the run has diverged. "
            "Restart from a checkpoint with a lower optim.lr or a larger curvature.damping "
            "(small batches need more damping, README)")
    group["damping"] = min(max(group["damping"], 1e-8) * DAMPING_BUMP, MAX_DAMPING)
    group["skipped"] += 1
    warnings.warn(f"{who} skipped step {step}: {reason}; damping raised to "
                  f"{group['damping']:.3g}", RuntimeWarning, stacklevel=4)
