"""Distributed groundwork: launcher detection, parallel degrees, work assignment, reductions.

Importing the package stays light (no torch): it re-exports the pure-Python modules
``validate`` (parallel degrees) and ``assignment`` (who inverts what). Import the torch-side
modules by path: ``dgn_dist.distributed.env`` (launchers, ``init_distributed``, device mesh)
and ``dgn_dist.distributed.reduce`` (bucketed averaging, broadcasts, byte counter).
"""

from dgn_dist.distributed.assignment import (
    GreedyAssignment,
    WorkAssignment,
    cubic_cost,
    workers_per_player,
)
from dgn_dist.distributed.validate import DistributedSetupError, ParallelDims, check_parallel

__all__ = [
    "DistributedSetupError", "GreedyAssignment", "ParallelDims", "WorkAssignment",
    "check_parallel", "cubic_cost", "workers_per_player",
]
