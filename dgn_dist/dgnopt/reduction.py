"""Where DGNOpt's batch-summed quantities meet the data-parallel group (DESIGN.md §4).

DGNOpt computes everything in the stacked-batch convention of the GLOBAL batch
(``φ = mean over the B_global examples``, DESIGN.md §2): each dp replica holds ``B_local``
examples, scales its captured ``∂loss/∂logits`` by ``B_local / B_global`` and forms the
terminal factors with ``B_global`` (:func:`dgn_dist.dgnopt.terminal.terminal_factors`).
Then every batch statistic is either

* a **sum over examples** (``Q_θ``, ``G``, the cross factor ``B_uv``, the EKFAC scaling and
  Gauss-Newton diagonal sums, the rescale quadratic, the weighted gradient ``Q_θx δX`` of
  the update pass): the global value is the SUM over replicas; or
* a **mean over rows** (the input factors ``A`` and ``A_uv``): with equal local batches the
  global value is the MEAN over replicas,

while per-example quantities (``V_x``, the ``U`` factors, the Gram blocks ``Γ_bb``) stay local.

:class:`Reducer` is the interface the optimizer calls at those points; this base class is
the single-process no-op. :class:`dgn_dist.distributed.dgnopt_dp.DataParallelReducer`
implements it over a dp process group (bucketed, asynchronous all-reduces, symmetric factors
as upper triangles, eigendecompositions spread over the ranks).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

from torch import Tensor

from dgn_dist.optim.kronecker import KroneckerFactor


class Stat(NamedTuple):
    """One batch statistic of a curvature block, before it is folded into the EMA.

    Attributes:
        value: the local statistic.
        mean: True for a mean over rows (averaged over replicas), False for a sum over
            examples (summed over replicas).
        symmetric: a symmetric matrix (may travel as its upper triangle).
        category: byte-counter category (``"factor"`` or ``"cross"``).
    """

    value: Tensor
    mean: bool
    symmetric: bool = False
    category: str = "factor"


class Pending:
    """A reduction in flight; :meth:`wait` writes the results into the tensors in place."""

    def wait(self) -> None:
        """Block until the reduction is done (nothing to wait for here)."""


class Reducer:
    """Single-process reducer: every reduction is the identity, every rank is rank 0.

    Attributes:
        world: number of data-parallel replicas (1 here).
    """

    world: int = 1

    def start(self, tensors: Sequence[Tensor], category: str,
              mean: bool | Sequence[bool] = False,
              symmetric: bool | Sequence[bool] = False) -> Pending:
        """Start reducing ``tensors`` in place over the replicas.

        Args:
            tensors: tensors of identical shapes on every replica, in the same order.
            category: byte-counter category (``grad``, ``factor``, ``cross``, ``feedback``,
                ``scalar``).
            mean: per tensor (or for all): average instead of sum.
            symmetric: per tensor (or for all): symmetric matrix sent as an upper triangle.
        """
        del tensors, category, mean, symmetric
        return Pending()

    def reduce(self, tensors: Sequence[Tensor], category: str,
               mean: bool | Sequence[bool] = False,
               symmetric: bool | Sequence[bool] = False) -> None:
        """Blocking :meth:`start`."""
        self.start(tensors, category, mean, symmetric).wait()

    def reduce_stats(self, stats: Sequence[dict[str, Stat]]) -> list[dict[str, Tensor]]:
        """Reduce the batch statistics of a stage's blocks in one bucketed call.

        Returns:
            Per block, ``{name: reduced tensor}``.
        """
        flat = [(i, k, s) for i, block in enumerate(stats) for k, s in block.items()]
        by_cat: dict[str, list[tuple[int, str, Stat]]] = {}
        for item in flat:
            by_cat.setdefault(item[2].category, []).append(item)
        pendings = [self.start([s.value for _, _, s in items], cat, [s.mean for _, _, s in items],
                               [s.symmetric for _, _, s in items])
                    for cat, items in by_cat.items()]
        for p in pendings:
            p.wait()
        out: list[dict[str, Tensor]] = [{} for _ in stats]
        for i, k, s in flat:
            out[i][k] = s.value
        return out

    def agree(self, flag: bool) -> bool:
        """``flag`` on every replica (logical AND); keeps skip decisions collective."""
        return flag

    @contextmanager
    def refreshing(self, factors: Sequence[KroneckerFactor]) -> Iterator[None]:
        """Context around the blocks' updates of one stage: eigendecompositions requested
        inside may be spread over the replicas and broadcast on exit (here: computed at
        once)."""
        del factors
        yield


#: The reducer of a single process.
LOCAL = Reducer()
