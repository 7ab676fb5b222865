"""Per-stage gains: ``k = Q_θθ⁻¹ Q_θ``, ``K δx = Q_θθ⁻¹ Q_θx δx`` and the Gram blocks of
``V_xx`` (DESIGN.md sections 2.1 and 3).

:class:`StageSolver` splits the stage's players into curvature blocks
(:mod:`dgn_dist.dgnopt.blocks`):

* ``olne`` / ``fne``: one block per player (eq. 9);
* ``gr``: Kronecker players of one output group share a joint-input block; two groups are
  coupled by a :class:`~dgn_dist.dgnopt.blocks.CoopPairBlock` (Prop. 5, eq. 11/15); more than
  two groups with Kronecker players is rejected. Diagonal (BatchNorm) players are solved on
  their own block even under ``gr``; under ``identity`` curvature every player is its own
  block (``P_uv = 0``, Theorem 6).

The Gram matrix of the sweep, ``Γ_b[i, j] = <ψ_{b,i}, Q_θθ⁻¹ ψ_{b,j}>`` with
``ψ_{b,i} = F_θᵀ u_{b,i}``, is built from per-sample gradients in chunks of samples.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from dgn_dist.dgnopt.baselines import DiagRule
from dgn_dist.dgnopt.blocks import (
    Block,
    GNDiagBlock,
    IdentityBlock,
    KronBlock,
    Native,
    PsiChunk,
    RmsDiagBlock,
    StageBatch,
)
from dgn_dist.dgnopt.capture import PlayerTap
from dgn_dist.dgnopt.coop import CoopPairBlock
from dgn_dist.dgnopt.dots import sample_inner
from dgn_dist.dgnopt.extended import extended_identity_blocks
from dgn_dist.dgnopt.players import PlayerView
from dgn_dist.dgnopt.reduction import LOCAL, Reducer
from dgn_dist.dgnopt.streamed import (
    StreamedStats,
    add_block_stats,
    add_input_stats,
    input_blocks_due,
)
from dgn_dist.game.core import Stage

INFOS: tuple[str, ...] = ("olne", "fne", "gr")
CURVATURES: tuple[str, ...] = ("identity", "diag", "kfac", "ekfac")


#: ``chunk_mb = 0``: the per-sample chunk budget in MiB by device type. Measured on ResNet-18 at
#: batch 128 (``dgn-bench --chunk-mb``): on an H100, 256 MiB took the DGNOpt step from 350 to
#: 253 ms at the same peak memory (1024 MiB: 314 ms, peak x1.8); on the CPU, 512 MiB instead of
#: 64 saved 4 % of the time for 345 MiB more peak memory (batch 32).
AUTO_CHUNK_MB: dict[str, float] = {"cpu": 64.0, "cuda": 256.0}


def chunk_elements(chunk_mb: float, device: torch.device) -> int:
    """Float32 elements in one chunk of per-sample gradients (``chunk_mb = 0``: by device)."""
    mb = chunk_mb or AUTO_CHUNK_MB.get(device.type, AUTO_CHUNK_MB["cpu"])
    return max(1, int(mb * 2**20) // 4)


class NonFiniteUpdate(RuntimeError):
    """A non-finite statistic or update; the step is skipped and no parameter changes."""


def all_finite(tensors: Sequence[Tensor], fused: bool | None = None) -> bool:
    """True when no tensor holds a NaN or an infinity (empty tensors count as finite).

    One reduction per tensor whose results NaN and infinities reach, then one check:
    on CUDA the infinity norm as one fused multi-tensor launch (``torch._foreach_norm``, as
    ``clip_grad_norm_`` uses; a GPU step is bound by launches), on the CPU ``aminmax``, 16x
    faster there than the norm (the input rows of a convolution are large; ``isfinite`` is
    slower still). ``fused`` forces one form (tests); ``None`` picks by device.
    """
    live = [t for t in tensors if t.numel()]
    if not live:
        return True
    with torch.no_grad():  # rather than a detach() per tensor (one launch fewer each)
        if live[0].is_cuda if fused is None else fused:
            extremes = list(torch._foreach_norm(live, float("inf")))
        else:
            extremes = [v for t in live for v in torch.aminmax(t.reshape(-1))]
        return bool(torch.isfinite(torch.stack(extremes)).all())


def _rows_of(batch: StageBatch) -> list[Tensor]:
    """The batch's ``Q_θ``, input rows and output rows (for one finiteness check)."""
    return [t for t in (*batch.q_theta, *batch.a, *batch.g) if t is not None]


class StageSolver:
    """The curvature blocks of one stage and the solves built on them.

    Args:
        stage: the game stage; players without trainable parameters are skipped.
        info: ``"olne"``, ``"fne"`` or ``"gr"``.
        curvature: ``"identity"``, ``"diag"``, ``"kfac"`` or ``"ekfac"``.
        zero_cross: ``gr`` with the cross blocks zeroed (Theorem 6, first bullet).
        coop_iters: conjugate-gradient iterations of a two-group cooperative solve.
        coop_tol: relative residual at which those iterations stop.
        diag_rule: ``curvature="diag"`` with a baseline's preconditioner (RMSprop, Adam;
            :mod:`dgn_dist.dgnopt.baselines`) instead of the EMA rule of eq. 13.
        game_extended: ``curvature="identity"`` under ``gr`` keeps the Gauss-Newton cross
            blocks between fictitious copies of one layer (game-extended SGD,
            :mod:`dgn_dist.dgnopt.extended`).
        gain_scale: ``Q_θθ := Q_θθ / gain_scale``: every solve is multiplied by it (the Fig. 6
            ablation puts a baseline's learning rate here, so that ``k`` is its step).
    """

    def __init__(self, stage: Stage, info: str, curvature: str, *, zero_cross: bool = False,
                 coop_iters: int = 20, coop_tol: float = 1e-8, diag_rule: DiagRule | None = None,
                 game_extended: bool = False, gain_scale: float = 1.0,
                 chunk_mb: float = 0.0) -> None:
        if info not in INFOS:
            raise ValueError(f"info must be one of {', '.join(INFOS)}; got {info!r}")
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {', '.join(CURVATURES)}; got "
                             f"{curvature!r}")
        self.stage = stage
        self.name = stage.name
        self.views = [PlayerView(p) for p in stage.players if p.parameters()]
        self.curvature = curvature
        self.zero_cross = zero_cross
        self.diag_rule = diag_rule
        if not gain_scale > 0:
            raise ValueError(f"gain_scale must be > 0; got {gain_scale}")
        self.gain_scale = float(gain_scale)
        if not chunk_mb >= 0:
            raise ValueError(f"chunk_mb must be >= 0 (0 = auto); got {chunk_mb}")
        self.chunk_mb = float(chunk_mb)
        self.game_extended = game_extended and info == "gr" and curvature == "identity" \
            and not zero_cross
        self.blocks: list[Block] = self._build_blocks(info, curvature, zero_cross, coop_iters,
                                                      coop_tol)

    def _build_blocks(self, info: str, curvature: str, zero_cross: bool, iters: int,
                      tol: float) -> list[Block]:
        if self.game_extended:
            return extended_identity_blocks(self.stage, self.views)
        blocks: list[Block] = []
        kron_groups: dict[int, list[int]] = {}
        for n, view in enumerate(self.views):
            if curvature == "identity":
                blocks.append(IdentityBlock([n], [view]))
            elif curvature == "diag":
                rule = self.diag_rule
                blocks.append(RmsDiagBlock(n, view) if rule is None else rule.block(n, view))
            elif not view.kron:
                blocks.append(GNDiagBlock(n, view))
            elif info == "gr":
                kron_groups.setdefault(view.player.output_group, []).append(n)
            else:
                blocks.append(KronBlock([n], [view], curvature))  # type: ignore[arg-type]
        groups = [KronBlock(m, [self.views[n] for n in m], curvature,  # type: ignore[arg-type]
                            zero_cross) for _, m in sorted(kron_groups.items())]
        if len(groups) > 2:
            raise ValueError(
                f"stage {self.name}: gr couples at most two output groups of Kronecker players "
                f"(Prop. 5), this stage has {len(groups)}; use game.alignment='second' or "
                "info='fne' for this network")
        if len(groups) == 2:
            blocks.append(CoopPairBlock(groups[0], groups[1], iters, tol, zero_cross))
        else:
            blocks.extend(groups)
        return blocks

    # -- statistics --------------------------------------------------------------------
    def needs_factors(self) -> bool:
        """True when the curvature itself needs the ``V_xx`` factors pulled back (``g``)."""
        return (self.curvature in ("kfac", "ekfac") or self.game_extended) and bool(self.views)

    def accumulate(self, acc: StreamedStats, batch: StageBatch, *, update_factors: bool,
                   refresh: bool, keep_projections: bool = False) -> None:
        """Add one micro-batch's statistics to ``acc`` (:mod:`dgn_dist.dgnopt.streamed`);
        :meth:`update` with ``streamed=acc`` then folds the whole batch in.

        ``keep_projections``: Kronecker blocks keep the micro-batch's projections for a
        :meth:`gram` of it under the current curvature (which releases them)."""
        psi_blocks = add_block_stats(acc, self.blocks, batch, update_factors=update_factors,
                                     refresh=refresh, finite=all_finite(_rows_of(batch)))
        for blk in psi_blocks:
            if isinstance(blk, KronBlock):
                blk.keep_projections = keep_projections
        self._psi_pass(batch, psi_blocks)

    def _psi_pass(self, batch: StageBatch, blocks: Sequence[Block]) -> None:
        """Add ``batch``'s per-sample sums to ``blocks`` (chunks of samples)."""
        # Each block in chunks sized by its own members: a BatchNorm block's per-sample
        # gradients are tiny, and chunking them with a stage's convolutions multiplied the
        # kernel launches that bound a GPU step.
        for blk in blocks:
            for psis in self.iter_psi(batch, blk.members):
                blk.psi_stats(psis)

    def accumulate_inputs(self, acc: StreamedStats, tap: PlayerTap, num: int, *,
                          update_factors: bool, refresh: bool,
                          keep: dict[int, Tensor] | None = None) -> None:
        """Add the ``A`` statistics of one micro-batch's forward pass (``tap`` recorded the
        players' inputs) to ``acc``, for the Kronecker blocks that take them
        (:func:`~dgn_dist.dgnopt.streamed.add_input_stats`). ``keep``: also store the input
        rows there (by player index), for a later pass over the same inputs."""
        members = {n for i in input_blocks_due(self.blocks, update_factors)
                   for n in self.blocks[i].members}
        if not members:
            return
        rows = {n: self.views[n].a_rows(tap.input(n)) for n in sorted(members)}
        if keep is not None:
            keep.update(rows)
        add_input_stats(acc, self.blocks, rows, num, update_factors=update_factors,
                        refresh=refresh, finite=all_finite(list(rows.values())))

    def update(self, batch: StageBatch, *, decay: float, update_factors: bool, refresh: bool,
               damping: float, weight_decay: float, reducer: Reducer = LOCAL,
               keep_projections: bool = False, streamed: StreamedStats | None = None) -> None:
        """Fold this step's statistics into every block and refresh eigenbases on schedule.

        With data parallelism (``reducer``) the blocks' batch statistics are reduced over the
        replicas in one bucketed call before they are folded, the eigendecompositions may be
        spread over the replicas, and the per-sample sums are reduced before they are folded.

        ``keep_projections``: a :meth:`gram` of this batch follows; Kronecker blocks keep the
        per-sample projections of the EKFAC scaling for it (memory permitting) until
        :meth:`release`.

        ``streamed``: the batch statistics (and some per-sample sums) were already summed
        over the micro-batches by :meth:`accumulate`; ``batch`` is still the whole batch (for
        the per-sample sums that could not stream).

        Raises:
            NonFiniteUpdate: a statistic of this step is not finite on some replica (nothing
                is folded in; every replica raises).
        """
        if streamed is None:  # (accumulate may have kept projections of this batch)
            self.release()
        for blk in self.blocks:  # cooperative pairs solve the Gram matrix through CG instead
            if isinstance(blk, KronBlock):
                blk.keep_projections = keep_projections
        if streamed is None:
            finite = all_finite(_rows_of(batch))
        else:
            finite = streamed.finite and all_finite(batch.q_theta)
        if not reducer.agree(finite):
            raise NonFiniteUpdate(f"non-finite curvature statistics at stage {self.name}")
        reduced = reducer.reduce_stats([blk.batch_stats(batch, update_factors)
                                        for blk in self.blocks] if streamed is None
                                       else streamed.stats())
        with reducer.refreshing([f for blk in self.blocks for f in blk.factors()]):
            for blk, stats in zip(self.blocks, reduced, strict=True):
                blk.damping = damping if isinstance(blk, RmsDiagBlock) else damping + weight_decay
                if stats:
                    blk.update(batch, decay, update_factors, refresh,  # type: ignore[call-arg]
                               stats=stats)
                else:
                    blk.update(batch, decay, update_factors, refresh)
        psi_blocks = [b for b in self.blocks if b.needs_psi and update_factors]
        if not psi_blocks:
            return
        done = set() if streamed is None else {id(self.blocks[i]) for i in streamed.psi_blocks}
        fresh = [b for b in psi_blocks if id(b) not in done]
        for blk in fresh:
            blk.reset_psi_stats()
        self._psi_pass(batch, fresh)
        reducer.reduce([t for blk in psi_blocks for t in blk.psi_accumulators()], "factor")
        for blk in psi_blocks:
            blk.end_psi_stats(decay)

    def _reference(self) -> Tensor:
        """A parameter: the dtype and device of ``Q_θ`` and of the per-sample sums (a
        micro-batch of the pipeline's last rank streams without its ``Q_θ``)."""
        return self.views[0].params[0]

    def iter_psi(self, batch: StageBatch, members: Sequence[int]) -> Iterator[PsiChunk]:
        """Per-sample gradients of ``members`` in chunks of samples (bounded memory), built
        lazily: Kronecker blocks project the rows instead (:meth:`KronBlock.projected`)."""
        per_sample = sum(int(self.views[n].theta().numel()) for n in members) * batch.rank
        budget = chunk_elements(self.chunk_mb, self._reference().device)
        chunk = max(1, budget // max(per_sample, 1))
        for start in range(0, batch.num, chunk):
            yield PsiChunk(batch, self.views, members, start, min(batch.num, start + chunk))

    def _kron_blocks(self) -> list[KronBlock]:
        """Every :class:`KronBlock`, those inside cooperative pairs included."""
        out: list[KronBlock] = []
        for blk in self.blocks:
            if isinstance(blk, KronBlock):
                out.append(blk)
            elif isinstance(blk, CoopPairBlock):
                out.extend((blk.u, blk.v))
        return out

    def drop_kept_rows(self, batch: StageBatch) -> None:
        """Free the rows of single-player Kronecker blocks that kept this step's projections:
        their :meth:`gram` terms read those (memory: the input rows of an early convolution
        are ``9×`` its input activation)."""
        for blk in self.blocks:
            if isinstance(blk, KronBlock) and len(blk.members) == 1 and blk.kept.kind:
                batch.a[blk.members[0]] = batch.g[blk.members[0]] = None

    def release(self) -> None:
        """Drop per-sample projections kept for :meth:`gram`."""
        for kron in self._kron_blocks():
            kron.release()

    # -- projected input rows for the feedback solve (dgn_dist.dgnopt.feedback_rows) -------
    def keep_projected_inputs(self, examples: int) -> None:
        """Start a step: Kronecker blocks keep the ``a Q_A`` their Gram terms form over its
        ``examples`` samples for the update pass (``0``: none; drops a previous step's).
        Not those inside cooperative pairs: their feedback solves the coupled system."""
        for blk in self.blocks:
            if isinstance(blk, KronBlock):
                blk.inputs_projected.arm(examples)

    def projected_input_members(self) -> list[int]:
        """The players whose projected input rows :meth:`take_projected_inputs` may return
        (members of the Kronecker blocks that keep them), in order."""
        return sorted(n for blk in self.blocks if isinstance(blk, KronBlock)
                      for n in blk.members)

    def take_projected_inputs(self, examples: int) -> dict[int, dict[int, Tensor]]:
        """By block index, the kept ``a Q_A`` of each member (blocks whose rows cover the
        ``examples`` samples in their current basis); every block's are dropped."""
        out: dict[int, dict[int, Tensor]] = {}
        for i, blk in enumerate(self.blocks):
            if isinstance(blk, KronBlock):
                rows = blk.inputs_projected.take(examples, blk.factor.q_a)
                if rows is not None and set(rows) == set(blk.members):
                    out[i] = rows
        return out

    def project_feedback(self, kept: dict[int, dict[int, Tensor]],
                         g_rows: dict[int, Tensor]) -> dict[int, Tensor]:
        """By block index, ``Q_Gᵀ Q_θx δX Q_A`` from the kept ``a Q_A`` (``kept``, from
        :meth:`take_projected_inputs`) and the members' output rows ``g_rows``."""
        out: dict[int, Tensor] = {}
        for i, rows in kept.items():
            blk = self.blocks[i]
            assert isinstance(blk, KronBlock)
            out[i] = blk.project_feedback(g_rows, rows)
        return out

    # -- solves ------------------------------------------------------------------------
    def open_rhs(self, q_theta: Sequence[Tensor]) -> list[Tensor]:
        """The right-hand sides of the open gain ``k``: ``Q_θ``, or what a baseline block
        puts in its place (Adam's first moment, :mod:`dgn_dist.dgnopt.baselines`)."""
        native = dict(enumerate(q_theta))
        out: Native = {}
        for blk in self.blocks:
            out.update(blk.open_rhs(native))
        return [out.get(n, q) for n, q in enumerate(q_theta)]

    def solve(self, rhs: Sequence[Tensor | None],
              projected: Mapping[int, Tensor] | None = None) -> list[Tensor]:
        """``Q_θθ⁻¹ rhs`` for native-form right-hand sides (one per player, any leading dims).

        ``projected``: by block index, a Kronecker block's right-hand side already in its
        eigenbasis (:meth:`KronBlock.project_feedback`; its members' ``rhs`` are ``None``).
        Each player's solution is divided by its consistency scale (:meth:`set_scales`) and
        multiplied by ``gain_scale``."""
        native = {n: x for n, x in enumerate(rhs) if x is not None}
        out: Native = {}
        for i, blk in enumerate(self.blocks):
            if projected is not None and i in projected:
                assert isinstance(blk, KronBlock)
                out.update(blk.solve_projected(projected[i]))
            else:
                out.update(blk.solve(native))
        scales = self.scales
        sol = [out[n] / scales[n].to(out[n].dtype) if scales else out[n]
               for n in range(len(self.views))]
        return sol if self.gain_scale == 1.0 else [x * self.gain_scale for x in sol]

    # -- consistency rescaling (dgn_dist.dgnopt.sweep.rescale_gains) ----------------------
    @property
    def scales(self) -> list[Tensor]:
        """Per-player curvature scales of this step (empty = unscaled)."""
        return getattr(self, "_scales", [])

    def reset_scales(self) -> None:
        self._scales: list[Tensor] = []

    def set_scales(self, scales: Sequence[Tensor]) -> None:
        self._scales = list(scales)

    def rescale_units(self) -> list[tuple[list[int], float]]:
        """Groups of players that share one curvature scale, with their damping.

        A coupled block (``gr``) is one unit; with the cross blocks zeroed, or under
        ``fne``/``olne``, every player is its own unit, so Theorem 6 (gr with ``P_uv = 0``
        ≡ fne) holds with rescaling too."""
        units: list[tuple[list[int], float]] = []
        for blk in self.blocks:
            if self.zero_cross or len(blk.members) == 1:
                units.extend(([n], blk.damping) for n in blk.members)
            else:
                units.append((list(blk.members), blk.damping))
        return units

    def gram(self, batch: StageBatch) -> Tensor:
        """Per-sample Gram blocks ``Γ_b = [<ψ_{b,i}, Q_θθ⁻¹ ψ_{b,j}>]_{ij}``, ``[B, r, r]``.

        ``Q_θθ`` is block diagonal over the curvature blocks, so ``Γ`` is a sum over blocks.
        A Kronecker block whose members share one consistency scale contributes
        ``Σ P_{b,i} P_{b,j} / (S + λ)`` from its projections (:meth:`KronBlock.gram_chunk`);
        the others go through their solve. Releases the kept projections."""
        r = batch.rank
        scales = self.scales
        g = self._reference().new_zeros(batch.num, r, r)
        for blk in self.blocks:  # each block in chunks of its own size (see _psi_pass)
            for psis in self.iter_psi(batch, blk.members):
                term = self._gram_term(blk, psis, scales)
                if term is not None:
                    g[psis.start:psis.stop] += term
        self.release()
        return (g + g.transpose(1, 2)) / 2

    def _gram_term(self, blk: Block, psis: PsiChunk,
                   scales: list[Tensor]) -> Tensor | None:
        """One block's part of ``Γ`` for the chunk's samples, ``[num, r, r]`` (or ``None``
        for a block without members)."""
        num, r = psis.stop - psis.start, psis.batch.rank
        if isinstance(blk, KronBlock) and (
                not scales or all(scales[n] is scales[blk.members[0]] for n in blk.members)):
            coef = self.gain_scale / scales[blk.members[0]] if scales else self.gain_scale
            return blk.gram_chunk(psis, coef).to(self._reference().dtype)
        sol = blk.solve({n: psis[n] for n in blk.members})
        term = None
        for n in blk.members:
            x = psis[n].reshape(num, r, -1)
            y = sol[n] / scales[n].to(sol[n].dtype) if scales else sol[n]
            y = (y * self.gain_scale).reshape(num, r, -1).to(x.dtype)
            t = sample_inner(x, y)
            term = t if term is None else term + t
        return term

    def cross_ratio(self) -> Tensor | None:
        """``‖P_uv l‖ / ‖P_u‖`` of the last cooperative open-gain solve (``gr``), if any."""
        for blk in self.blocks:
            if isinstance(blk, CoopPairBlock) and blk.last_cross_ratio is not None:
                return blk.last_cross_ratio
        return None

    # -- state -------------------------------------------------------------------------
    def state(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for i, blk in enumerate(self.blocks):
            out.update({f"{i}.{k}": v for k, v in blk.state().items()})
        return out

    def load_state(self, state: dict[str, Tensor]) -> None:
        for i, blk in enumerate(self.blocks):
            prefix = f"{i}."
            blk.load_state({k[len(prefix):]: v for k, v in state.items()
                            if k.startswith(prefix)})

    def player_stats(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for blk in self.blocks:
            out.update(blk.player_stats())
        return out
