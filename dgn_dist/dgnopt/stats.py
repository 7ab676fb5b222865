"""Curvature, value-function and update statistics of DGNOpt (TensorBoard scalars).

Tags are namespaced (issue 3, item 5):

* ``curvature/<player>/{A,G}_{eig_max,eig_min,cond}`` and ``curvature/<player>/damping``;
* ``value/<stage>/{Vx_norm,Vxx_trace,Vxx_eff_rank,clipped_frac}`` for the value function at
  the stage input (``value/terminal/...`` for ``V^T``); ``Vxx_eff_rank`` is the participation
  ratio ``tr(V_xx)² / ‖V_xx‖_F²`` of the factorised ``V_xx`` (per-sample blocks);
* ``update/<player>/{open_norm,feedback_norm,feedback_ratio}``: ``‖lr k‖``, ``‖lr s K δx‖``
  and their ratio;
* ``coop/<stage>/cross_ratio``: ``‖P_uv l‖ / ‖P_u‖`` of the cooperative open-gain solve.

Eigenvalue histograms ``curvature/<player>/{A,G}_eig`` come from
:meth:`~dgn_dist.dgnopt.optimizer.DGNOpt.curvature_eigenvalues` (the last eigenbasis refresh),
written by the trainer every ``logging.hist_every`` steps.

Recording happens only on steps the optimizer was asked to record (``stats_every``); values are
kept as 0-d tensors and converted to floats only when :func:`to_floats` is called, so recording
adds no device synchronisation to the step.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from dgn_dist.game.core import State


def tag(name: str) -> str:
    """A TensorBoard-safe tag component (``block1:2`` -> ``block1_2``)."""
    return re.sub(r"[^\w.\-]", "_", name) or "_"


def value_stats(v_x: State, factors: State | None) -> dict[str, Tensor]:
    """``Vx_norm``, ``Vxx_trace`` and ``Vxx_eff_rank`` of one value function."""
    out = {"Vx_norm": torch.sqrt(sum((v.double() ** 2).sum() for v in v_x))}  # type: ignore[arg-type]
    if factors:
        b, r = factors[0].shape[:2]
        flat = torch.cat([u.reshape(b, r, -1).double() for u in factors], dim=2)
        gram = flat @ flat.transpose(1, 2)  # same non-zero spectrum as U_bᵀ U_b
        trace = gram.diagonal(dim1=1, dim2=2).sum()
        out["Vxx_trace"] = trace
        out["Vxx_eff_rank"] = trace ** 2 / (gram ** 2).sum().clamp_min(1e-300)
    return out


def to_floats(recorded: dict[str, Tensor]) -> dict[str, float]:
    """Convert recorded 0-d tensors to floats (one synchronisation)."""
    if not recorded:
        return {}
    keys = list(recorded)
    values = torch.stack([recorded[k].detach().double().reshape(()) for k in keys]).cpu()
    return dict(zip(keys, values.tolist(), strict=False))
