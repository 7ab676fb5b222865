"""One Kronecker block's per-sample projections, kept from the EKFAC scaling pass to the Gram
matrix ``Γ_b`` of the same step (DESIGN.md section 3).

Three forms; the block keeps the smallest that serves:

* ``squares`` (rank 1): ``P_b²``, all that a rank-1 Gram matrix reads;
* ``proj``: ``P_{b,i} = Q_Gᵀ ψ_{b,i} Q_A``, ``[n, r, d_out, d_in]``;
* ``rows``: the rows already multiplied by their eigenbases
  (:class:`~dgn_dist.optim.kronecker.ExampleRows`, one per member). Deep convolutions have
  few locations ``L``: there ``a Q_A`` is the expensive part of a projection (``L d_in²`` per
  example) and ``P`` is assembled from the kept rows for ``L d_out d_in``, while the rows are
  ``d_out / L`` times smaller than ``P``.

Up to ``PROJ_CACHE`` elements per block; beyond that the Gram matrix recomputes them.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from dgn_dist.optim.kronecker import ExampleRows

#: Largest number of elements a Kronecker block keeps between the EKFAC scaling update and
#: the Gram matrix of the same step (else it recomputes its projections).
PROJ_CACHE = 1 << 27

Kind = Literal["squares", "proj", "rows"]
Kept = Tensor | list[ExampleRows]


def _length(item: Kept) -> int:
    return int(item.shape[0]) if isinstance(item, Tensor) else int(item[0].a.shape[0])


def _take(item: Kept, start: int, stop: int) -> Kept:
    if isinstance(item, Tensor):
        return item[start:stop]
    return [rows.take(start, stop) for rows in item]


def _join(items: list[Kept]) -> Kept:
    if len(items) == 1:
        return items[0]
    if isinstance(items[0], Tensor):
        return torch.cat([t for t in items if isinstance(t, Tensor)])
    members = list(zip(*[i for i in items if not isinstance(i, Tensor)], strict=True))
    return [ExampleRows(torch.cat([r.a for r in parts]), torch.cat([r.g for r in parts]),
                        parts[0].q_a, parts[0].q_g) for parts in members]


class ProjectionCache:
    """The chunks of one batch, kept in one form (module docstring)."""

    def __init__(self) -> None:
        self.kind: Kind | None = None
        self._chunks: list[tuple[int, Kept]] | None = None
        self._building: list[tuple[int, Kept]] | None = None
        self._building_kind: Kind | None = None

    def keep(self, start: int, stop: int, num: int, kind: Kind, item: Kept,
             per_example: int) -> None:
        """Add the chunk of examples ``[start, stop)`` of a batch of ``num``; the batch is
        kept once its last chunk arrives, if ``num · per_example`` fits ``PROJ_CACHE``."""
        if num * per_example > PROJ_CACHE:
            self._building = None
            return
        if start == 0:
            self._building, self._building_kind = [], kind
        if self._building is None or kind != self._building_kind:
            self._building = None
            return
        self._building.append((start, item))
        if stop == num:
            self.kind, self._chunks, self._building = kind, self._building, None

    def get(self, start: int, stop: int) -> tuple[Kind, Kept] | None:
        """The kept form of examples ``[start, stop)``, if the batch was kept."""
        if self._chunks is None or self.kind is None:
            return None
        parts = [_take(item, max(start - s, 0), stop - s) for s, item in self._chunks
                 if s < stop and s + _length(item) > start]
        return self.kind, _join(parts)

    def release(self) -> None:
        """Drop everything (end of the stage's sweep)."""
        self.kind, self._chunks, self._building, self._building_kind = None, None, None, None
