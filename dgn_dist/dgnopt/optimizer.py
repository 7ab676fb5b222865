"""DGNOpt as a ``torch.optim.Optimizer`` (Alg. 1; DESIGN.md sections 2-3).

Call sequence -- the ordinary PyTorch loop::

    opt = DGNOpt(model, lr=0.1, info="fne", curvature="kfac")
    logits = model(x)                    # forward pre-hook: keeps x (detached);
                                         # forward hook: keeps the logits and hooks their grad
    loss = F.cross_entropy(logits, y)
    opt.zero_grad()
    loss.backward()                      # tensor hook: keeps V_x^T = ∂loss/∂logits
    opt.step()                           # trajectory, backward sweep, update pass

The forward hook returns the logits as a new leaf tensor, so ``loss.backward()`` stops at
the logits: the back-propagation through the model that a first-order optimizer needs would
be thrown away here (``step`` recomputes everything it needs from ``x``), and skipping it
saves one backward pass per step (ResNet-18, batch 128, one CPU thread: 3.6 s) and frees the
forward's autograd graph at once. The parameters' ``.grad`` therefore stay unset; pass
``full_backward=True`` to keep the model's graph (``.grad`` filled, e.g. for a gradient-norm
log).

The hooks capture only forwards in training mode with grad enabled, and ``step`` consumes the
capture (a second ``step`` without a new forward/backward raises). ``step`` recomputes the
trajectory through the game (BatchNorm running statistics frozen: the model forward updated
them once), runs the backward sweep (:mod:`dgn_dist.dgnopt.sweep`) and the update pass
(:mod:`dgn_dist.dgnopt.update_pass`). ``.grad`` from ``loss.backward()`` is not used, so a
wrapper that owns ``backward`` (Accelerate's ``accelerator.backward``, DeepSpeed's engine)
works unchanged as long as the model forward runs through the hooked module; gradient
accumulation over several forwards is not supported (the last forward wins). The loss must be
``mean_b CE`` (or anything whose logits gradient is ``V_x^T``; the terminal ``V_xx`` factors
assume cross-entropy, DESIGN.md section 3).

A non-finite ``V_x^T``, curvature statistic or update skips the step with a warning and
multiplies the damping by 10; parameters are never left non-finite. Non-finite input data
raises ``ValueError``. ``damping`` lives in ``param_groups[0]["damping"]`` so a schedule can
change it like the learning rate.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from dgn_dist.dgnopt.alignment import AlignmentHook, check_alignments
from dgn_dist.dgnopt.baselines import DiagRule, kl_clip_scale
from dgn_dist.dgnopt.capture import frozen_batchnorm, load, running_buffers, snapshot
from dgn_dist.dgnopt.gains import StageSolver, all_finite
from dgn_dist.dgnopt.options import check_options
from dgn_dist.dgnopt.reduction import LOCAL, Reducer
from dgn_dist.dgnopt.skips import skip_step
from dgn_dist.dgnopt.stats import tag, to_floats, value_stats
from dgn_dist.dgnopt.sweep import StageSolution, SweepOptions, sweep_stage
from dgn_dist.dgnopt.terminal import terminal_factors
from dgn_dist.dgnopt.update_pass import NonFiniteUpdate, update_pass
from dgn_dist.game import Game, build_game
from dgn_dist.game.core import State

#: Prefixes of the solver state kept in ``state`` (one alignment / several alignments).
_STATE_PREFIXES = ("dgn.", "dgn@")


class DGNOpt(Optimizer):
    """Dynamic Game Theoretic Neural Optimizer (Liu, Chen & Theodorou, ICML 2021).

    Args:
        model: the network; its forward must return logits ``[B, C]``.
        lr: learning rate.
        info: ``"olne"`` (back-propagation baselines), ``"fne"`` or ``"gr"``.
        curvature: ``"identity"``, ``"diag"``, ``"kfac"`` or ``"ekfac"`` (``Q_θθ``).
        vxx: terminal ``V_xx`` factors, ``"empirical"``, ``"sampled"`` or ``"exact"``.
        rank: samples per example for ``vxx="sampled"``.
        damping: Tikhonov damping ``λ`` of ``Q_θθ``.
        ema_decay: EMA decay of the curvature statistics.
        factor_interval: update curvature statistics every N steps.
        inverse_interval: recompute eigenbases every N steps.
        weight_decay: ``wd`` of the stage cost ``ℓ = wd/2 ‖θ‖²``.
        feedback_scale: multiplies ``K δx`` in the update pass.
        alignment: residual-shortcut alignment used to build the game.
        game: a prebuilt game over ``model``'s modules (built from ``model`` when ``None``).
        zero_cross: ``gr`` with cross blocks zeroed (Theorem 6; ablations).
        zero_feedback: ``Q_θx := 0`` (Theorem 6; ablations).
        coop_iters: conjugate-gradient iterations of two-group cooperative solves.
        coop_tol: their relative tolerance.
        stats_every: record statistics on every N-th step (0 = never).
        rescale: with ``kfac``/``ekfac`` curvature, scale each block's curvature up where its
            quadratic model lies below the batch Gauss-Newton model along its step
            (:func:`dgn_dist.dgnopt.sweep.rescale_gains`); no effect where it is exact.
        alignments: build one game (with its own curvature solvers and state) per listed
            alignment; :meth:`set_alignment` picks the game of the next step (Alg. 2).
            ``None``: just ``alignment``. ``alignment`` is the one active first.
        game_extended: ``info="gr"``, ``curvature="identity"``: keep the Gauss-Newton cross
            blocks between fictitious copies of a layer (game-extended SGD, §5.2).
        diag_rule: ``curvature="diag"`` with a baseline's rule (RMSprop, Adam; Fig. 6).
        gain_scale: ``Q_θθ := Q_θθ / gain_scale`` (Fig. 6: a baseline's lr, run with lr 1).
        kl_clip: > 0: scale each whole step ``lr·(k + K δx)`` by EKFAC's KL-clipping factor
            (:func:`dgn_dist.dgnopt.baselines.kl_clip_scale`; Fig. 6 EKFAC, and the DIGITS
            recipe ``optim.dgnopt_kl_clip``).
        feedback_consistency: keep the open gain but scale the curvature of the feedback and
            value terms until it dominates the per-sample Gauss-Newton curvature
            (:func:`dgn_dist.dgnopt.sweep.feedback_consistency_scale`; Fig. 6 lifts, and
            ``game.feedback_consistency``: small batches at EKFAC's damping).
        chunk_mb: per-sample chunk budget in MiB (0 = per device, see
            :func:`dgn_dist.dgnopt.gains.chunk_elements`).
        full_backward: ``loss.backward()`` runs through the whole model (``.grad`` filled,
            unused by DGNOpt); ``False`` (default) cuts the graph at the logits (module
            docstring).

    Attributes:
        alignment_hook: ``None`` or an :class:`AlignmentHook` called around every step
            (before: choose the alignment; after: e.g. a bandit reward); saved in
            :meth:`state_dict`.
    """

    #: class default: a deep copy of a hooked model carries hooks bound to an optimizer
    #: copy that only has the ``Optimizer`` state (``Optimizer.__getstate__``)
    full_backward: bool = False

    def __init__(self, model: nn.Module, *, lr: float = 0.1, info: str = "fne",
                 curvature: str = "kfac", vxx: str = "empirical", rank: int = 1,
                 damping: float = 1e-3, ema_decay: float = 0.95, factor_interval: int = 1,
                 inverse_interval: int = 20, weight_decay: float = 0.0,
                 feedback_scale: float = 1.0, alignment: str = "second",
                 game: Game | None = None, zero_cross: bool = False,
                 zero_feedback: bool = False, coop_iters: int = 20, coop_tol: float = 1e-8,
                 stats_every: int = 0, rescale: bool = True,
                 alignments: Sequence[str] | None = None, game_extended: bool = False,
                 diag_rule: DiagRule | None = None, gain_scale: float = 1.0,
                 kl_clip: float = 0.0, feedback_consistency: bool = False,
                 chunk_mb: float = 0.0, full_backward: bool = False) -> None:
        check_options(lr=lr, info=info, curvature=curvature, vxx=vxx, rank=rank,
                      damping=damping, ema_decay=ema_decay, factor_interval=factor_interval,
                      inverse_interval=inverse_interval, weight_decay=weight_decay,
                      feedback_scale=feedback_scale, alignment=alignment,
                      coop_iters=coop_iters, coop_tol=coop_tol, stats_every=stats_every,
                      rescale=rescale, chunk_mb=chunk_mb, kl_clip=kl_clip,
                      feedback_consistency=feedback_consistency)
        names = check_alignments(alignment, alignments, game)
        self.games: dict[str, Game] = {
            a: game if game is not None else build_game(model, a)  # type: ignore[arg-type]
            for a in names}
        self.game = self.games[alignment]
        params = [p for p in model.parameters() if p.requires_grad]
        for a, g in self.games.items():
            owned = {id(p) for _, pl in g.players() for p in pl.parameters()}
            missing = [n for n, p in model.named_parameters()
                       if p.requires_grad and id(p) not in owned]
            if missing:
                raise ValueError(f"parameters {missing} belong to no player of the game "
                                 f"(alignment {a!r}); DGNOpt updates players only (freeze them "
                                 "or fix the game)")
        defaults = {"lr": lr, "damping": damping, "weight_decay": weight_decay,
                    "feedback_scale": feedback_scale, "dgn_step": 0, "skipped": 0}
        super().__init__(params, defaults)
        self.info, self.curvature, self.vxx, self.rank = info, curvature, vxx, rank
        self.ema_decay = ema_decay
        self.factor_interval, self.inverse_interval = factor_interval, inverse_interval
        self.zero_feedback = zero_feedback
        self.stats_every = stats_every
        self.rescale = rescale and curvature in ("kfac", "ekfac")
        self.game_extended = game_extended and info == "gr" and curvature == "identity"
        self.solver_sets: dict[str, list[StageSolver]] = {
            a: [StageSolver(s, info, curvature, zero_cross=zero_cross, coop_iters=coop_iters,
                            coop_tol=coop_tol, diag_rule=diag_rule, game_extended=game_extended,
                            gain_scale=gain_scale, chunk_mb=chunk_mb)
                for s in g.stage_list()] for a, g in self.games.items()}
        self._alignment = alignment
        self.solvers = self.solver_sets[alignment]
        self.alignment_hook: AlignmentHook | None = None
        self.gain_scale, self.kl_clip = gain_scale, kl_clip
        self.feedback_consistency = feedback_consistency
        self.last_kl_scale = 1.0
        #: Data parallelism (:mod:`dgn_dist.dgnopt.reduction`): the single-process no-op
        #: unless :func:`dgn_dist.distributed.dgnopt_dp.attach_data_parallel` replaced it.
        self.reducer: Reducer = LOCAL
        #: > 0: scale the step so that ``lr · min(1, grad_clip / ‖Q_θ‖)`` (gradient clipping
        #: of a DeepSpeed JSON, applied to the global ``Q_θ`` of all players).
        self.grad_clip = 0.0
        self._recorded: dict[str, Tensor] = {}
        #: Set to True to keep the last sweep's V_x^t, U^t, k per stage in ``last_sweep``
        #: (tests and debugging; holds the tensors until the next step).
        self.keep_sweep = False
        self.last_sweep: dict[str, dict[int, Any]] = {}
        self._x: Tensor | None = None
        self._logits: Tensor | None = None
        self._vx: Tensor | None = None
        self.full_backward = full_backward
        self._running: tuple[list[Tensor], list[Tensor]] | None = None
        self._handles = [model.register_forward_pre_hook(self._capture_input),
                         model.register_forward_hook(self._capture_output)]

    # -- hooks -------------------------------------------------------------------------
    def _capture_input(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if module.training and torch.is_grad_enabled():
            self._x, self._logits, self._vx = args[0].detach(), None, None
            # the running statistics before this forward changes them: a skip puts them back
            buffers = running_buffers([module])
            self._running = (buffers, snapshot(buffers))

    def _capture_output(self, module: nn.Module, args: tuple[Any, ...],
                        output: Tensor) -> Tensor | None:
        if not (module.training and torch.is_grad_enabled() and output.requires_grad):
            return None
        self._logits = output.detach()
        if not self.full_backward:  # a leaf: loss.backward() ends here (module docstring)
            output = output.detach().requires_grad_()
        output.register_hook(self._capture_grad)
        return output

    def _capture_grad(self, grad: Tensor) -> None:
        self._vx = grad.detach()

    def remove_hooks(self) -> None:
        """Detach the optimizer from the model (no further captures)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- alignments (Alg. 2) ------------------------------------------------------------
    @property
    def alignment(self) -> str:
        """The alignment whose game the next step uses."""
        return self._alignment

    @property
    def alignments(self) -> tuple[str, ...]:
        """The alignments this optimizer holds a game for."""
        return tuple(self.games)

    def set_alignment(self, name: str) -> None:
        """Use the game of alignment ``name`` (and its curvature state) from the next step.

        Raises:
            ValueError: no game was built for ``name`` (pass it in ``alignments``).
        """
        if name not in self.games:
            raise ValueError(f"alignment must be one of {', '.join(self.games)} (the "
                             f"alignments this DGNOpt was built with); got {name!r}")
        self._alignment = name
        self.game = self.games[name]
        self.solvers = self.solver_sets[name]

    # -- step --------------------------------------------------------------------------
    @property
    def feedback(self) -> bool:
        return self.info != "olne" and not self.zero_feedback

    def step(self, closure: Any = None) -> Any:
        """One DGNOpt iteration on the captured batch (see the module docstring)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        x, logits, v_x = self._x, self._logits, self._vx
        if x is None or logits is None or v_x is None:
            raise RuntimeError(
                "DGNOpt.step() needs a captured batch: run logits = model(x) in training mode "
                "and loss.backward() before every step()")
        self._x = self._logits = self._vx = None
        if not self.reducer.agree(not x.is_floating_point() or bool(torch.isfinite(x).all())):
            raise ValueError("the input batch contains NaN or inf; clean the data")
        group = self.param_groups[0]
        if not self.reducer.agree(bool(torch.isfinite(v_x).all() & torch.isfinite(logits).all())):
            self._skip("non-finite loss gradient")
            return loss
        hook = self.alignment_hook
        if hook is not None:
            hook.before_step(self)
        try:
            with torch.enable_grad(), frozen_batchnorm(self.game):
                self._iterate(x, logits, v_x, group)
            group["dgn_step"] += 1
        except NonFiniteUpdate as err:
            self._skip(str(err))
        if hook is not None:
            hook.after_step(self)
        self._running = None
        return loss

    def _skip(self, reason: str) -> None:
        """No parameter changed; the captured forward's BatchNorm running statistics are put
        back too (a non-finite batch would leave NaN there for every evaluation)."""
        if self._running is not None:
            load(*self._running)
            self._running = None
        skip_step(self.param_groups[0], reason)

    def _iterate(self, x: Tensor, logits: Tensor, v_x: Tensor, group: dict[str, Any]) -> None:
        step = int(group["dgn_step"])
        record = self.stats_every > 0 and (step + 1) % self.stats_every == 0
        use_factors = self.curvature in ("kfac", "ekfac") or self.game_extended or self.feedback
        opts = SweepOptions(feedback=self.feedback, use_factors=use_factors,
                            weight_decay=float(group["weight_decay"]),
                            damping=float(group["damping"]), decay=self.ema_decay,
                            update_factors=step % self.factor_interval == 0,
                            refresh=step % self.inverse_interval == 0, record=record,
                            rescale=self.rescale, reducer=self.reducer,
                            consistent_feedback=self.feedback_consistency)
        stages = self.game.stage_list()
        with torch.no_grad():  # entries are dropped during the sweep (memory)
            states: list[State | None] = list(self.game.trajectory(x))
        out_state = states[-1]
        assert out_state is not None
        if out_state[0].shape != v_x.shape:
            raise RuntimeError(f"the game's output {tuple(out_state[0].shape)} does not match "
                               f"the captured logits {tuple(v_x.shape)}")
        # Global stacked-batch convention (reduction.py): this replica's rows of ∂φ/∂x_T with
        # φ the mean over all replicas' examples; float32 even under bf16 autocast.
        world = self.reducer.world
        dtype = out_state[0].dtype
        v_x, logits = v_x.to(dtype) / world, logits.to(dtype)
        u: tuple[Tensor, ...] | None = None  # U^{t+1}, rows of the factors of V_xx
        if use_factors:
            u = (terminal_factors(logits, v_x, self.vxx, self.rank,
                                  batch_size=v_x.shape[0] * world),)
        vx_t: tuple[Tensor, ...] = (v_x,)
        recorded: dict[str, Tensor] = {}
        if record:
            recorded.update({f"value/terminal/{k}": v for k, v in value_stats(vx_t, u).items()})
        solutions: list[StageSolution] = []
        keep: dict[str, dict[int, Any]] = {"vx": {len(stages): vx_t}, "u": {len(stages): u},
                                           "k": {}, "states": dict(enumerate(states))}
        for t in reversed(range(len(stages))):
            x_t = states[t]
            assert x_t is not None
            sol, vx_prev, u_prev = sweep_stage(stages[t], self.solvers[t], x_t, vx_t, u,
                                               opts, need_value=t > 0)
            if not all_finite(sol.k):
                raise NonFiniteUpdate(f"non-finite open gain at stage {stages[t].name}")
            sol.q_theta = sol.q_theta if self.kl_clip > 0 or self.grad_clip > 0 else []  # memory
            solutions.insert(0, sol)
            if self.keep_sweep:  # else V_x^t, U^t die with the next stage (memory)
                keep["vx"][t], keep["u"][t], keep["k"][t] = vx_prev, u_prev, sol.k
            if record:
                name = tag(stages[t].name)
                if vx_prev is not None:
                    for k, v in value_stats(vx_prev, u_prev).items():
                        recorded[f"value/{name}/{k}"] = v
                for k, v in sol.stats.items():
                    prefix = "coop" if k == "cross_ratio" else "value"
                    recorded[f"{prefix}/{name}/{k}"] = v
            if vx_prev is not None:
                vx_t, u = vx_prev, u_prev
            if self.feedback and not self.keep_sweep and t + 1 < len(states):
                # X_{t+1} is not read again: the update pass regenerates it as the primal of
                # its feedback JVP (memory: one trajectory less at the sweep's peak)
                states[t + 1] = None
        if self.keep_sweep:
            self.last_sweep = keep
        lr = float(group["lr"])
        if self.kl_clip > 0:
            self.last_kl_scale = kl_clip_scale([k for s in solutions for k in s.k],
                                               [q for s in solutions for q in s.q_theta],
                                               self.kl_clip, lr, self.gain_scale)
            lr *= self.last_kl_scale
        if self.grad_clip > 0:
            norm = torch.stack([q.double().pow(2).sum() for s in solutions
                                for q in s.q_theta]).sum().sqrt()
            lr *= min(1.0, self.grad_clip / max(float(norm), 1e-30))
        rec = update_pass(stages, self.solvers, states, solutions, lr=lr,
                          feedback_scale=float(group["feedback_scale"]),
                          feedback=self.feedback, record=record, reducer=self.reducer)
        if record:
            for name, val in rec.open_norm.items():
                fb = rec.feedback_norm[name]
                recorded[f"update/{tag(name)}/open_norm"] = val
                recorded[f"update/{tag(name)}/feedback_norm"] = fb
                recorded[f"update/{tag(name)}/feedback_ratio"] = fb / val.clamp_min(1e-30)
            self._recorded = recorded

    # -- statistics --------------------------------------------------------------------
    def curvature_stats(self) -> dict[str, float]:
        """Namespaced scalars (see :mod:`dgn_dist.dgnopt.stats`): curvature factors now, the
        value/update/coop statistics of the last recorded step (``stats_every``), and with
        ``kl_clip`` the last step's clipping factor ``update/kl_scale``."""
        out = to_floats(self._recorded)
        damping = float(self.param_groups[0]["damping"])
        for solver in self.solvers:
            per_player = solver.player_stats()
            for view in solver.views:
                name = tag(view.name)
                for k, v in per_player.get(view.name, {}).items():
                    out[f"curvature/{name}/{k}"] = v
                out[f"curvature/{name}/damping"] = damping
        if self.kl_clip > 0:
            out["update/kl_scale"] = float(self.last_kl_scale)
        return out

    def curvature_eigenvalues(self) -> dict[str, Tensor]:
        """Eigenvalues of every Kronecker factor (``curvature/<player>/{A,G}_eig``), for
        TensorBoard histograms."""
        out: dict[str, Tensor] = {}
        for solver in self.solvers:
            for blk in solver.blocks:
                for sub in getattr(blk, "u", None), getattr(blk, "v", None), blk:
                    factor = getattr(sub, "factor", None)
                    if factor is None or factor.eig_a is None:
                        continue
                    for view in sub.views:  # type: ignore[union-attr]
                        out[f"curvature/{tag(view.name)}/A_eig"] = factor.eig_a.detach()
                        out[f"curvature/{tag(view.name)}/G_eig"] = factor.eig_g.detach()
        return out

    # -- checkpoints -------------------------------------------------------------------
    def _anchored(self) -> Iterator[tuple[str, StageSolver, Tensor]]:
        """``(key prefix, solver, anchor parameter)`` of every solver of every alignment:
        a solver's tensors live in its first parameter's ``state`` slot under the prefix
        (``dgn.`` with one alignment, ``dgn@<alignment>.`` with several)."""
        multi = len(self.solver_sets) > 1
        for a, solvers in self.solver_sets.items():
            for solver in solvers:
                if solver.views:
                    yield (f"dgn@{a}." if multi else "dgn."), solver, solver.views[0].params[0]

    def state_dict(self) -> dict[str, Any]:
        """The usual optimizer state with every curvature tensor in ``state`` (tensors and
        primitives only; ``torch.load(weights_only=True)`` restores it), plus
        ``dgn_alignment``: the active alignment and the alignment hook's state."""
        for slot in self.state.values():
            for key in [k for k in slot if k.startswith(_STATE_PREFIXES)]:
                del slot[key]
        for prefix, solver, anchor in self._anchored():
            self.state[anchor].update({prefix + k: v for k, v in solver.state().items()})
        out = super().state_dict()
        hook = self.alignment_hook
        out["dgn_alignment"] = {"active": self._alignment,
                                "hook": None if hook is None else hook.state_dict()}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        extra = state_dict.get("dgn_alignment")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "dgn_alignment"})
        for prefix, solver, anchor in self._anchored():
            slot = self.state.get(anchor, {})
            solver.load_state({k[len(prefix):]: v for k, v in slot.items()
                               if k.startswith(prefix)})
        if extra is not None:
            self.set_alignment(extra["active"])
            if self.alignment_hook is not None and extra.get("hook") is not None:
                self.alignment_hook.load_state_dict(extra["hook"])

