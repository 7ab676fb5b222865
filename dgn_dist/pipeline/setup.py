"""Build the pipeline runner from the typed config, with every check before the mesh exists.

``parallel.pp``, ``parallel.dp``, ``parallel.micro_batches``, ``parallel.pipeline_mode`` and
``parallel.partition`` (:class:`dgn_dist.config.schema.ParallelConfig`) are checked against
the world size, the game's stages and the global batch by :func:`check_pipeline`; the
errors are :class:`~dgn_dist.distributed.validate.DistributedSetupError` (a ``ValueError``)
and say what to change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from dgn_dist.distributed.env import DistContext
from dgn_dist.distributed.validate import DistributedSetupError, ParallelDims, check_parallel
from dgn_dist.game import Game, build_game
from dgn_dist.pipeline.options import check_mode
from dgn_dist.pipeline.partition import partition_stages
from dgn_dist.pipeline.runner import PipelineRunner, build_pipeline_runner

if TYPE_CHECKING:
    from dgn_dist.config.schema import Config


def check_pipeline(cfg: Config, world_size: int, game: Game | None = None) -> ParallelDims:
    """All pipeline checks of ``cfg`` for a job of ``world_size`` processes.

    Checks ``pp × dp = world size``, ``pp <=`` the number of stages (when ``game`` is given),
    the partition, the mode, that the global batch splits over the dp replicas and each
    replica's batch into ``parallel.micro_batches``, and that the run uses DGNOpt with a
    fixed alignment (what the pipeline supports).

    Returns:
        The checked degrees.

    Raises:
        DistributedSetupError: the first problem found, with what to change.
    """
    par = cfg.parallel
    try:
        check_mode(par.pipeline_mode, par.micro_batches)
    except ValueError as err:
        raise DistributedSetupError(str(err)) from err
    dims = check_parallel(par.pp, par.dp, world_size,
                          num_stages=None if game is None else len(game.stages),
                          global_batch=cfg.data.batch_size, micro_batches=par.micro_batches)
    if dims.pp > 1:
        if cfg.optim.name != "dgnopt":
            raise DistributedSetupError(
                f"parallel.pp={dims.pp} pipelines DGNOpt only; optim.name={cfg.optim.name!r} "
                "trains data-parallel: set parallel.pp=1 or optim.name='dgnopt'")
        if cfg.game.alignment_strategy != "fixed" or cfg.game.ablation != "none":
            raise DistributedSetupError(
                "parallel.pp > 1 needs game.alignment_strategy='fixed' and game.ablation="
                "'none' (alignment switching and ablations need the whole game on one rank)")
        unsupported = [key for key, on in (("optim.dgnopt_kl_clip", cfg.optim.dgnopt_kl_clip > 0),
                                          ("game.feedback_consistency",
                                           cfg.game.feedback_consistency)) if on]
        if unsupported:
            raise DistributedSetupError(
                f"parallel.pp > 1 does not support {' and '.join(unsupported)} (the pipelined "
                "sweep does not implement it): turn it off (0 / false) or set parallel.pp=1")
    if game is not None:
        partition_stages(game, dims.pp, par.partition)
    return dims


def runner_from_config(cfg: Config, model: nn.Module, ctx: DistContext) -> PipelineRunner:
    """The :class:`PipelineRunner` of a configured run (collective over the job)."""
    from dgn_dist.dgnopt import dgnopt_kwargs

    game = build_game(model, cfg.game.alignment)
    dims = check_pipeline(cfg, ctx.world_size, game)
    par = cfg.parallel
    kwargs = dgnopt_kwargs(cfg)
    return build_pipeline_runner(
        model, kwargs, ctx, dims, micro_batches=par.micro_batches, mode=par.pipeline_mode,
        partition=par.partition, game=game, grad_clip=par.grad_clip,
        bucket_bytes=max(1, int(par.bucket_mb * 2**20)),
        grad_worker_fraction=par.grad_worker_fraction, feedback_ahead=par.feedback_ahead)


__all__ = ["DistributedSetupError", "check_pipeline", "runner_from_config"]
