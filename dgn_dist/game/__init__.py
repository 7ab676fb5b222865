"""The dynamic game a network defines: players, stages, and the builder (DESIGN.md §2)."""

from dgn_dist.game.builder import ALIGNMENTS, GameBuildError, build_game
from dgn_dist.game.core import Game, Player, Stage, State
from dgn_dist.game.stages import BranchStage, ChainStage, MergeStage, SumStage, ThroughStage

__all__ = ["ALIGNMENTS", "BranchStage", "ChainStage", "Game", "GameBuildError", "MergeStage",
           "Player", "Stage", "State", "SumStage", "ThroughStage", "build_game"]
