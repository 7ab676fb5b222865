"""Game-extended SGD: own curvature ``I``, Gauss-Newton cross blocks between the fictitious
copies of one layer (paper §5.2, eq. 16; DESIGN.md §3).

The ``N`` copies of a layer split by :func:`dgn_dist.game.split_players` share the layer's
input and add into its output, so every copy has the same Gauss-Newton block
``F = F_θᵀ V_xx F_θ`` with every other copy. Game-extended SGD keeps these cross blocks
``P_uv = F`` and replaces the own blocks by ``I``; the joint matrix of the copies is

    M = I_N ⊗ I + (11ᵀ − I_N) ⊗ F.

Its mean mode (the same vector for every copy) has ``M = I + (N − 1) F``, so a right-hand side
``r`` that is the same for all copies solves to ``(I + (N − 1) F)⁻¹ r`` per copy, and the
layer moves by ``N (I + (N − 1) F)⁻¹ g`` -- SGD at ``N = 1``, a natural-gradient-like step as
``N`` grows. ``F`` is the Kronecker factorisation ``A ⊗ G`` of the layer (DESIGN.md §3: exact
for ``B = 1``, ``r = 1`` and a Linear layer), kept as an EMA and eigendecomposed on the
``inverse_interval`` schedule; the mean-mode solve is exact in its eigenbasis.

Every right-hand side of this game is the same for all copies: the copies start equal
(``θ/N`` each), see the same gradient, the same ``ψ = F_θᵀ u`` and the same ``Q_θx δx``, and
therefore stay equal. Differences between copies (float rounding only) would see
``(I − F)⁻¹``, which is indefinite once ``F`` has an eigenvalue above 1; they are passed
through with the own curvature ``I`` instead, which keeps the solve bounded and leaves
every symmetric right-hand side exact.

Only copies of one layer are coupled. Different layers of a stage (e.g. a block's second
conv and its shortcut conv) stay uncoupled, ``P_uv = 0``, as under plain ``identity``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dgn_dist.dgnopt.blocks import (
    Block,
    FactorBlock,
    IdentityBlock,
    Native,
    StageBatch,
)
from dgn_dist.dgnopt.factor_stats import kron_stats
from dgn_dist.dgnopt.players import PlayerView
from dgn_dist.dgnopt.reduction import Stat
from dgn_dist.game.core import Stage
from dgn_dist.game.fictitious import FictitiousLayer
from dgn_dist.optim.kronecker import KroneckerFactor


def copy_groups(stage: Stage, views: Sequence[PlayerView]) -> list[list[int]]:
    """Indices of ``views`` grouped by the :class:`FictitiousLayer` their module belongs to;
    a player that is no fictitious copy is a group of its own. Order follows ``views``."""
    owner: dict[int, int] = {}
    for module in stage.modules():
        if isinstance(module, FictitiousLayer):
            for copy in module.players:
                owner[id(copy)] = id(module)
    groups: dict[int, list[int]] = {}
    for n, view in enumerate(views):
        key = owner.get(id(view.module), id(view.module)) if view.kron else id(view.module)
        groups.setdefault(key, []).append(n)
    return list(groups.values())


def extended_identity_blocks(stage: Stage, views: Sequence[PlayerView]) -> list[Block]:
    """Blocks of ``curvature="identity"`` with the copies' cross blocks kept (module doc)."""
    blocks: list[Block] = []
    for members in copy_groups(stage, views):
        if len(members) > 1:
            blocks.append(CopyCoupledBlock(members, [views[n] for n in members]))
        else:
            blocks.extend(IdentityBlock([n], [views[n]]) for n in members)
    return blocks


class CopyCoupledBlock(FactorBlock):
    """``I_N ⊗ I + (11ᵀ − I_N) ⊗ (A ⊗ G)`` for ``N >= 2`` copies of one Kronecker layer."""

    def __init__(self, members: Sequence[int], views: Sequence[PlayerView]) -> None:
        if len(members) < 2:
            raise ValueError(f"CopyCoupledBlock needs at least two copies; got {len(members)}")
        if not all(v.kron for v in views):
            raise ValueError("CopyCoupledBlock couples Kronecker (Linear/Conv2d) copies only; "
                             f"got {[v.name for v in views]}")
        super().__init__(members, views)
        self.factor = KroneckerFactor("kfac")

    def batch_stats(self, batch: StageBatch, update_factors: bool) -> dict[str, Stat]:
        """``A`` (mean over rows) and ``G`` (sum over rows) of the layer, when due."""
        if not (update_factors or self.factor.A is None):
            return {}
        n = self.members[0]  # all copies see the same input and output-side rows
        a, g = batch.a[n], batch.g[n]
        if a is None or g is None:
            raise RuntimeError("game-extended curvature needs the factor pass (g rows)")
        return kron_stats(a, g)

    def update(self, batch: StageBatch, decay: float, update_factors: bool,
               refresh: bool, stats: dict[str, Tensor] | None = None) -> None:
        """Fold ``stats`` (default: this replica's :meth:`batch_stats`) in and refresh."""
        self.fold_stats(batch, decay, update_factors, refresh, stats)

    def solve(self, rhs: Native) -> Native:
        copies = len(self.members)
        mean = torch.stack([rhs[n] for n in self.members]).mean(0)
        # (I + (N−1) F)⁻¹ r = (F + I/(N−1))⁻¹ r / (N−1), exact in the eigenbasis of A ⊗ G.
        c = float(copies - 1)
        shared = self.factor.precondition(mean, 1.0 / c) / c
        return {n: shared + (rhs[n] - mean) for n in self.members}
