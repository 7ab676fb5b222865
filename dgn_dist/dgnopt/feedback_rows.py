"""One Kronecker block's input rows in its eigenbasis, kept from the sweep's Gram matrix to the
update pass's feedback solve of the same step (DESIGN.md §2.2; Alg. 1 line 10).

The feedback term of a Kronecker player solves ``(A ⊗ G + λ)⁻¹ vec(M)`` with
``M = Q_θx δX = Σ_rows δ aᵀ`` (``δ`` the cotangent of ``Σ_i u_i <u_i, J_x δX>`` at the
player's output, ``a`` its input rows at the OLD trajectory). In the eigenbasis
``Q_Gᵀ M Q_A = (δ Q_G)ᵀ (a Q_A)``, and the sweep's ``Γ_b`` already formed ``a Q_A`` for every
example (:func:`~dgn_dist.optim.kronecker.project_rows`: deep convolutions with few locations
project their rows, ``L d_in²`` per example). Kept, they replace the ``d_out d_in²`` product
``M Q_A`` of the solve by ``rows · d_out · d_in`` -- the cost of the weight gradient autograd
would otherwise form for ``M``. At ResNet-18's layer4 (``d_in = 4608``, 1024 rows at batch 64)
that is the larger of a solve's two ``[512, 4608] @ [4608, 4608]`` rotations.

A block keeps them only where they are no larger than its ``Q_A`` (``rows <= d_in``) and only
while the basis is the one the update pass solves in (``q_a`` unchanged: an eigenbasis
refresh between the streamed Gram matrix and the update voids them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dgn_dist.dgnopt.stage_batch import StageBatch
from dgn_dist.optim.kronecker import ExampleRows


class ProjectedInputs:
    """``a Q_A`` of one block's members over one step's batch (module docstring)."""

    def __init__(self) -> None:
        self.examples = 0  # the step's batch size; 0: keep nothing
        self.rows: dict[int, list[Tensor]] = {}  # member -> [examples * locs, d_in] pieces
        self.count = 0  # examples kept so far
        self._basis: tuple[Tensor, int] | None = None
        self._batch: StageBatch | None = None  # dedupe: chunks of this batch already kept
        self._starts: set[int] = set()

    def arm(self, examples: int) -> None:
        """Start a step of ``examples`` samples (``0``: keep nothing this step)."""
        self.clear()
        self.examples = examples

    def clear(self) -> None:
        self.rows, self.count, self._basis = {}, 0, None
        self.end_batch()

    def end_batch(self) -> None:
        """The batch's projections are done (its Gram matrix or stream step ended)."""
        self._batch, self._starts = None, set()

    def add(self, batch: StageBatch, start: int, members: Sequence[int],
            projected: Sequence[ExampleRows], q_a: Tensor) -> None:
        """Keep the members' projected input rows of samples ``[start, ...)`` of ``batch``
        (once per chunk: the EKFAC scaling and ``Γ`` may both project the same chunk)."""
        if not self.examples or any(p.q_a is not None for p in projected):
            return  # not armed, or this block projects its per-sample gradients instead
        num, _, locs, width = projected[0].a.shape
        if locs * self.examples > width:
            return  # larger than Q_A: recomputing M Q_A in the update is the better deal
        if self._basis is None or self._basis[0] is not q_a or self._basis[1] != q_a._version:
            self.clear()  # first chunk, or the basis changed since (a refresh)
            self._basis = (q_a, q_a._version)
        if batch is self._batch and start in self._starts:
            return
        if batch is not self._batch:
            self._batch, self._starts = batch, set()
        self._starts.add(start)
        for n, p in zip(members, projected, strict=True):
            self.rows.setdefault(n, []).append(p.a.reshape(num * locs, width))
        self.count += num

    def take(self, examples: int, q_a: Tensor | None) -> dict[int, Tensor] | None:
        """The kept rows by member, if they cover ``examples`` samples in the basis ``q_a``
        (else ``None``); either way the block keeps nothing after."""
        ok = (q_a is not None and self._basis is not None and self.count == examples
              and self._basis[0] is q_a and self._basis[1] == q_a._version)
        rows = {n: torch.cat(parts) if len(parts) > 1 else parts[0]
                for n, parts in self.rows.items()} if ok else None
        self.arm(0)
        return rows
