"""Alignment plumbing of DGNOpt (paper §5.2, Alg. 2; Fig. 8a).

DGNOpt can hold one game per alignment of the residual blocks (``alignments=``) and switch
between them per step (``set_alignment``). An :class:`AlignmentHook` attached to the
optimizer chooses the alignment before each step and sees the result after it; its state is
saved in the optimizer's ``state_dict`` (see :class:`dgn_dist.game.training.AlignmentDriver`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from dgn_dist.game import ALIGNMENTS, Game

if TYPE_CHECKING:
    from dgn_dist.dgnopt.optimizer import DGNOpt


class AlignmentHook(Protocol):
    """Chooses the alignment of each step and sees its outcome (Alg. 2); its state is saved
    with the optimizer (see :class:`dgn_dist.game.training.AlignmentDriver`)."""

    def before_step(self, opt: DGNOpt) -> None: ...

    def after_step(self, opt: DGNOpt) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def check_alignments(alignment: str, alignments: Sequence[str] | None,
                     game: Game | None) -> tuple[str, ...]:
    """The alignments to build games for; ``ValueError`` naming what is wrong."""
    if alignments is None:
        return (alignment,)
    names = tuple(alignments)
    bad = [a for a in names if a not in ALIGNMENTS]
    if not names or bad or len(set(names)) != len(names):
        raise ValueError(f"alignments must be distinct names from {', '.join(ALIGNMENTS)}; "
                         f"got {list(alignments)!r}")
    if alignment not in names:
        raise ValueError(f"alignment {alignment!r} (the one active first) must be one of "
                         f"alignments {list(names)!r}")
    if game is not None and len(names) > 1:
        raise ValueError("game= gives a single prebuilt game; leave game=None to build one "
                         "game per alignment from the model")
    return names


def games_differ(games: Mapping[str, Game]) -> bool:
    """Whether the alignments' games differ (``False`` e.g. for identity shortcuts: the
    shortcut is then a dummy player and every alignment gives the same game)."""
    return len({g.describe() for g in games.values()}) > 1
