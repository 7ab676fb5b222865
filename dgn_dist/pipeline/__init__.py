"""Pipeline parallelism for DGNOpt: game stages sharded over ranks, ``V_x`` and the low-rank
``V_xx`` factors sent backward between them, on a 2-D ``("pp", "dp")`` mesh (DESIGN.md §4).

* :func:`build_pipeline_runner` / :func:`runner_from_config` -> :class:`PipelineRunner`
  (``train_step``, ``predict``, ``full_state_dict``, ``load_full_state_dict``,
  ``comm_stats``);
* :func:`partition_stages` (uniform, by parameters, explicit counts);
* :func:`check_pipeline`: every launch-time check of the pipeline settings.
"""

from __future__ import annotations

from dgn_dist.pipeline.partition import describe_partition, partition_stages
from dgn_dist.pipeline.runner import (
    PipelineOptimizer,
    PipelineRunner,
    StepResult,
    build_pipeline_runner,
)
from dgn_dist.pipeline.setup import check_pipeline, runner_from_config

__all__ = ["PipelineOptimizer", "PipelineRunner", "StepResult", "build_pipeline_runner",
           "check_pipeline", "describe_partition", "partition_stages", "runner_from_config"]
