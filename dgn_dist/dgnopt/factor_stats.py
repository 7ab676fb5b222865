"""The batch statistics of a Kronecker factor pair (DESIGN.md section 3).

``A = mean_rows a aᵀ`` over the input rows and ``G = Σ_rows g gᵀ`` over the output-side rows,
in the statistics dtype. ``A`` needs only the forward pass (the inputs of the layer), so the
pipeline can add it up while the micro-batches go forward (:mod:`dgn_dist.dgnopt.streamed`);
``G`` needs the factor pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dgn_dist.dgnopt.reduction import Stat
from dgn_dist.optim.kronecker import gram, stat_dtype


def joint_rows(rows: Sequence[Tensor]) -> Tensor:
    """Input rows of several players side by side (no copy for one player)."""
    return rows[0] if len(rows) == 1 else torch.cat(list(rows), dim=1)


def input_stat(a: Tensor, block_widths: Sequence[int] = ()) -> Stat:
    """``A = mean_rows a aᵀ``; with two or more ``block_widths`` the cross blocks of ``A``
    between those column groups are zeroed (Theorem 6, first bullet)."""
    dt = stat_dtype(a.dtype)
    a_stat = gram(a.to(dt)).div_(a.shape[0])  # a fresh product: no second d x d buffer
    if len(block_widths) > 1:
        mask = torch.block_diag(*[torch.ones(w, w, dtype=dt, device=a.device)
                                  for w in block_widths])
        a_stat = a_stat * mask
    return Stat(a_stat, mean=True, symmetric=True)


def output_stat(g: Tensor) -> Stat:
    """``G = Σ_rows g gᵀ``."""
    dt = stat_dtype(g.dtype)
    return Stat(gram(g.to(dt)), mean=False, symmetric=True)


def kron_stats(a: Tensor, g: Tensor, block_widths: Sequence[int] = ()) -> dict[str, Stat]:
    """Both statistics: ``{"A": input_stat(a), "G": output_stat(g)}``."""
    return {"A": input_stat(a, block_widths), "G": output_stat(g)}
