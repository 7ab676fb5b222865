"""What the backward sweep measured at one stage, and lazy per-sample gradients of it.

:class:`StageBatch` holds a stage's ``Q_θ``, input rows and output-side rows
(DESIGN.md section 3); :class:`PsiChunk` builds the per-sample gradients
``ψ_{b,i} = F_θᵀ u_{b,i}`` of a range of samples on demand.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor

from dgn_dist.dgnopt.players import PlayerView


@dataclass
class StageBatch:
    """What the sweep measured at one stage (indices are the stage's solver players).

    Attributes:
        num: samples ``B``.
        rank: factors per sample ``r``.
        q_theta: ``Q_θ`` per player, native form.
        a: Kronecker players: input rows ``[B L, d_in]``; diagonal players: ``x̂ [B, C, ...]``.
        g: output-side vectors of the ``V_xx`` factors (``None`` without a factor pass):
            Kronecker ``[B r L, d_out]``, diagonal ``[B r, C, ...]``.
    """

    num: int
    rank: int
    q_theta: list[Tensor]
    a: list[Tensor | None]
    g: list[Tensor | None]

    def psi(self, view: PlayerView, n: int, start: int, stop: int) -> Tensor:
        """Per-sample gradients of player ``n`` for samples ``[start, stop)``:
        ``[(stop - start) r, *native]``."""
        a, g = self.a[n], self.g[n]
        if a is None or g is None:
            raise RuntimeError(f"player {view.name}: per-sample gradients need the factor pass")
        r, num = self.rank, stop - start
        if view.kron:
            locs = a.shape[0] // self.num
            return view.per_sample(num, r, a[start * locs:stop * locs],
                                   g[start * r * locs:stop * r * locs])
        return view.per_sample(num, r, a[start:stop], g[start * r:stop * r])


class PsiChunk(Mapping[int, Tensor]):
    """Per-sample gradients ``ψ`` of samples ``[start, stop)``, built lazily per player.

    A ``Native`` mapping (player index -> ``[(stop - start) r, *native]``) whose entries are
    computed on first access; Kronecker blocks read ``batch``, ``start`` and ``stop`` instead
    and project the rows straight into their eigenbasis (:meth:`KronBlock.projected`).
    """

    def __init__(self, batch: StageBatch, views: Sequence[PlayerView], members: Sequence[int],
                 start: int, stop: int) -> None:
        self.batch, self.views, self.start, self.stop = batch, views, start, stop
        self._members = list(members)
        self._cache: dict[int, Tensor] = {}

    def __getitem__(self, n: int) -> Tensor:
        if n not in self._members:
            raise KeyError(n)
        if n not in self._cache:
            self._cache[n] = self.batch.psi(self.views[n], n, self.start, self.stop)
        return self._cache[n]

    def __iter__(self) -> Iterator[int]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)
