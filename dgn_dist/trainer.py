"""The training loop: one process or data-parallel ranks, CPU or GPUs, top to bottom.

:func:`train` builds the data, model, optimizer and learning-rate schedule, restores a
checkpoint when ``run.resume`` is set, and runs the ordinary loop for every optimizer::

    logits = model(x); loss = F.cross_entropy(logits, y)
    opt.zero_grad(); loss.backward(); opt.step()

Exact resume: the data order comes from ``(seed, epoch)`` (:mod:`dgn_dist.sampler`), data
loaders never draw from the global random state, and a checkpoint stores the model,
optimizer (curvature state included), scheduler, damping, every RNG state, the position in
the epoch and the running epoch statistics; the losses after resuming equal those of an
uninterrupted run. Ctrl-C finishes the current step, writes a checkpoint and re-raises
``KeyboardInterrupt`` (a second Ctrl-C stops at once, without a checkpoint).

Under a launcher (torchrun, accelerate launch, deepspeed) the same loop runs data parallel
(:mod:`dgn_dist.distributed.training`): ``data.batch_size`` is the global batch, each dp
rank trains on its slice of it, the optimizer reduces over the dp group, evaluation is
sharded and summed, and rank 0 alone logs and writes checkpoints (which hold the replicated
state every rank needs). After a torchrun restart (``--max-restarts``) the run resumes from
the latest checkpoint in ``run.dir``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from dgn_dist.allocator import configure_cpu_allocator
from dgn_dist.checkpoint import (
    CheckpointError,
    CheckpointManager,
    atomic_write_bytes,
    capture_rng_state,
    load_checkpoint,
    load_scheduler_state,
    restore_rng_state,
    scheduler_state,
)
from dgn_dist.config import Config, ConfigError, dump_toml
from dgn_dist.dashboard import DashboardWriter
from dgn_dist.device import configure_determinism, seed_everything
from dgn_dist.distributed.engine import LocalEngine, PipelineEngine
from dgn_dist.distributed.training import (
    ParallelRun,
    ShardedBatchSampler,
    elastic_restart_count,
    setup_parallel,
    steps_per_epoch,
)
from dgn_dist.metrics import (
    MetricsWriter,
    RunningStats,
    curvature_histograms,
    curvature_scalars,
    epoch_line,
    log,
    progress,
    progress_enabled,
)
from dgn_dist.sampler import ResumableSampler

CHECKPOINT_FORMAT = 1
StepHook = Callable[[int, float], None]
Engine = LocalEngine | PipelineEngine


@dataclasses.dataclass
class Progress:
    """Where training stands; stored in every checkpoint next to the module states."""

    epoch: int = 0  # current epoch, 0-based (= completed epochs)
    position: int = 0  # batches of the current epoch already trained
    step: int = 0  # optimizer steps so far
    best_test_acc: float | None = None
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    epoch_stats: dict[str, float] = dataclasses.field(default_factory=dict)
    samples: int = 0  # training samples seen, all sessions
    train_time_s: float = 0.0  # time inside the training loops, all sessions
    wall_time_s: float = 0.0  # whole-run wall time, all sessions


class InterruptGuard:
    """First Ctrl-C sets a flag that :meth:`check` turns into ``KeyboardInterrupt`` at the
    next step boundary; a second Ctrl-C raises at once. Only installed in the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        os.write(2, b"\ninterrupt: stopping after this step (Ctrl-C again to stop now)\n")

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def with_next_batch(batches: Iterable[tuple[Tensor, Tensor]], device: torch.device,
                    ahead: bool) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
    """``(x, y, next_x)`` on ``device``: with ``ahead``, ``next_x`` is the following batch's
    ``x`` -- the very tensor the next item yields -- (``None`` at the end, and always without
    ``ahead``), which a pipeline runs its forward on early."""
    moved = ((x.to(device, non_blocking=True), y.to(device, non_blocking=True))
             for x, y in batches)
    if not ahead:
        yield from ((x, y, None) for x, y in moved)
        return
    current = next(moved, None)
    while current is not None:
        following = next(moved, None)
        yield current[0], current[1], following[0] if following is not None else None
        current = following


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device,
             par: ParallelRun | None = None,
             predict: Callable[[Tensor], Tensor] | None = None) -> tuple[float, float]:
    """Accuracy (percent) and mean cross-entropy of ``model`` over ``loader`` (summed over
    the dp replicas' shards when ``par`` is given); ``predict`` replaces ``model(x)`` (a
    pipeline's forward, collective over its ranks)."""
    was_training = model.training
    model.eval()
    stats = RunningStats(device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x) if predict is None else predict(x)
        stats.add(F.cross_entropy(logits, y), logits, y)
    model.train(was_training)
    return global_acc_loss(stats, par)


def global_acc_loss(stats: RunningStats, par: ParallelRun | None) -> tuple[float, float]:
    """Accuracy (percent) and mean loss of ``stats`` summed over the dp replicas."""
    loss_sum, correct = stats.loss_sum.item(), float(stats.correct.item())
    seen = float(stats.seen)
    if par is not None:
        loss_sum, correct, seen = par.sum_over_dp([loss_sum, correct, seen])
    return 100.0 * correct / max(seen, 1), loss_sum / max(seen, 1)


def _shard(dataset: Dataset, par: ParallelRun) -> Dataset:
    """Every ``dp``-th example from ``dp_rank`` on (evaluation shards)."""
    if par.dp == 1 or not par.shard_eval:
        return dataset
    return Subset(dataset, range(par.dp_rank, len(dataset), par.dp))  # type: ignore[arg-type]


def _loader(dataset: Dataset, batch_size: int, cfg: Config, device: torch.device,
            seed: int, sampler: ResumableSampler | None = None,
            par: ParallelRun | None = None) -> Any:
    if cfg.data.loader == "ffcv":  # order from (run.seed, epoch); sharded across ranks
        from dgn_dist.data.ffcv import ffcv_loader

        dp = 1 if par is None or sampler is None else par.dp  # FFCV shards training itself
        return ffcv_loader(dataset, batch_size // dp, device, seed=cfg.run.seed,
                           num_workers=cfg.data.num_workers,
                           epoch=None if sampler is None else sampler.epoch,
                           start=0 if sampler is None else sampler.start // dp)
    # An explicit generator keeps DataLoader from drawing its worker seed from the global RNG.
    if sampler is not None and par is not None:  # this dp rank's slice of each global batch
        return DataLoader(dataset, batch_sampler=ShardedBatchSampler(
            sampler, batch_size, par.dp, par.dp_rank), num_workers=cfg.data.num_workers,
            pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                      num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(seed))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _damping(optimizer: torch.optim.Optimizer) -> float | None:
    """The optimizer's damping (an attribute, or a pipeline's ``param_groups[0]``)."""
    value = getattr(optimizer, "damping", optimizer.param_groups[0].get("damping"))
    return None if value is None else float(value)


def _set_damping(optimizer: torch.optim.Optimizer, value: float) -> None:
    if hasattr(optimizer, "damping"):
        optimizer.damping = value
    else:
        optimizer.param_groups[0]["damping"] = value


def _checkpoint_state(cfg: Config, engine: Engine,
                      scheduler: torch.optim.lr_scheduler.LRScheduler, prog: Progress,
                      par: ParallelRun) -> dict[str, Any]:
    """Collective (a pipeline gathers its stages' states)."""
    damping = _damping(engine.optimizer)
    return {
        "format": CHECKPOINT_FORMAT,
        "model": engine.model_state(),
        "optimizer": engine.optimizer_state(),
        "scheduler": scheduler_state(scheduler),
        "damping": None if damping is None else float(damping),
        "rng": capture_rng_state(),
        "progress": dataclasses.asdict(prog),
        "config": dump_toml(cfg),
        "parallel": {"dp": par.dims.dp, "pp": par.dims.pp, "world_size": par.ctx.world_size},
    }


def _restore(path: Path, engine: Engine,
             scheduler: torch.optim.lr_scheduler.LRScheduler, par: ParallelRun) -> Progress:
    ckpt = load_checkpoint(path)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint '{path}' has format {ckpt.get('format')!r}, this "
                              f"version reads format {CHECKPOINT_FORMAT}")
    try:
        engine.load_model_state(ckpt["model"])
        engine.load_optimizer_state(ckpt["optimizer"])
        load_scheduler_state(scheduler, ckpt["scheduler"])
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint '{path}' does not match the configured model/optimizer ({err}); "
            "resume with the configuration the run started with (its config.toml)") from err
    if ckpt["damping"] is not None and _damping(engine.optimizer) is not None:
        _set_damping(engine.optimizer, ckpt["damping"])
    saved = ckpt.get("parallel", {"dp": 1, "pp": 1})
    if saved.get("pp", 1) != par.dims.pp:
        raise CheckpointError(
            f"checkpoint '{path}' was written with parallel.pp={saved.get('pp', 1)} but this "
            f"run has pp={par.dims.pp}; resume with the same pipeline degree")
    if saved.get("dp", 1) != par.dims.dp:  # the state is replicated: only the split changes
        log(f"note: checkpoint written with dp={saved.get('dp', 1)}, resuming with "
            f"dp={par.dims.dp} at the same global batch (data.batch_size)")
    restore_rng_state(ckpt["rng"])  # last: nothing may draw random numbers after this
    prog = Progress(**ckpt["progress"])
    if not par.is_main and engine.stats_are_local:  # rank 0 carries the dp-summed statistics
        prog.epoch_stats = {}
    return prog


def _build_engine(cfg: Config, model: nn.Module, val: Dataset | None,
                  par: ParallelRun) -> Engine:
    """The optimizer of the run wrapped in its :class:`Engine` (data-parallel reductions
    attached; with ``parallel.pp > 1`` the stages sharded over the pipeline ranks).

    Raises:
        ValueError: settings the model or optimizer rejects.
    """
    if par.dims.pp > 1:
        from dgn_dist.pipeline.setup import runner_from_config

        cfg.parallel.grad_clip = par.grad_clip  # the DeepSpeed JSON's clipping, if any
        return PipelineEngine(runner_from_config(cfg, model, par.ctx))
    from dgn_dist.game.training import build_training_optimizer

    optimizer = build_training_optimizer(cfg, model, val)  # + §5.2 game options
    par.attach(cfg, model, optimizer)  # dp reductions (a no-op for one process)
    return LocalEngine(model, optimizer, par.autocast)


def train(cfg: Config, on_step: StepHook | None = None) -> dict[str, Any]:
    """Train as configured and return the summary also written to ``summary.json``.

    Args:
        cfg: resolved configuration; ``cfg.run.dir`` must be set (the CLI fills it in).
        on_step: called as ``on_step(step, loss)`` after every optimizer step (tests, tools).

    Raises:
        KeyboardInterrupt: after Ctrl-C, once the checkpoint of the current step is written.
        dgn_dist.data.DataError, CheckpointError, ConfigError, DeviceError: user-fixable
            input problems (missing files, settings the model or optimizer rejects).
    """
    from dgn_dist.data import build_data
    from dgn_dist.game.training import EXPORT_NAME, game_scalars, prepare_model
    from dgn_dist.models import build_model

    if not cfg.run.dir:
        raise ValueError("cfg.run.dir is empty; set run.dir (dgn-train fills in a default)")
    session_start = time.perf_counter()
    par = setup_parallel(cfg)  # before any data: bad degrees fail fast, on every rank
    par.shard_eval = cfg.data.loader == "torch"
    cfg.run.dir = par.agree_on(cfg.run.dir)  # rank 0's (timestamped) default everywhere
    run_dir = Path(cfg.run.dir)
    main = par.is_main

    # --- build ---------------------------------------------------------------------------
    device = par.ctx.device
    seed_everything(cfg.run.seed)
    configure_determinism(device, cfg.run.deterministic)
    configure_cpu_allocator(cfg.run.cpu_allocator)
    data = build_data(cfg.data, cfg.run.seed)
    try:  # these raise ValueError for settings the config types cannot rule out
        model = build_model(cfg.model, data.input_shape, data.num_classes).to(device)
        model = prepare_model(cfg, model)  # fictitious players (eq. 16), game.players_per_layer
        engine = _build_engine(cfg, model, data.val, par)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    optimizer = engine.optimizer
    stats_par = par if engine.stats_are_local else None  # step statistics to sum over dp
    milestones = cfg.optim.milestones if cfg.optim.lr_schedule == "multistep" else []
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, cfg.optim.gamma)
    checkpoints = CheckpointManager(run_dir / "checkpoints", cfg.checkpoint.keep_last)
    prog = Progress()
    if not cfg.run.resume and elastic_restart_count() > 0 and checkpoints.latest() is not None:
        cfg.run.resume = "latest"  # torchrun restarted the workers after a failure
    if cfg.run.resume:
        path = checkpoints.resolve(cfg.run.resume)
        prog = _restore(path, engine, scheduler, par)
        log(f"resumed from {path}: step {prog.step}, epoch {prog.epoch + 1}, "
            f"batch {prog.position}")
    wall_before = prog.wall_time_s
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / "config.toml", lambda h: h.write(dump_toml(cfg).encode()))
    writer = MetricsWriter(run_dir / "tb", cfg.logging.tensorboard,
                           purge_step=prog.step + 1 if cfg.run.resume else None)
    dashboard = DashboardWriter(writer.custom_scalars, writer.enabled, expect_groups=bool(
        cfg.logging.curvature_every) and callable(getattr(optimizer, "curvature_stats", None)))
    sampler = ResumableSampler(len(data.train), cfg.run.seed)
    epoch_steps = steps_per_epoch(len(data.train), cfg.data.batch_size, par.dp)
    test_loader = _loader(_shard(data.test, par), cfg.data.eval_batch_size, cfg, device, seed=0)
    has_val = data.val is not None and len(data.val) > 0
    val_loader = _loader(_shard(data.val, par), cfg.data.eval_batch_size, cfg, device, 0) \
        if has_val else None
    epoch_stats, window = RunningStats(device), RunningStats(device)
    epoch_stats.load(prog.epoch_stats)
    show_bar = progress_enabled(cfg.run.quiet) and main
    max_steps = cfg.run.max_steps
    saved_at = -1

    def save(collective: bool = True) -> Path | None:
        """Checkpoint (rank 0 writes); ``collective=False`` skips the dp reduction of the
        running statistics (after Ctrl-C, when the ranks may not be in step)."""
        nonlocal saved_at
        prog.epoch_stats = epoch_stats.state()
        if collective and stats_par is not None and par.dp > 1:
            keys = ("loss_sum", "correct", "seen", "steps")
            summed = par.sum_over_dp([float(prog.epoch_stats[k]) for k in keys])
            prog.epoch_stats = {"loss_sum": summed[0], "correct": int(summed[1]),
                                "seen": int(summed[2]), "steps": epoch_stats.steps}
        prog.wall_time_s = wall_before + time.perf_counter() - session_start
        saved_at = prog.step
        state = _checkpoint_state(cfg, engine, scheduler, prog, par)  # collective
        if not main:
            return None
        return checkpoints.save(state, prog.step)

    def run_eval() -> tuple[float, float | None]:
        eval_par = par if par.shard_eval else None  # FFCV: every rank reads the whole split
        test_acc, test_loss = evaluate(model, test_loader, device, eval_par, engine.predict)
        val_acc = evaluate(model, val_loader, device, eval_par, engine.predict)[0] \
            if val_loader is not None else None
        prog.best_test_acc = max(prog.best_test_acc or 0.0, test_acc)
        writer.scalars({"acc/test": test_acc, "loss/test": test_loss, "acc/val": val_acc},
                       prog.step)
        return test_acc, val_acc

    def end_epoch(epoch_time: float) -> None:
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()  # milestones count epochs
        damping = _damping(optimizer)
        if damping is not None and cfg.curvature.damping_decay < 1.0:
            _set_damping(optimizer, max(damping * cfg.curvature.damping_decay,
                                        cfg.curvature.damping_min))
        prog.epoch, prog.position = prog.epoch + 1, 0
        train_acc, train_loss = global_acc_loss(epoch_stats, stats_par)
        epoch_stats.reset()
        test_acc = val_acc = None
        if prog.epoch % cfg.run.eval_every == 0 or prog.epoch == cfg.run.epochs:
            test_acc, val_acc = run_eval()
        prog.history.append({"epoch": prog.epoch, "step": prog.step, "lr": lr,
                             "train_loss": train_loss, "train_acc": train_acc,
                             "test_acc": test_acc, "val_acc": val_acc})
        log(epoch_line(prog.epoch, cfg.run.epochs, prog.step, train_loss, train_acc,
                       test_acc, val_acc, lr, epoch_time))
        save()

    # --- train ---------------------------------------------------------------------------
    consistent = True  # False while a step or an epoch end is half done
    stop = bool(max_steps) and prog.step >= max_steps
    try:
        with InterruptGuard() as guard:
            while prog.epoch < cfg.run.epochs and not stop:
                epoch_start = last = time.perf_counter()
                start = min(prog.position * cfg.data.batch_size, len(data.train))
                sampler.set_epoch(prog.epoch, start)
                loader = _loader(data.train, cfg.data.batch_size, cfg, device,
                                 seed=cfg.run.seed * 100_003 + prog.epoch, sampler=sampler,
                                 par=par)
                bar = progress(loader, epoch_steps, prog.position,
                               f"epoch {prog.epoch + 1}", show_bar)
                model.train()
                for x, y, next_x in with_next_batch(bar, device, engine.runs_ahead):
                    consistent = False
                    if max_steps and prog.step + 1 >= max_steps:
                        next_x = None  # the run's last step: no forward run ahead
                    out = engine.train_step(x, y, next_x)
                    loss = out.loss
                    prog.step, prog.position = prog.step + 1, prog.position + 1
                    prog.samples += len(y) * par.dp  # equal local batches
                    epoch_stats.add_counts(out.loss, out.correct, out.count)
                    window.add_counts(out.loss, out.correct, out.count)
                    consistent = True

                    log_now = prog.step % cfg.logging.log_every == 0
                    if log_now:
                        _sync(device)
                    now = time.perf_counter()
                    prog.train_time_s += now - last
                    window.time_s += now - last
                    last = now
                    if log_now:
                        lr = optimizer.param_groups[0]["lr"]
                        w_acc, w_loss = global_acc_loss(window, stats_par)
                        writer.scalars({"loss/train": w_loss, "acc/train": w_acc,
                                        "lr": lr, "time/step": window.time_s / window.steps},
                                       prog.step)
                        writer.scalars({f"comm/{k}_bytes": v / window.steps
                                        for k, v in par.counter.as_dict().items()}, prog.step)
                        par.counter.reset()
                        writer.scalars(engine.scalars(), prog.step)  # pipeline: collective
                        bar.set_postfix_str(f"loss {w_loss:.4f}")
                        window.reset()
                        bandit = game_scalars(optimizer)
                        writer.scalars(bandit, prog.step)  # bandit/*
                        dashboard.observe(bandit)  # custom-scalars layout, written once
                    curv = cfg.logging.curvature_every
                    if curv and prog.step % curv == 0:
                        curv_stats = curvature_scalars(optimizer)
                        writer.scalars(curv_stats, prog.step)
                        dashboard.observe(curv_stats)
                    hist = cfg.logging.hist_every  # eigenvalue histograms (issue 3, item 5)
                    if hist and prog.step % hist == 0:
                        writer.histograms(curvature_histograms(optimizer), prog.step)
                    every = cfg.checkpoint.every_steps
                    if every and prog.step % every == 0:
                        save()
                    if on_step is not None:
                        on_step(prog.step, loss.item())
                    guard.check()
                    if max_steps and prog.step >= max_steps:
                        stop = True
                        break
                bar.close()
                if prog.position < epoch_steps:
                    break  # stopped inside the epoch (run.max_steps)
                consistent = False
                end_epoch(time.perf_counter() - epoch_start)
                consistent = True
                guard.check()
    except KeyboardInterrupt:
        if consistent:
            written = save(collective=False) if saved_at != prog.step else checkpoints.latest()
            log(f"interrupted at step {prog.step}; checkpoint {written}; continue with "
                f"run.dir={run_dir} run.resume=latest")
        writer.close()
        raise
    except BaseException:
        writer.close()
        raise

    # --- finish --------------------------------------------------------------------------
    last_record = prog.history[-1] if prog.history else None
    if last_record is not None and last_record["step"] == prog.step and \
            last_record["test_acc"] is not None:
        test_acc, val_acc = last_record["test_acc"], last_record["val_acc"]
    else:
        test_acc, val_acc = run_eval()
    if saved_at != prog.step:
        save()
    dashboard.write()  # runs that never reported per-player statistics
    writer.close()
    # the plain model's state dict (fictitious players collapsed, eq. 16); collective
    engine.export(run_dir / EXPORT_NAME, write=main)
    train_loss: float | None
    train_acc: float | None
    if epoch_stats.seen:
        train_acc, train_loss = global_acc_loss(epoch_stats, stats_par)
    elif last_record is not None:
        train_loss, train_acc = last_record["train_loss"], last_record["train_acc"]
    else:
        train_loss = train_acc = None
    prog.wall_time_s = wall_before + time.perf_counter() - session_start
    summary = {
        "test_acc": test_acc, "best_test_acc": prog.best_test_acc, "val_acc": val_acc,
        "train_loss": train_loss, "train_acc": train_acc, "steps": prog.step,
        "epochs": prog.epoch + prog.position / epoch_steps,
        "lr": optimizer.param_groups[0]["lr"],
        "wall_time_s": prog.wall_time_s, "train_time_s": prog.train_time_s,
        "samples_per_s": prog.samples / prog.train_time_s if prog.train_time_s else None,
        "optimizer": cfg.optim.name, "model": cfg.model.name, "dataset": cfg.data.dataset,
        "seed": cfg.run.seed, "device": str(device), "run_dir": str(run_dir),
        "world_size": par.ctx.world_size, "dp": par.dims.dp, "launcher": par.ctx.launcher,
        "history": prog.history,
    }
    if main:
        text = json.dumps(summary, indent=2) + "\n"
        atomic_write_bytes(run_dir / "summary.json", lambda h: h.write(text.encode()))
    return summary
