"""Curvature statistics accumulated micro-batch by micro-batch (the ``stale_k`` pipeline).

The pipelined ``stale_k`` sweep (:mod:`dgn_dist.pipeline.passes`) sees a stage's batch one
micro-batch at a time. Instead of keeping every micro-batch's rows and computing the batch
statistics when the last one has passed (serial work at the end of the sweep), each micro-batch
adds its part while it streams:

* the blocks' batch statistics (:meth:`~dgn_dist.dgnopt.blocks.Block.batch_stats`): sums over
  examples add up; means over rows are weighted by the micro-batch's number of examples (every
  example contributes the same number of rows, so this is the mean over the whole batch);
* the per-sample (EKFAC scaling / Gauss-Newton diagonal) sums of the blocks whose basis does
  not change when the step's statistics are folded in: diagonal Gauss-Newton blocks, and
  EKFAC Kronecker blocks that have an eigenbasis and are not refreshed this step. The others
  (a refresh recomputes the basis from the new factors first) still run over the whole batch
  in :meth:`~dgn_dist.dgnopt.gains.StageSolver.update`.

:meth:`~dgn_dist.dgnopt.gains.StageSolver.accumulate` adds a micro-batch;
``StageSolver.update(..., streamed=acc)`` folds the sums in.

Sums in a different order are the only difference from the whole-batch computation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from dgn_dist.dgnopt.blocks import Block, GNDiagBlock, KronBlock, StageBatch
from dgn_dist.dgnopt.reduction import Stat


def streams_psi(block: Block, update_factors: bool, refresh: bool) -> bool:
    """Whether ``block``'s per-sample statistics can be summed per micro-batch this step."""
    if not update_factors:
        return False
    if isinstance(block, GNDiagBlock):
        return True
    return isinstance(block, KronBlock) and block.mode == "ekfac" and not refresh and \
        block.factor.has_eigenbasis and not (block.zero_cross and len(block.widths) > 1)


@dataclass
class StreamedStats:
    """A stage's statistics summed over the micro-batches seen so far (module docstring).

    Attributes:
        sums: per block, ``{name: (running sum, Stat template)}``; means are weighted sums.
        examples: examples seen by the sweep.
        finite: every micro-batch's ``Q_θ`` and rows were finite.
        psi_blocks: indices of the blocks whose per-sample sums were accumulated here.
        input_blocks: indices of the Kronecker blocks whose ``A`` was summed in the forward
            pass (:func:`add_input_stats`); the sweep adds only their ``G``.
    """

    sums: list[dict[str, tuple[Tensor, Stat]]] = field(default_factory=list)
    examples: int = 0
    finite: bool = True
    psi_blocks: set[int] = field(default_factory=set)
    input_blocks: set[int] = field(default_factory=set)
    normalised: bool = False

    def start(self, blocks: list[Block], update_factors: bool, refresh: bool) -> None:
        """Begin the step (once): empty sums, no per-sample sums left over in the blocks."""
        if self.sums:
            return
        for block in blocks:
            block.reset_psi_stats()
        self.sums = [{} for _ in blocks]
        self.psi_blocks = {i for i, b in enumerate(blocks)
                           if streams_psi(b, update_factors, refresh)}

    def begin_micro_batch(self, blocks: list[Block], update_factors: bool, refresh: bool,
                          finite: bool) -> bool:
        """:meth:`start` the step if needed and record the micro-batch's finiteness;
        False once any micro-batch was not finite (nothing more is added)."""
        self.start(blocks, update_factors, refresh)
        self.finite = self.finite and finite
        return self.finite

    def add(self, index: int, stats: dict[str, Stat], num: int) -> None:
        """Add one micro-batch's statistics of block ``index`` (``num`` examples). The first
        micro-batch's values become the sums: they must be fresh tensors that nothing else
        reads (the blocks' ``batch_stats``/``input_stats`` compute new ones per call)."""
        if self.normalised:
            raise RuntimeError("StreamedStats.add after stats(): the means were already taken")
        sums = self.sums[index]
        for name, s in stats.items():
            if name not in sums:  # taken over, scaled in place: a layer4 A is 4608² floats
                sums[name] = (s.value.mul_(num) if s.mean else s.value, s)
            else:  # in place: a layer4 ``A`` is 4608² floats, a fresh sum per add cost 1 s
                sums[name][0].add_(s.value, alpha=num if s.mean else 1)

    def stats(self) -> list[dict[str, Stat]]:
        """The whole batch's statistics in :meth:`Block.batch_stats` form. The means are taken
        in the sums' own memory (owned copies; a layer4 ``A`` is 4608² floats), once: later
        calls return the same values and :meth:`add` is refused."""
        if not self.normalised:
            for block in self.sums:
                for total, s in block.values():
                    if s.mean:
                        total.div_(self.examples)
            self.normalised = True
        return [{name: s._replace(value=total) for name, (total, s) in block.items()}
                for block in self.sums]


def input_blocks_due(blocks: list[Block], update_factors: bool) -> set[int]:
    """Indices of the Kronecker blocks (not inside cooperative pairs) whose ``A`` statistics
    are due this step: what :func:`add_input_stats` sums, given every member's rows."""
    return {i for i, b in enumerate(blocks) if isinstance(b, KronBlock)
            and (update_factors or b.factor.A is None)}


def add_input_stats(acc: StreamedStats, blocks: list[Block], a_rows: dict[int, Tensor],
                    num: int, *, update_factors: bool, refresh: bool, finite: bool) -> None:
    """Add one micro-batch's ``A`` statistics, from the forward pass, of the Kronecker
    blocks (not inside cooperative pairs) whose members' input rows are all in ``a_rows``
    (by player index)."""
    if not acc.begin_micro_batch(blocks, update_factors, refresh, finite):
        return
    for i in sorted(input_blocks_due(blocks, update_factors)):
        block = blocks[i]
        assert isinstance(block, KronBlock)
        if all(n in a_rows for n in block.members):
            acc.add(i, block.input_stats([a_rows[n] for n in block.members]), num)
            acc.input_blocks.add(i)


def add_block_stats(acc: StreamedStats, blocks: list[Block], batch: StageBatch, *,
                    update_factors: bool, refresh: bool, finite: bool) -> list[Block]:
    """Add one micro-batch's block statistics to ``acc`` (nothing after a non-finite one);
    blocks whose ``A`` came from the forward pass add only ``G``.

    Returns:
        The blocks whose per-sample sums the caller should add for this micro-batch
        (:meth:`~dgn_dist.dgnopt.gains.StageSolver.accumulate`).
    """
    if not acc.begin_micro_batch(blocks, update_factors, refresh, finite):
        return []
    for i, block in enumerate(blocks):
        if i in acc.input_blocks:
            assert isinstance(block, KronBlock)
            acc.add(i, block.batch_stats(batch, update_factors, inputs=False), batch.num)
        else:
            acc.add(i, block.batch_stats(batch, update_factors), batch.num)
    acc.examples += batch.num
    return [blocks[i] for i in sorted(acc.psi_blocks)]
