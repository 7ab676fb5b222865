"""The three passes of one pipelined DGNOpt iteration on one rank (DESIGN.md §4).

A :class:`Shard` is this rank's contiguous range of stages ``t0 … t1-1`` with their curvature
solvers, its pipeline neighbours and its transport. Per iteration, with ``M`` micro-batches:

1. :meth:`Shard.forward` (GPipe fill-drain): receive ``X_t0`` per micro-batch, run the range,
   keep the inputs, send ``X_t1`` on (BatchNorm running statistics update here, once).
2. :meth:`Shard.sweep`: the last rank forms ``V_x^T`` and the terminal factors (eq. 13/27);
   every rank receives ``V_x`` ``[mb, *state]`` and ``U`` ``[mb, r, *state]`` for every state
   tensor of its boundary and micro-batch, sweeps its stages and sends ``V_x^t0``, ``U^t0``
   back. ``exact``: the whole local batch at once through
   :func:`dgn_dist.dgnopt.sweep.sweep_stage` (bulk-synchronous; equals one process).
   ``stale_k``: each micro-batch is propagated as soon as it arrives with the previous
   iteration's ``k`` and curvature (:mod:`dgn_dist.pipeline.passes`), then the fresh ``k``
   is solved from the whole batch.
3. :meth:`Shard.update`: receive ``δX_t0``, apply ``θ ← θ − lr (k + K δX)`` over the range,
   send ``δX_t1`` on.

A non-finite quantity never stops the message flow: the rank sends NaN buffers of the agreed
shapes, so every rank downstream fails the same step and the runner skips it collectively.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from dgn_dist.dgnopt.capture import PlayerTap
from dgn_dist.dgnopt.gains import NonFiniteUpdate, StageSolver
from dgn_dist.dgnopt.reduction import Reducer
from dgn_dist.dgnopt.streamed import StreamedStats, input_blocks_due
from dgn_dist.dgnopt.sweep import StageSolution, SweepOptions, sweep_stage
from dgn_dist.dgnopt.terminal import terminal_factors
from dgn_dist.dgnopt.update_pass import FeedbackPrimal
from dgn_dist.game.core import Stage, State
from dgn_dist.pipeline.comm import (
    IdleQueue,
    Link,
    TensorSpec,
    cat_rows,
    factor_specs,
    split_rows,
)
from dgn_dist.pipeline.options import PipelineOptions
from dgn_dist.pipeline.passes import (
    RangeUpdate,
    StreamedStage,
    feedback_primals,
    finish_stage,
    stream_stage,
)
from dgn_dist.pipeline.passes import update_range as _update_range

Specs = list[list[TensorSpec]]  # per state X_0..X_T, per tensor of the tuple


@dataclass
class InputTask:
    """The ``A`` statistics of one (local stage, micro-batch) of the forward pass, queued."""

    key: tuple[int, int]
    run: Callable[[], None]

    def __call__(self) -> None:
        self.run()


@dataclass
class Terminal:
    """The last rank's loss statistics of the local batch."""

    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0


@dataclass
class Shard:
    """One pipeline rank's stages, solvers and neighbours.

    Attributes:
        stages: the stages ``t0 … t1-1``.
        solvers: their curvature solvers.
        t0: global index of the first stage.
        prev: global rank of the previous pipeline rank (``None`` on the first).
        next: global rank of the next pipeline rank (``None`` on the last).
        link: the transport (and its byte counter).
        opts: DGNOpt hyper-parameters.
        reducer: reductions over this stage range's dp group.
        dp: data-parallel degree (the global batch is ``dp`` times the local one).
        feedback_ahead: run the update pass's feedback forwards in the waits.
    """

    stages: list[Stage]
    solvers: list[StageSolver]
    t0: int
    prev: int | None
    next: int | None
    link: Link
    opts: PipelineOptions
    reducer: Reducer
    dp: int
    #: Run the update pass's feedback forwards in the waits (``parallel.feedback_ahead``).
    feedback_ahead: bool = True
    k_prev: list[list[Tensor]] | None = None
    terminal: Terminal = field(default_factory=Terminal)
    #: The forward pass's ``A`` statistics, not yet summed: run while the sweep waits.
    input_tasks: list[Callable[[], None]] = field(default_factory=list)  # InputTask items
    #: Kronecker input rows those tasks formed, by (local stage, micro-batch) and player,
    #: for the ``stale_k`` stream to reuse (:meth:`forward`'s ``keep_rows``).
    kept_rows: dict[tuple[int, int], dict[int, Tensor]] = field(default_factory=dict)
    #: The update pass's feedback forwards (:func:`~.passes.feedback_primals`), run in the
    #: waits of the sweep and the update after the ``A`` tasks, and what they ran, by local
    #: stage (released by :meth:`update`).
    ahead_tasks: list[Callable[[], None]] = field(default_factory=list)
    primals: dict[int, FeedbackPrimal] = field(default_factory=dict)
    #: Feedback forwards the updates needed, and how many of them ran ahead (since reset).
    feedback_forwards: int = 0
    feedback_forwards_ahead: int = 0

    # -- forward -----------------------------------------------------------------------
    def forward(self, x: Tensor | None, sizes: Sequence[int], specs: dict[int, Specs],
                kind: str = "forward", input_stats: list[StreamedStats] | None = None,
                step: int = 0, flush: bool = True, keep_rows: bool = False) -> list[list[State]]:
        """GPipe forward over the micro-batches; returns ``traj[m][i] = X_{t0+i}``.

        ``input_stats`` (training, one per stage): the Kronecker ``A`` statistics of step
        ``step`` come from this forward's player inputs. They are queued in
        :attr:`input_tasks`, which the sweep runs while it waits for the later ranks (and
        finishes before it reads them), instead of computing them from a second im2col.
        ``flush=False`` leaves the sends posted (a forward run ahead of its step, whose
        receiver posts its receives later: :mod:`dgn_dist.pipeline.lookahead`); the next
        pass's flush waits for them. ``keep_rows`` (``stale_k``): those tasks keep the input
        rows they form in :attr:`kept_rows`, so the stream of the same micro-batch does not
        form them a second time (memory: the rows of every micro-batch until it streams)."""
        t1 = self.t0 + len(self.stages)
        recvs = [self.link.recv(specs[s][self.t0], self.prev, kind) for s in sizes] \
            if self.prev is not None else []
        chunks = x.split(list(sizes)) if x is not None else ()
        traj: list[list[State]] = []
        taps: list[tuple[int, int, PlayerTap, int]] = []
        with torch.no_grad():
            for m in range(len(sizes)):
                if self.prev is None:
                    state: State = (chunks[m],)
                else:
                    bufs, handle = recvs[m]
                    self.link.wait(handle)
                    state = tuple(bufs)
                states = [state]
                for i, stage in enumerate(self.stages):
                    if input_stats is None:
                        state = stage(state)
                    else:  # record the players' inputs; the statistics follow below
                        with PlayerTap([v.player for v in self.solvers[i].views]) as tap:
                            state = stage(state)
                        taps.append((i, m, tap, int(sizes[m])))
                    states.append(state)
                traj.append(states)
                if self.next is not None:
                    self.link.send(state, self.next, kind)
        if flush:
            self.link.flush()
        # Queued, not run: the sweep runs them while it waits for the later ranks' messages
        # (``Link.wait(..., idle=...)``), so neither the next rank nor this rank's sweep
        # waits for them.
        # The blocks are marked now: the sweep then adds only their G, whether or not their
        # A has been summed by the time it reaches them.
        due = step % self.opts.factor_interval == 0
        if input_stats is not None:
            for i, solver in enumerate(self.solvers):
                input_stats[i].input_blocks |= input_blocks_due(solver.blocks, due)
            self.kept_rows = {(i, m): {} for i, m, _, _ in taps} if keep_rows else {}
        self.input_tasks = [InputTask((i, m), partial(
            self.solvers[i].accumulate_inputs, input_stats[i], tap, num,  # type: ignore[index]
            update_factors=due, refresh=step % self.opts.inverse_interval == 0,
            keep=self.kept_rows.get((i, m)))) for i, m, tap, num in taps]
        assert len(traj[0]) == t1 - self.t0 + 1
        return traj

    def _kept_rows(self, i: int, m: int) -> dict[int, Tensor] | None:
        """The input rows the forward formed for stage ``i``, micro-batch ``m`` (``None``
        where none are kept). A task the waits left over runs now: its rows are formed once,
        and each stage still adds its micro-batches in order."""
        rows = self.kept_rows.pop((i, m), None)
        if rows is not None and not rows:
            due = [n for n, task in enumerate(self.input_tasks)
                   if isinstance(task, InputTask) and task.key == (i, m)]
            if due:
                self.input_tasks.pop(due[0])()
        return rows

    def _idle(self) -> IdleQueue:
        """What the sweep's waits run: the ``A`` tasks, then the feedback forwards."""
        return IdleQueue(self.input_tasks, self.ahead_tasks)

    def _feedback_stages(self, feedback_scale: float) -> list[int]:
        """The local stages whose update runs a feedback term: with ``Q_θx`` kept (the
        ``V_xx`` factors travel then) and a non-zero scale, every one after the game's first
        (whose ``δX`` is 0)."""
        o = self.opts
        if not (o.feedback and o.use_factors and feedback_scale != 0.0):
            return []
        return [i for i in range(len(self.stages)) if self.t0 + i > 0]

    def _queue_feedback_forwards(self, full: list[State], feedback_scale: float) -> None:
        """Queue the update pass's feedback forwards of this step (the last stage first: on
        a ResNet its activations are the smallest). They hold their autograd graphs until
        :meth:`update`."""
        self.primals = {}
        self.ahead_tasks = []
        if self.feedback_ahead:
            which = self._feedback_stages(feedback_scale)[::-1]
            self.ahead_tasks = feedback_primals(self.stages, self.solvers, full, which,
                                                self.primals)

    def drop_feedback_forwards(self) -> None:
        """Release the feedback forwards run ahead (and those still queued)."""
        self.ahead_tasks, self.primals = [], {}

    def _finish_input_tasks(self) -> None:
        """Run the ``A`` statistics the waits of the sweep left over (before they are read)."""
        while self.input_tasks:
            self.input_tasks.pop(0)()

    # -- backward sweep ----------------------------------------------------------------
    def _terminal(self, logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None, bool]:
        """``V_x^T`` (global-batch convention, :mod:`dgn_dist.dgnopt.reduction`) and the
        terminal factors of this replica's rows; records the loss statistics."""
        lg = logits.detach().requires_grad_(True)
        loss = F.cross_entropy(lg, y)
        (v_x,) = torch.autograd.grad(loss, lg)
        num = logits.shape[0]
        correct = int((logits.argmax(1) == y).sum())
        self.terminal = Terminal(float(loss.detach()) * num, correct, num)
        finite = bool(torch.isfinite(v_x).all() & torch.isfinite(logits).all())
        v_x = v_x / self.dp
        u = terminal_factors(logits, v_x, self.opts.vxx, self.opts.rank,
                             batch_size=num * self.dp) if self.opts.use_factors else None
        return v_x, u, finite

    def _sweep_opts(self, step: int, damping: float, weight_decay: float,
                    examples: int) -> SweepOptions:
        o = self.opts
        return SweepOptions(feedback=o.feedback, use_factors=o.use_factors,
                            weight_decay=weight_decay, damping=damping, decay=o.ema_decay,
                            update_factors=step % o.factor_interval == 0,
                            refresh=step % o.inverse_interval == 0, record=False,
                            rescale=o.rescaled, reducer=self.reducer, examples=examples)

    def _message_specs(self, specs: Specs, index: int, r: int) -> list[TensorSpec]:
        states = specs[index]
        return states + (factor_specs(states, r) if self.opts.use_factors else [])

    def _unpack(self, tensors: Sequence[Tensor]) -> tuple[State, State | None]:
        n = len(tensors) // 2 if self.opts.use_factors else len(tensors)
        return tuple(tensors[:n]), (tuple(tensors[n:]) if self.opts.use_factors else None)

    def _send_nan(self, specs: Specs, r: int) -> None:
        """One sweep message of NaN buffers (tells the previous rank the step failed)."""
        assert self.prev is not None
        self.link.send([torch.full(t.shape, float("nan"), dtype=t.dtype,
                                   device=self.link.device)
                        for t in self._message_specs(specs, self.t0, r)], self.prev, "sweep")

    def _send_back(self, vx: State | None, u: State | None, sizes: Sequence[int],
                   specs: dict[int, Specs], r: int) -> None:
        """Send ``V_x^t0``, ``U^t0`` per micro-batch (NaN buffers after a failure)."""
        if self.prev is None:
            return
        if vx is None:
            for s in sizes:
                self._send_nan(specs[s], r)
            return
        parts_v = split_rows(vx, sizes)
        parts_u = split_rows(u, sizes) if u is not None else [()] * len(sizes)
        for pv, pu in zip(parts_v, parts_u, strict=True):
            self.link.send([*pv, *pu], self.prev, "sweep")

    def sweep(self, traj: list[list[State]], y: Tensor | None, sizes: Sequence[int],
              specs: dict[int, Specs], r: int, step: int, damping: float,
              weight_decay: float, stale: bool,
              input_stats: list[StreamedStats] | None = None,
              feedback_scale: float = 1.0) -> list[StageSolution] | None:
        """The backward sweep of the range (module docstring); ``None`` when it failed.
        ``input_stats``: what :meth:`forward` summed this step (one per stage);
        ``feedback_scale``: the update's (0: no feedback forwards are run ahead)."""
        sums: list[StreamedStats | None] = list(input_stats) if input_stats is not None \
            else [None] * len(self.stages)
        opts = self._sweep_opts(step, damping, weight_decay, sum(sizes))
        t1 = self.t0 + len(self.stages)
        recvs = [self.link.recv(self._message_specs(specs[s], t1, r), self.next, "sweep")
                 for s in sizes] if self.next is not None else []
        full = [cat_rows([tr[i] for tr in traj]) for i in range(len(self.stages) + 1)]
        self._queue_feedback_forwards(full, feedback_scale)
        terminal: tuple[State, State | None] | None = None
        ok = True
        if self.next is None:
            assert y is not None
            v_x, u, ok = self._terminal(full[-1][0], y)
            ok = self.reducer.agree(ok)  # skip decisions stay collective in the dp group
            terminal = ((v_x,), (u,) if u is not None else None)
        if stale and self.k_prev is not None and ok:
            return self._stream(traj, full, recvs, terminal, sizes, specs, r, opts, sums)
        self.kept_rows = {}  # only the stream reads them
        if self.next is not None:
            msgs = []
            for bufs, handle in recvs:
                self.link.wait(handle, idle=self._idle())
                msgs.append(self._unpack(bufs))
            vx: State = cat_rows([m[0] for m in msgs])
            u_in = cat_rows([m[1] for m in msgs]) if self.opts.use_factors else None  # type: ignore[misc]
            terminal = (vx, u_in)
        self._finish_input_tasks()
        assert terminal is not None
        vx_t, u_t = terminal
        solutions: list[StageSolution] = [None] * len(self.stages)  # type: ignore[list-item]
        try:
            if not ok:
                raise NonFiniteUpdate("non-finite loss gradient")
            for i in reversed(range(len(self.stages))):
                sol, vx_prev, u_prev = sweep_stage(self.stages[i], self.solvers[i], full[i],
                                                   vx_t, u_t, opts, need_value=self.t0 + i > 0,
                                                   streamed=sums[i])
                # agreed over the dp replicas (they skip the update's reductions together)
                if not self.reducer.agree(not sol.k or bool(torch.stack(
                        [torch.isfinite(k).all() for k in sol.k]).all())):
                    raise NonFiniteUpdate(f"non-finite open gain at stage {self.stages[i].name}")
                solutions[i] = sol
                if vx_prev is not None:
                    vx_t, u_t = vx_prev, u_prev
        except NonFiniteUpdate:
            self.drop_feedback_forwards()
            self._send_back(None, None, sizes, specs, r)
            self.link.flush()
            return None
        self._send_back(vx_t, u_t, sizes, specs, r)
        self.link.flush()
        return solutions

    def _stream(self, traj: list[list[State]], full: list[State], recvs: list,
                terminal: tuple[State, State | None] | None, sizes: Sequence[int],
                specs: dict[int, Specs], r: int, opts: SweepOptions,
                sums: list[StreamedStats | None]) -> list[StageSolution] | None:
        """``stale_k``: propagate each micro-batch on arrival, then solve the fresh gains."""
        assert self.k_prev is not None
        # Without the forward's A sums (the last rank) A waits for finish_stage: off the
        # critical path, which runs through this rank's stream.
        accs = [StreamedStage(defer_inputs=True) if s is None else StreamedStage(stats=s)
                for s in sums]
        if terminal is not None:
            tv = split_rows(terminal[0], sizes)
            tu = split_rows(terminal[1], sizes) if terminal[1] is not None else None
        failed = False
        for m in range(len(sizes)):
            if terminal is not None:
                vx_t: State = tv[m]
                u_t: State | None = tu[m] if tu is not None else None
            else:
                bufs, handle = recvs[m]
                self.link.wait(handle, idle=self._idle())
                vx_t, u_t = self._unpack(bufs)
            # A NaN message means a later rank failed this step: pass the news on.
            failed = failed or not all(bool(torch.isfinite(t).all())
                                       for t in (*vx_t, *(u_t or ())))
            if failed:
                if self.prev is not None:
                    self._send_nan(specs[sizes[m]], r)
                continue
            for i in reversed(range(len(self.stages))):
                vx_p, u_p = stream_stage(self.stages[i], self.solvers[i], traj[m][i], vx_t, u_t,
                                         self.k_prev[i], opts, self.t0 + i > 0, accs[i],
                                         a_rows=self._kept_rows(i, m))
                if vx_p is not None:
                    vx_t, u_t = vx_p, u_p
            if self.prev is not None:
                self.link.send([*vx_t, *(u_t or ())], self.prev, "sweep")
        solutions: list[StageSolution] = [None] * len(self.stages)  # type: ignore[list-item]
        self.kept_rows = {}
        if failed:
            self.input_tasks.clear()
            self.drop_feedback_forwards()
            self.link.flush()
            return None
        self._finish_input_tasks()
        try:
            for i in reversed(range(len(self.stages))):
                solutions[i] = finish_stage(self.stages[i], self.solvers[i], full[i], accs[i],
                                            opts)
        except NonFiniteUpdate:
            self.drop_feedback_forwards()
            self.link.flush()
            return None
        self.link.flush()
        return solutions

    # -- update pass -------------------------------------------------------------------
    def update(self, traj: list[list[State]], solutions: list[StageSolution] | None,
               sizes: Sequence[int], specs: dict[int, Specs], *, lr: float,
               feedback_scale: float) -> RangeUpdate:
        """Apply the update over the range; receives ``δX_t0``, sends ``δX_t1``.
        ``solutions=None`` (this rank's sweep failed): nothing changes and NaN ``δX`` goes
        on, so that every later rank fails its update too."""
        full = [cat_rows([tr[i] for tr in traj]) for i in range(len(self.stages) + 1)]
        dx: State | None = None
        x_new = full[0]
        if solutions is None:
            self.drop_feedback_forwards()
        if self.prev is not None:
            recvs = [self.link.recv(specs[s][self.t0], self.prev, "update") for s in sizes]
            for _, handle in recvs:  # meanwhile the feedback forwards the sweep left over
                self.link.wait(handle, idle=self.ahead_tasks)
            dx = cat_rows([tuple(b) for b, _ in recvs])
            x_new = tuple(a + d for a, d in zip(full[0], dx, strict=True))
        primals = self.primals
        self.drop_feedback_forwards()  # their graphs go with update_range's use of them
        if solutions is not None:
            self.feedback_forwards += len(self._feedback_stages(feedback_scale))
            self.feedback_forwards_ahead += len(primals)
        res = _update_range(self.stages, self.solvers, full, solutions, x_new, dx, lr=lr,
                            feedback_scale=feedback_scale, feedback=self.opts.feedback,
                            reducer=self.reducer, ok=solutions is not None, primals=primals)
        if self.next is not None:
            for part in split_rows(res.dx, sizes):
                self.link.send(part, self.next, "update")
        self.link.flush()
        return res
