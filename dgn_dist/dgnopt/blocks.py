"""Curvature blocks: the pieces of one stage's parameter curvature ``Q_θθ`` (DESIGN.md §3).

A block owns one or more players of a stage and solves ``Q_block x = rhs`` exactly for the
matrix it represents (damping included):

* :class:`IdentityBlock`  ``Q = I`` (Theorem 6: with ``Q_θx = 0`` this is SGD);
* :class:`RmsDiagBlock`   ``Q = diag(sqrt(EMA(Q_θ ⊙ Q_θ))) + λ`` (eq. 13, RMSprop-like);
* :class:`GNDiagBlock`    ``Q = diag(EMA(Σ_{b,i} ψ_{b,i}²)) + λ`` -- the exact diagonal of
  ``F_θᵀ V_xx F_θ``; BatchNorm players under ``kfac`` / ``ekfac``;
* :class:`KronBlock`      ``Q = A ⊗ G + λ I`` (``ekfac``: eigenvalue corrected) for one
  Linear/Conv2d player, or for several players adding into ONE output (same output group):
  the joint-input factorisation ``E[x xᵀ] ⊗ E[g gᵀ]`` with ``x`` the concatenated input rows;
* :class:`~dgn_dist.dgnopt.coop.CoopPairBlock` (in ``coop.py``) two such groups writing
  SEPARATE outputs (eq. 27):
  ``Q = [[P_uu, A_uv ⊗ B_uv], [A_vu ⊗ B_vu, P_vv]]``, solved with the Schur form of eq. 11
  (``l = P_vv⁻¹ P_v``, ``k̃_u = P̃_uu⁻¹ (P_u − P_uv l)``), ``P̃_uu`` inverted by conjugate
  gradients preconditioned with Prop. 5's ``(Ã_uu ⊗ B̃_uu + λ)⁻¹`` (eq. 14), then
  ``k̃_v = P_vv⁻¹ (P_v − P_vu k̃_u)``. With ``coop_iters = 0`` this is the paper's eq. 15.

Batch statistics (DESIGN.md §3): with ``B`` samples, ``L`` rows per sample and the ``V_xx``
factors pulled back to the layer output as ``g``, ``A = mean_rows a aᵀ`` and
``G = Σ_rows g gᵀ`` (the factors already carry the ``1/B`` of ``φ``), so ``A ⊗ G`` equals the
dense ``F_θᵀ V_xx F_θ`` when ``B = 1``, ``r = 1`` and the layer is Linear. In
:mod:`dgn_dist.optim.kronecker` terms that is ``num_examples = 1`` for ``A``/``G`` and
``B · projected_sq_grads(..., B)`` for the EKFAC scaling (computed here from the true
per-sample gradients ``ψ``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from dgn_dist.dgnopt.dots import rows_dot, sample_inner
from dgn_dist.dgnopt.factor_stats import input_stat, joint_rows, kron_stats, output_stat
from dgn_dist.dgnopt.feedback_rows import ProjectedInputs
from dgn_dist.dgnopt.players import PlayerView
from dgn_dist.dgnopt.proj_cache import Kept, Kind, ProjectionCache
from dgn_dist.dgnopt.reduction import Stat
from dgn_dist.dgnopt.stage_batch import PsiChunk, StageBatch
from dgn_dist.optim.kronecker import (
    ExampleRows,
    KroneckerFactor,
    Mode,
    assemble_sum,
    eigen_solve_projected,
    project_rows,
)

Native = dict[int, Tensor]
#: Per-sample gradients ``ψ`` by player: a ``Native`` dict or a lazy :class:`PsiChunk`.
PsiRows = Mapping[int, Tensor]


def _ema(old: Tensor | None, new: Tensor, decay: float) -> Tensor:
    return new.clone() if old is None else old.mul(decay).add_(new, alpha=1.0 - decay)


def _batch_dot(x: Tensor, y: Tensor, lead: int) -> Tensor:
    """Inner products over all but the first ``lead`` dims."""
    return (x * y).reshape(*x.shape[:lead], -1).sum(-1)


class Block:
    """Base class: ``members`` are stage-solver player indices, ``damping`` is set per step."""

    needs_psi = False
    _acc: Tensor | None = None  # per-sample sums of this step (blocks with needs_psi)

    def __init__(self, members: Sequence[int], views: Sequence[PlayerView]) -> None:
        self.members = list(members)
        self.views = list(views)
        self.damping = 0.0

    def update(self, batch: StageBatch, decay: float, update_factors: bool,
               refresh: bool) -> None:
        """Fold this step's statistics in (before any per-sample statistics)."""

    def psi_due(self, update_factors: bool) -> bool:
        """Whether this step's :meth:`update` leaves per-sample statistics due."""
        return update_factors and self.needs_psi

    def batch_stats(self, batch: StageBatch, update_factors: bool) -> dict[str, Stat]:
        """This step's batch statistics that :meth:`update` folds in, for a data-parallel
        reduction first (:meth:`StageSolver.update`); blocks that accept them take the
        reduced values as ``update(..., stats=...)``. Empty: nothing to reduce."""
        del batch, update_factors
        return {}

    def factors(self) -> list[KroneckerFactor]:
        """The Kronecker factors whose eigendecompositions this block refreshes."""
        return []

    def psi_accumulators(self) -> list[Tensor]:
        """This step's per-sample sums (before :meth:`end_psi_stats`), reduced in place."""
        return []

    def psi_stats(self, psis: PsiRows) -> None:
        """Accumulate per-sample statistics of one chunk (only when ``needs_psi``)."""

    def end_psi_stats(self, decay: float) -> None:
        """Close the per-sample statistics of this step."""

    def reset_psi_stats(self) -> None:
        """Forget per-sample sums of a step that was abandoned before they were folded."""
        self._acc = None

    def solve(self, rhs: Native) -> Native:
        raise TypeError(f"{type(self).__name__} must implement solve")

    def open_rhs(self, q_theta: Native) -> Native:
        """The right-hand side of the open gain ``k`` for this block's members: ``Q_θ``
        itself (a baseline block may substitute e.g. Adam's first moment)."""
        return {n: q_theta[n] for n in self.members}

    def state(self) -> dict[str, Tensor]:
        return {}

    def load_state(self, state: dict[str, Tensor]) -> None:
        del state

    def player_stats(self) -> dict[str, dict[str, float]]:
        return {}


class IdentityBlock(Block):
    """``Q_θθ = I``: no damping, no statistics."""

    def solve(self, rhs: Native) -> Native:
        return {n: rhs[n] for n in self.members}


class RmsDiagBlock(Block):
    """``diag(sqrt(EMA(Q_θ ⊙ Q_θ))) + λ`` for one player (eq. 13)."""

    def __init__(self, member: int, view: PlayerView) -> None:
        super().__init__([member], [view])
        self.v: Tensor | None = None

    def update(self, batch: StageBatch, decay: float, update_factors: bool,
               refresh: bool) -> None:
        if update_factors or self.v is None:
            q = batch.q_theta[self.members[0]]
            self.v = _ema(self.v, q * q, decay)

    def solve(self, rhs: Native) -> Native:
        assert self.v is not None, "RmsDiagBlock.solve before update"
        n = self.members[0]
        return {n: rhs[n] / (self.v.sqrt() + self.damping)}

    def state(self) -> dict[str, Tensor]:
        return {} if self.v is None else {"v": self.v}

    def load_state(self, state: dict[str, Tensor]) -> None:
        self.v = state.get("v")


class GNDiagBlock(Block):
    """``diag(EMA(Σ ψ²)) + λ``: the exact Gauss-Newton diagonal of one (BatchNorm) player."""

    needs_psi = True

    def __init__(self, member: int, view: PlayerView) -> None:
        super().__init__([member], [view])
        self.v: Tensor | None = None
        self._acc: Tensor | None = None

    def psi_stats(self, psis: PsiRows) -> None:
        sq = (psis[self.members[0]] ** 2).sum(0)
        self._acc = sq if self._acc is None else self._acc + sq

    def psi_accumulators(self) -> list[Tensor]:
        return [] if self._acc is None else [self._acc]

    def end_psi_stats(self, decay: float) -> None:
        if self._acc is not None:
            self.v = _ema(self.v, self._acc, decay)
        self._acc = None

    def solve(self, rhs: Native) -> Native:
        assert self.v is not None, "GNDiagBlock.solve before statistics"
        n = self.members[0]
        return {n: rhs[n] / (self.v + self.damping)}

    def state(self) -> dict[str, Tensor]:
        return {} if self.v is None else {"v": self.v}

    def load_state(self, state: dict[str, Tensor]) -> None:
        self.v = state.get("v")


class FactorBlock(Block):
    """A block whose curvature is one :class:`KroneckerFactor` ``self.factor``: its EMA
    update, eigenbasis schedule, checkpoint state and logged statistics."""

    factor: KroneckerFactor

    def factors(self) -> list[KroneckerFactor]:
        return [self.factor]

    def fold_stats(self, batch: StageBatch, decay: float, update_factors: bool,
                   refresh: bool, stats: dict[str, Tensor] | None) -> None:
        """Fold ``stats`` (default: :meth:`batch_stats`) in; refresh the eigenbasis when due."""
        if stats is None:
            stats = {k: s.value for k, s in self.batch_stats(batch, update_factors).items()}
        if stats:
            self.factor.update_stats(stats["A"], stats["G"], decay)
        if refresh or not self.factor.has_eigenbasis:
            self.factor.refresh_eigenbasis()

    def state(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.factor.state_dict().items() if isinstance(v, Tensor)}

    def load_state(self, state: dict[str, Tensor]) -> None:
        full: dict[str, Tensor | str | None] = {"mode": self.factor.mode}
        for name in KroneckerFactor._FIELDS:
            full[name] = state.get(name)
        self.factor.load_state_dict(full)

    def player_stats(self) -> dict[str, dict[str, float]]:
        stats = self.factor.stats()
        return {v.name: stats for v in self.views} if stats else {}


class KronBlock(FactorBlock):
    """``A ⊗ G + λ I`` for Kronecker players sharing one output (joint-input factorisation).

    With several members the input rows are concatenated (``x = [a_1; a_2; ...]``) and ``g``
    is the mean of the members' output-side rows -- exact when they add directly into one
    tensor (Fig. 3a, a shortcut aligned with the layer it joins); with BatchNorm between a
    layer and the sum the members' ``g`` differ and the mean is an approximation.
    ``zero_cross`` zeroes the cross blocks of ``A`` (Theorem 6, first bullet).
    """

    def __init__(self, members: Sequence[int], views: Sequence[PlayerView], mode: Mode,
                 zero_cross: bool = False) -> None:
        super().__init__(members, views)
        self.mode: Mode = mode
        self.needs_psi = mode == "ekfac"
        self.zero_cross = zero_cross
        self.factor = KroneckerFactor(mode)
        self.widths: list[int] = [int(v.theta().shape[1]) for v in self.views]
        self._acc: Tensor | None = None
        #: Keep this step's projected per-sample gradients for :meth:`gram_chunk` (set by
        #: the solver when a Gram matrix follows; :mod:`.proj_cache`).
        self.keep_projections = False
        self.kept = ProjectionCache()
        #: This step's ``a Q_A`` for the update pass's feedback solve (:mod:`.feedback_rows`).
        self.inputs_projected = ProjectedInputs()

    def rows(self, batch: StageBatch) -> tuple[Tensor, Tensor]:
        """Joint input rows and mean output rows of this step."""
        a_list = [batch.a[n] for n in self.members]
        g_list = [batch.g[n] for n in self.members]
        if any(a is None for a in a_list) or any(g is None for g in g_list):
            raise RuntimeError("Kronecker curvature needs the factor pass (g rows)")
        shapes = {a.shape[0] for a in a_list if a is not None}
        gshapes = {tuple(g.shape) for g in g_list if g is not None}
        if len(shapes) != 1 or len(gshapes) != 1:
            names = ", ".join(v.name for v in self.views)
            raise ValueError(f"players {names} share an output group but their rows differ "
                             f"(input rows {sorted(shapes)}, output rows {sorted(gshapes)}); "
                             "same-group players must write the same output positions")
        return joint_rows([x for x in a_list if x is not None]), self.output_rows(batch)

    def output_rows(self, batch: StageBatch) -> Tensor:
        """Mean output rows of the members (the rows themselves for one member)."""
        g_list = [g for g in (batch.g[n] for n in self.members) if g is not None]
        if len(g_list) != len(self.members):
            raise RuntimeError("Kronecker curvature needs the factor pass (g rows)")
        return g_list[0] if len(g_list) == 1 else torch.stack(g_list).mean(0)

    def batch_stats(self, batch: StageBatch, update_factors: bool,
                    inputs: bool = True) -> dict[str, Stat]:
        """``A`` (mean over rows) and ``G`` (sum over rows) of this step, when due; only ``G``
        with ``inputs=False`` (``A`` was summed in the forward pass, :meth:`input_stats`)."""
        if not (update_factors or self.factor.A is None):
            return {}
        if not inputs:
            return {"G": output_stat(self.output_rows(batch))}
        a, g = self.rows(batch)
        return kron_stats(a, g, self.widths if self.zero_cross else ())

    def input_stats(self, a_rows: Sequence[Tensor]) -> dict[str, Stat]:
        """``A`` of the members' input rows (in member order), e.g. from the forward pass."""
        return {"A": input_stat(joint_rows(list(a_rows)), self.widths if self.zero_cross else ())}

    def update(self, batch: StageBatch, decay: float, update_factors: bool,
               refresh: bool, stats: dict[str, Tensor] | None = None) -> None:
        """:meth:`FactorBlock.fold_stats`; per-sample statistics only on factor steps."""
        self.fold_stats(batch, decay, update_factors, refresh, stats)
        self.needs_psi = self.psi_due(update_factors)

    def psi_due(self, update_factors: bool) -> bool:
        return update_factors and self.mode == "ekfac"

    def joint(self, parts: PsiRows) -> Tensor:
        return torch.cat([parts[n] for n in self.members], dim=-1)

    def split(self, joint: Tensor) -> Native:
        return dict(zip(self.members, torch.split(joint, self.widths, dim=-1), strict=False))

    def member_rows(self, chunk: PsiChunk) -> list[ExampleRows]:
        """Each member's rows of the chunk's samples on their way into the eigenbasis
        (:func:`~dgn_dist.optim.kronecker.project_rows`; the joint ``ψ`` is
        ``[ψ_1 | ψ_2 | ...]``, so each member contributes through its rows of ``Q_A``)."""
        f, batch = self.factor, chunk.batch
        assert f.q_a is not None and f.q_g is not None
        num, r = chunk.stop - chunk.start, batch.rank
        out, offset = [], 0
        for n, width in zip(self.members, self.widths, strict=True):
            a, g = batch.a[n], batch.g[n]
            if a is None or g is None:
                raise RuntimeError(f"player {self.views[0].name}: per-sample gradients need "
                                   "the factor pass")
            locs = a.shape[0] // batch.num
            out.append(project_rows(a[chunk.start * locs:chunk.stop * locs],
                                    g[chunk.start * r * locs:chunk.stop * r * locs], num,
                                    f.q_a[offset:offset + width], f.q_g))
            offset += width
        self.inputs_projected.add(batch, chunk.start, self.members, out, f.q_a)
        return out

    def projected(self, chunk: PsiChunk, got: tuple[Kind, Kept] | None = None) -> Tensor:
        """``Q_Gᵀ ψ_{b,i} Q_A`` of the chunk's samples, ``[num, r, d_out, d_in]`` (from what
        :attr:`kept` holds -- ``got``, when the caller already looked it up -- else from the
        rows)."""
        got = self.kept.get(chunk.start, chunk.stop) if got is None else got
        if got is not None and got[0] == "proj":
            assert isinstance(got[1], Tensor)
            return got[1]
        rows = got[1] if got is not None and got[0] == "rows" else self.member_rows(chunk)
        assert isinstance(rows, list)
        return assemble_sum(rows)

    def _keep(self, chunk: PsiChunk, kind: Kind, item: Kept, per_example: int) -> None:
        self.kept.keep(chunk.start, chunk.stop, chunk.batch.num, kind, item, per_example)

    def release(self) -> None:
        """Drop the kept projections (end of the stage's sweep)."""
        self.kept.release()
        self.inputs_projected.end_batch()

    def psi_stats(self, psis: PsiRows) -> None:
        if self.zero_cross and len(self.widths) > 1:
            raise ValueError("ekfac with zero_cross on a joint block is not supported")
        f = self.factor
        assert f.q_a is not None and f.q_g is not None
        if isinstance(psis, PsiChunk):
            rows = self.member_rows(psis)
            proj = assemble_sum(rows)
            num, keep = psis.stop - psis.start, self.keep_projections
            rows_size = sum(x.numel() for x in rows)
            if keep and rows_size < proj.numel() and all(x.q_a is None for x in rows):
                self._keep(psis, "rows", rows, rows_size // num)  # smaller than P
                keep = False
            del rows
            if psis.batch.rank == 1:  # the rank-1 Gram matrix reads only the squares
                squares = proj.square_()
                if keep:
                    self._keep(psis, "squares", squares, squares[0].numel())
            else:
                squares = proj.square()
                if keep:
                    self._keep(psis, "proj", proj, proj[0].numel())
            del proj
            sq = squares.sum((0, 1))
        else:
            sq = (f.q_g.T @ self.joint(psis).to(f.q_g.dtype) @ f.q_a).square().sum(0)
        self._acc = sq if self._acc is None else self._acc + sq

    def gram_chunk(self, chunk: PsiChunk, coef: Tensor | float) -> Tensor:
        """``coef · <ψ_{b,i}, (A ⊗ G + λ)⁻¹ ψ_{b,j}>`` for the chunk's samples, ``[num, r, r]``:
        in the eigenbasis ``Σ P_{b,i} P_{b,j} / (S + λ)`` with ``P`` the projections (the
        orthogonal back-projection of :meth:`solve_joint` cancels in the inner product)."""
        weight = (coef / (self.factor.eigen_scale() + self.damping)).reshape(-1)
        got = self.kept.get(chunk.start, chunk.stop)
        if got is not None and got[0] == "squares":  # rank 1: Σ_d P_d² w_d
            assert isinstance(got[1], Tensor)
            squares = got[1].flatten(1)  # [num, d_out * d_in]
        else:
            proj = self.projected(chunk, got).flatten(2)  # [num, r, d_out * d_in]
            if chunk.batch.rank > 1 or (got is not None and got[0] == "proj"):
                return sample_inner(proj * weight.to(proj.dtype), proj)
            # rank 1, assembled just now (not a kept tensor): square in place, then one
            # matrix-vector product (a third of the memory traffic of P·w, then <P·w, P>)
            squares = proj.square_().flatten(1)
        return rows_dot(squares, weight.to(squares.dtype)).reshape(-1, 1, 1)

    def psi_accumulators(self) -> list[Tensor]:
        return [] if self._acc is None else [self._acc]

    def end_psi_stats(self, decay: float) -> None:
        if self._acc is not None:
            self.factor.update_scaling_stats(self._acc, decay)
        self._acc = None

    def solve_joint(self, rhs: Tensor) -> Tensor:
        return self.factor.precondition(rhs, self.damping)

    def apply_joint(self, x: Tensor) -> Tensor:
        """``(A ⊗ G + λ I) vec(x)`` in the eigenbasis (the matrix :meth:`solve_joint` inverts)."""
        f = self.factor
        assert f.q_a is not None and f.q_g is not None
        proj = f.q_g.T @ x.to(f.q_g.dtype) @ f.q_a
        return (f.q_g @ (proj * f.eigen_scale()) @ f.q_a.T).to(x.dtype) + self.damping * x

    def solve(self, rhs: Native) -> Native:
        return self.split(self.solve_joint(self.joint(rhs)))

    def project_feedback(self, g_rows: Native, a_projected: Native) -> Tensor:
        """``Q_Gᵀ M Q_A`` of the joint ``M = [g_1ᵀ a_1 | g_2ᵀ a_2 | ...]`` from the members'
        output rows ``g_n`` and their kept ``a_n Q_A`` (:mod:`.feedback_rows`):
        ``Σ_n Q_Gᵀ g_nᵀ (a_n Q_A)``, without the ``d_out d_in²`` product ``M Q_A``."""
        f = self.factor
        assert f.q_g is not None
        inner = sum(g_rows[n].to(f.q_g.dtype).T @ a_projected[n] for n in self.members)
        assert isinstance(inner, Tensor)
        return f.q_g.T @ inner

    def solve_projected(self, proj: Tensor) -> Native:
        """:meth:`solve` of a right-hand side already in the eigenbasis
        (:meth:`project_feedback`)."""
        f = self.factor
        assert f.q_a is not None and f.q_g is not None
        return self.split(eigen_solve_projected(proj, f.q_a, f.q_g, f.eigen_scale(),
                                                self.damping, self.views[0].theta().dtype))
