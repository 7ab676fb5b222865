"""The pipeline-parallel DGNOpt runner the trainer calls (DESIGN.md §4).

Usage on every rank of a ``pp × dp`` job::

    runner = build_pipeline_runner(model, dgnopt_kwargs(cfg), ctx, dims, micro_batches=4)
    for x, y in loader:            # x, y: this dp replica's batch, the same on its pp ranks
        res = runner.train_step(x, y)          # StepResult, identical on every rank
        # or train_step(x, y, next_x): the ranks before the last then run the next batch's
        # forward while the last rank updates (dgn_dist.pipeline.lookahead; same results)
    logits = runner.predict(x_eval)            # every rank
    sd = runner.full_state_dict()              # the whole model, every rank (collective)
    scalars = runner.comm_stats()              # time/... comm/... memory/... (collective)
    sched = LambdaLR(runner.optimizer, ...)    # lr / damping live in runner.optimizer
    ckpt = runner.optimizer_state_dict()       # every stage's curvature state (collective)

Each rank owns a contiguous range of stages (:mod:`dgn_dist.pipeline.partition`); with
``shard=True`` the other stages' parameters and buffers are moved to the ``meta`` device, so
parameters, curvature state and stored activations are sharded over the pipeline ranks.
``model`` must then not be called directly: use :meth:`PipelineRunner.predict`.

Semantics: ``exact`` equals single-process DGNOpt on the global batch (``dp`` replicas ×
local batch) for networks without BatchNorm; with BatchNorm, each micro-batch uses its own
batch statistics in the forward pass and running statistics are updated once per
micro-batch (as in GPipe), while the sweep and update pass linearise around the local batch.
``stale_k`` propagates the value function with the previous iteration's open gain and
curvature (the first step runs ``exact``). Skipped steps (non-finite values anywhere) are
decided collectively: every rank restores its parameters and BatchNorm running statistics
and multiplies the damping by 10.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from dgn_dist.dgnopt.capture import frozen_batchnorm, load, running_buffers, snapshot
from dgn_dist.dgnopt.gains import StageSolver
from dgn_dist.dgnopt.reduction import LOCAL, Reducer
from dgn_dist.dgnopt.skips import skip_step
from dgn_dist.dgnopt.streamed import StreamedStats
from dgn_dist.dgnopt.terminal import factor_rank
from dgn_dist.distributed.env import DistContext, build_device_mesh
from dgn_dist.distributed.reduce import DEFAULT_BUCKET_BYTES, ByteCounter
from dgn_dist.distributed.validate import ParallelDims
from dgn_dist.game import Game, build_game
from dgn_dist.pipeline import lookahead
from dgn_dist.pipeline.comm import Link, meta_copy, state_specs
from dgn_dist.pipeline.options import PipelineOptions, check_mode, make_options
from dgn_dist.pipeline.partition import partition_stages
from dgn_dist.pipeline.passes import restore
from dgn_dist.pipeline.schedule import Shard, Specs
from dgn_dist.pipeline.state import (
    gather_model_state,
    gather_optimizer_state,
    load_model_state,
    load_optimizer_state,
)

PASSES = ("forward", "sweep", "update")


@dataclass(frozen=True)
class StepResult:
    """One training step, identical on every rank.

    Attributes:
        loss: mean cross-entropy over the global batch (before the update).
        correct: correctly classified examples of the global batch.
        count: examples in the global batch.
        skipped: the step was skipped (non-finite values; damping raised).
    """

    loss: float
    correct: int
    count: int
    skipped: bool = False


class PipelineOptimizer(Optimizer):
    """Holds the pipeline's hyper-parameters in ``param_groups[0]`` (``lr``, ``damping``,
    ``weight_decay``, ``feedback_scale``, ``dgn_step``, ``skipped``) over this rank's
    parameters, so learning-rate schedulers and checkpoints work as with DGNOpt. The step
    itself is :meth:`PipelineRunner.train_step`."""

    def step(self, closure: Any = None) -> Any:
        raise RuntimeError("a pipelined DGNOpt steps inside PipelineRunner.train_step(x, y)")


class PipelineRunner:
    """Pipelined (and data-parallel) DGNOpt training of one model; build it with
    :func:`build_pipeline_runner` (its docstring lists the arguments)."""

    def __init__(self, model: nn.Module, game: Game, ranges: list[range], ctx: DistContext,
                 dims: ParallelDims, opts: PipelineOptions, *, micro_batches: int, mode: str,
                 reducer: Reducer, pp_group: Any, shard: bool, grad_clip: float,
                 feedback_ahead: bool = True) -> None:
        self.model, self.game, self.ranges, self.ctx, self.dims = model, game, ranges, ctx, dims
        self.opts, self.micro_batches, self.mode = opts, micro_batches, mode
        self.grad_clip, self.pp_group, self.reducer = grad_clip, pp_group, reducer
        self.pp_rank, self.dp_rank = dims.coords(ctx.rank)
        mine = ranges[self.pp_rank]
        stages = game.stage_list()
        if shard:
            for t, stage in enumerate(stages):
                if t not in mine:
                    stage.to("meta")
        self.meta = meta_copy(game)
        own = [stages[t] for t in mine]
        solvers = [StageSolver(s, opts.info, opts.curvature, zero_cross=opts.zero_cross,
                               coop_iters=opts.coop_iters, coop_tol=opts.coop_tol,
                               chunk_mb=opts.chunk_mb) for s in own]
        pp = dims.pp
        self.shard = Shard(
            own, solvers, mine.start,
            dims.rank_of(self.pp_rank - 1, self.dp_rank) if self.pp_rank > 0 else None,
            dims.rank_of(self.pp_rank + 1, self.dp_rank) if self.pp_rank < pp - 1 else None,
            Link(ByteCounter(), ctx.device), opts, reducer, dims.dp,
            feedback_ahead=feedback_ahead)
        params = [p for s in own for pl in s.players for p in pl.parameters()]
        defaults = {"lr": opts.lr, "damping": opts.damping, "weight_decay": opts.weight_decay,
                    "feedback_scale": opts.feedback_scale, "dgn_step": 0, "skipped": 0}
        self.optimizer = PipelineOptimizer(params or [nn.Parameter(torch.zeros(0))], defaults)
        self._specs: dict[tuple[Any, ...], Specs] = {}
        self._times = dict.fromkeys(PASSES, 0.0)
        self._steps = 0
        self._activation_bytes = 0
        self._ahead: lookahead.Lookahead | None = None  # ranks before the last
        self._ahead_of: Tensor | None = None  # the batch run ahead for (every rank)
        self._buffers = running_buffers(list(own))

    # -- helpers -----------------------------------------------------------------------
    def _sizes(self, rows: int, micro_batches: int) -> list[int]:
        if rows < 1:
            raise ValueError("the batch is empty")
        m = min(micro_batches, rows)
        return [len(c) for c in torch.arange(rows).tensor_split(m)]

    def _spec_map(self, x: Tensor, sizes: list[int]) -> dict[int, Specs]:
        out = {}
        for s in set(sizes):
            key = (tuple(x.shape[1:]), x.dtype, s)
            if key not in self._specs:
                self._specs[key] = state_specs(self.meta, x.shape[1:], x.dtype, s)
            out[s] = self._specs[key]
        return out

    def _allreduce(self, values: list[float],
                   meanwhile: Callable[[], None] | None = None) -> list[float]:
        """Sum ``values`` over the job; ``meanwhile`` runs while the sum is in flight (and
        the forward's ``A`` statistics while it is awaited)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.ctx.device)
        work = None
        if self.ctx.distributed and self.ctx.world_size > 1:
            self.shard.link.counter.add("control", t.numel() * t.element_size())
            work = dist.all_reduce(t, async_op=True)
        if meanwhile is not None:
            meanwhile()
        if work is not None:
            self.shard.link.wait([work], idle=self.shard.input_tasks)
        return t.tolist()

    def _skip(self, reason: str) -> None:
        skip_step(self.optimizer.param_groups[0], reason, "pipelined DGNOpt")

    # -- training ----------------------------------------------------------------------
    def train_step(self, x: Tensor, y: Tensor, next_x: Tensor | None = None) -> StepResult:
        """One DGNOpt iteration on this dp replica's batch ``x [B, ...]``, ``y [B]``.

        Every rank of a pipeline passes the same batch (only the first rank reads ``x`` and
        only the last reads ``y``); dp replicas pass equal-sized shards. Collective: every
        rank of the job must call it.

        ``next_x``: the batch of the next call, when known (every rank passes it or none
        does). The ranks before the last then run its forward pass while the last rank
        finishes this step's update (:mod:`dgn_dist.pipeline.lookahead`); the results are
        unchanged. A next call with another batch drops that forward and runs its own.
        """
        if self._ahead_of is not None and not lookahead.same_batch(x, self._ahead_of):
            self.drop_lookahead()  # another batch than announced: the forward is run again
        self._ahead_of = None
        group = self.optimizer.param_groups[0]
        step, sh = int(group["dgn_step"]), self.shard
        dev = self.ctx.device
        if sh.prev is None:
            x = x.to(dev)
        if sh.next is None:
            y = y.to(dev)
        sizes = self._sizes(x.shape[0], self.micro_batches)
        specs = self._spec_map(x, sizes)
        r = factor_rank(self.opts.vxx, self.opts.rank, specs[sizes[0]][-1][0].shape[1]) \
            if self.opts.use_factors else 0
        self.game.train()
        tick = time.perf_counter()
        boundary = snapshot(self._buffers)  # running statistics, kept on a skip
        ahead, self._ahead = self._ahead, None
        if ahead is not None:  # run by the previous call (ranks before the last only)
            traj, sums, sh.input_tasks, sh.kept_rows = ahead.traj, ahead.sums, ahead.tasks, \
                ahead.rows
            load(self._buffers, ahead.buffers)
        else:
            sums = self._input_sums()
            traj = sh.forward(x if sh.prev is None else None, sizes, specs, input_stats=sums,
                              step=step, keep_rows=self.mode == "stale_k")
        self._activation_bytes = sum(t.numel() * t.element_size() for tr in traj
                                     for st in tr for t in st)
        tock = time.perf_counter()
        self._times["forward"] += tock - tick
        with torch.enable_grad(), frozen_batchnorm(self.game):
            sols = sh.sweep(traj, y if sh.next is None else None, sizes, specs, r, step,
                            float(group["damping"]), float(group["weight_decay"]),
                            self.mode == "stale_k", input_stats=sums,
                            feedback_scale=float(group["feedback_scale"]))
        term = sh.terminal if sh.next is None else None
        shared = [term.loss_sum if term else 0.0, term.correct if term else 0,
                  term.count if term else 0, float(sols is None)]
        # Gradient clipping needs the global ‖Q_θ‖ before any update, so the ranks agree after
        # the sweep. Otherwise that agreement joins the update's: a barrier here would hold
        # the first ranks until the last rank's finish_stage is done, although their update
        # pass needs nothing from it. A rank whose sweep failed then sends NaN δX on (every
        # later rank fails its update too) and every rank restores its parameters below.
        early = self.grad_clip > 0
        failed = bad = 0.0
        lr = float(group["lr"])
        if early:
            qnorm = 0.0 if sols is None else sum(float(q.double().pow(2).sum())
                                                 for s in sols for q in s.q_theta)
            loss_sum, correct, count, failed, qnorm = self._allreduce([*shared, qnorm])
            lr *= min(1.0, self.grad_clip / max((qnorm / self.dims.dp) ** 0.5, 1e-30))
        self._times["sweep"] += time.perf_counter() - tock
        tock = time.perf_counter()
        self._steps += 1
        res = None
        ran_ahead = False
        if failed:  # no update this step: release the feedback forwards run ahead
            sh.drop_feedback_forwards()
        else:
            with frozen_batchnorm(self.game):
                res = sh.update(traj, sols, sizes, specs, lr=lr,
                                feedback_scale=float(group["feedback_scale"]))
            ran_ahead = next_x is not None and self.dims.pp > 1
            # The closing agreement waits for the last rank's update: the ranks before it run
            # the next step's forward meanwhile (``next_x``).
            meanwhile = partial(self._run_ahead, next_x, step + 1) \
                if next_x is not None and ran_ahead and sh.next is not None else None
            if early:
                (bad,) = self._allreduce([float(not res.finite)], meanwhile)
            else:
                loss_sum, correct, count, failed, bad = self._allreduce(
                    [*shared, float(not res.finite)], meanwhile)
        self._times["update"] += time.perf_counter() - tock
        result = StepResult(loss_sum / max(count, 1), int(correct), int(count))
        if failed or bad:
            if res is not None:
                restore(res.backups)
            load(self._buffers, boundary)  # no NaN running statistics either
            if ran_ahead:  # run at the parameters just restored: void
                self._ahead_of = next_x
                self.drop_lookahead()
            self._skip("non-finite loss gradient, statistic or gain" if failed
                       else "non-finite update")
            return StepResult(result.loss, result.correct, result.count, True)
        assert sols is not None
        sh.k_prev = [s.k for s in sols]
        group["dgn_step"] += 1
        self._ahead_of = next_x if ran_ahead else None
        return result

    def _input_sums(self) -> list[StreamedStats] | None:
        """Where the forward sums the Kronecker ``A`` statistics: ranks before the last take
        them from the forward pass and sum them while their sweep waits for the later ranks
        (Shard.forward); the last rank -- and one process -- keep them in the sweep
        (stale_k: in finish_stage)."""
        sh = self.shard
        return [StreamedStats() for _ in sh.stages] if sh.next is not None and \
            self.opts.use_factors and self.opts.curvature in ("kfac", "ekfac") else None

    def _run_ahead(self, next_x: Tensor, step: int) -> None:
        """The forward of the next step's batch (a rank before the last), its sends left
        posted; the BatchNorm running statistics are put back until that step uses it."""
        sh = self.shard
        tick = time.perf_counter()
        if sh.prev is None:
            next_x = next_x.to(self.ctx.device)
        sizes = self._sizes(next_x.shape[0], self.micro_batches)
        before = snapshot(self._buffers)
        sums = self._input_sums()
        traj = sh.forward(next_x if sh.prev is None else None, sizes,
                          self._spec_map(next_x, sizes), input_stats=sums, step=step,
                          flush=False, keep_rows=self.mode == "stale_k")
        after = snapshot(self._buffers)
        load(self._buffers, before)
        self._ahead = lookahead.Lookahead(traj, sums, sh.input_tasks, after, sh.kept_rows)
        spent = time.perf_counter() - tick  # counted as forward time, not the update's
        self._times["forward"] += spent
        self._times["update"] -= spent

    def drop_lookahead(self) -> None:
        """Void the forward the ranks before the last ran ahead for the next call (see
        ``train_step``'s ``next_x``): they forget it, and the last rank receives and discards
        the activations it was sent, so that the next step's messages match again. Called
        by the loads and when the next call brings another batch; a no-op when none is
        pending. Collective over the pipeline."""
        sh, next_x = self.shard, self._ahead_of
        if next_x is None:
            return
        self._ahead_of, self._ahead = None, None
        sh.input_tasks, sh.kept_rows = [], {}
        if sh.next is None and sh.prev is not None:
            sizes = self._sizes(next_x.shape[0], self.micro_batches)
            specs = self._spec_map(next_x, sizes)
            for _, handle in [sh.link.recv(specs[s][sh.t0], sh.prev, "forward")
                              for s in sizes]:
                sh.link.wait(handle)
        sh.link.flush()

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Logits of ``x`` (eval mode, no parameter change), returned on every rank of the
        pipeline; collective over the pipeline group."""
        was = self.game.training
        self.game.eval()
        try:
            x = x.to(self.ctx.device)
            sizes = self._sizes(x.shape[0], self.micro_batches)
            specs = self._spec_map(x, sizes)
            traj = self.shard.forward(x if self.shard.prev is None else None, sizes, specs,
                                      kind="predict")
        finally:
            self.game.train(was)
        out = specs[sizes[0]][-1][0]
        if self.shard.next is None:
            logits = torch.cat([tr[-1][0] for tr in traj])
        else:
            logits = torch.empty((x.shape[0], *out.shape[1:]), dtype=out.dtype,
                                 device=self.ctx.device)
        if self.dims.pp > 1:
            src = self.dims.rank_of(self.dims.pp - 1, self.dp_rank)
            self.shard.link.counter.add("predict", logits.numel() * logits.element_size())
            dist.broadcast(logits, src=src, group=self.pp_group)
        return logits

    # -- state -------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, Tensor]:
        """The whole model's ``state_dict`` (CPU tensors) on every rank; collective over the
        pipeline group."""
        return gather_model_state(self.model, self.dims.pp, self.pp_group)

    def load_full_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load a whole-model ``state_dict`` (each rank copies the entries it holds); the
        ``stale_k`` gain of the previous step is forgotten (the next step runs exact).

        Raises:
            KeyError: ``state`` lacks entries of the model.
        """
        self.drop_lookahead()
        load_model_state(self.model, state)
        self.shard.k_prev = None

    def optimizer_state_dict(self) -> dict[str, Any]:
        """Hyper-parameters, every stage's curvature state and ``stale_k`` gains, on every
        rank (collective over the pipeline group; see :mod:`dgn_dist.pipeline.state`)."""
        return gather_optimizer_state(self.shard, self.optimizer.param_groups[0],
                                      self.dims.pp, self.pp_group)

    def load_optimizer_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`optimizer_state_dict` (each rank loads its stages)."""
        self.drop_lookahead()
        load_optimizer_state(self.shard, self.optimizer.param_groups[0], state,
                             self.ctx.device)

    # -- statistics --------------------------------------------------------------------
    def local_stats(self) -> dict[str, float]:
        """This rank's per-step means since the last :meth:`comm_stats`, and memory."""
        steps = max(self._steps, 1)
        link = self.shard.link.counter.bytes
        allreduce = getattr(self.reducer, "counter", None)
        out = {f"time/{p}": self._times[p] / steps for p in PASSES}
        out["time/p2p_wait"] = self.shard.link.waited / steps
        sh = self.shard
        out["overlap/feedback_ahead"] = sh.feedback_forwards_ahead / max(sh.feedback_forwards, 1)
        out.update({f"comm/{p}_bytes": link.get(p, 0) / steps
                    for p in (*PASSES, "predict", "control")})
        out["comm/allreduce_bytes"] = (allreduce.total if allreduce else 0) / steps
        params = [p for s in self.shard.stages for p in s.parameters()]
        out["memory/params_bytes"] = float(sum(p.numel() * p.element_size() for p in params))
        out["memory/curvature_bytes"] = float(sum(
            t.numel() * t.element_size() for s in self.shard.solvers
            for t in s.state().values()))
        out["memory/activations_bytes"] = float(self._activation_bytes)
        out["memory/peak_rss_bytes"] = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                             * 1024)
        return out

    def comm_stats(self, reset: bool = True) -> dict[str, float]:
        """Per-step time and bytes of every rank, gathered (collective over the job).

        Returns:
            ``{key}/rank{r}`` for every rank and key of :meth:`local_stats`, plus ``{key}``:
            the maximum over ranks for times and memory, the sum for bytes.
        """
        mine = self.local_stats()
        every: list[Any] = [mine]
        if self.ctx.distributed and self.ctx.world_size > 1:
            every = [None] * self.ctx.world_size
            dist.all_gather_object(every, mine)
        out: dict[str, float] = {}
        for key in mine:
            vals = [float(e[key]) for e in every]
            out[key] = sum(vals) if key.startswith("comm/") else max(vals)
            out.update({f"{key}/rank{r}": v for r, v in enumerate(vals)})
        if reset:
            self._times = dict.fromkeys(PASSES, 0.0)
            self._steps = 0
            self.shard.link.counter.reset()
            self.shard.link.waited = 0.0
            self.shard.feedback_forwards = self.shard.feedback_forwards_ahead = 0
            if allreduce := getattr(self.reducer, "counter", None):
                allreduce.reset()
        return out


def build_pipeline_runner(model: nn.Module, optimizer_kwargs: Mapping[str, Any],
                          ctx: DistContext, dims: ParallelDims, *, micro_batches: int = 1,
                          mode: str = "exact", partition: str = "uniform",
                          game: Game | None = None, grad_clip: float = 0.0,
                          bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                          grad_worker_fraction: float = 1.0,
                          shard: bool = True, feedback_ahead: bool = True) -> PipelineRunner:
    """Build the pipelined DGNOpt of ``model`` on every rank (collective: builds the mesh).

    Args:
        model: the network, already on ``ctx.device``, with the same initial parameters on
            every rank (e.g. same seed); with ``shard`` the stages of other ranks move to the
            meta device, so move or wrap the model before this call, never after.
        optimizer_kwargs: DGNOpt keyword arguments (``dgn_dist.dgnopt.dgnopt_kwargs(cfg)``).
        ctx: the process's :class:`~dgn_dist.distributed.env.DistContext`.
        dims: the checked ``pp × dp`` degrees (``dims.world_size == ctx.world_size``).
        micro_batches: micro-batches per step and replica (``parallel.micro_batches``).
        mode: ``"exact"`` or ``"stale_k"`` (``parallel.pipeline_mode``).
        partition: ``"uniform"``, ``"params"`` or stage counts ``"a,b"``.
        game: the game of ``model`` (built with ``optimizer_kwargs['alignment']`` if None).
        grad_clip: > 0: scale the step by ``min(1, grad_clip / ‖Q_θ‖)`` (all players).
        bucket_bytes: dp all-reduce bucket size.
        grad_worker_fraction: KAISA fraction of the dp reducer.
        shard: move the other ranks' stages to the meta device (frees their memory).
        feedback_ahead: run the update pass's feedback forwards in the waits of the sweep
            and the update (``parallel.feedback_ahead``; same results, faster, their graphs
            held until the update).

    Raises:
        ValueError: invalid options, mode, partition or degrees (the message says what to
            change).
    """
    from dgn_dist.distributed.dgnopt_dp import DataParallelReducer

    opts = make_options(optimizer_kwargs)
    check_mode(mode, micro_batches)
    if game is None:
        game = build_game(model, opts.alignment)  # type: ignore[arg-type]
    ranges = partition_stages(game, dims.pp, partition)
    if dims.world_size != ctx.world_size:
        raise ValueError(f"dims were checked for {dims.world_size} processes but the job has "
                         f"{ctx.world_size}; build ParallelDims from the launched world size")
    reducer: Reducer = LOCAL
    pp_group = None
    if ctx.distributed and ctx.world_size > 1:
        mesh = build_device_mesh(ctx, dims)
        pp_group = mesh["pp"].get_group()
        if dims.dp > 1:
            reducer = DataParallelReducer(mesh["dp"].get_group(), bucket_bytes,
                                          grad_worker_fraction, dp_groups=dims.dp_groups())
    return PipelineRunner(model, game, ranges, ctx, dims, opts, micro_batches=micro_batches,
                          mode=mode, reducer=reducer, pp_group=pp_group, shard=shard,
                          grad_clip=grad_clip, feedback_ahead=feedback_ahead)
