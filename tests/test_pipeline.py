"""Pipeline-parallel DGNOpt on gloo processes: ``exact`` pp=2 and pp=2 × dp=2 equal one
process on the global batch (float64, 3 steps) for fne and gr on residual nets whose skip
path crosses the boundary; uneven stages; r > 1; bytes per boundary = mb·d·(1+r) per state
tensor; stale_k; predict / full state; a failing rank fails the job."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from dgnopt_helpers import conv_residual, linear_residual
from dist_helper import DistributedTestError, run_distributed
from torch import nn

from dgn_dist.dgnopt import DGNOpt
from dgn_dist.distributed.env import DistContext
from dgn_dist.distributed.validate import ParallelDims
from dgn_dist.game import Game
from dgn_dist.pipeline import build_pipeline_runner
from dgn_dist.pipeline.comm import IdleQueue, Link

B, STEPS = 8, 3
BASE = {"lr": 0.2, "damping": 0.1, "curvature": "kfac", "inverse_interval": 1}


def _model(kind: str) -> nn.Module:
    torch.manual_seed(1)
    return linear_residual("first") if kind == "coop" else conv_residual()


def _data(kind: str, steps: int = STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    shape = (steps, B, 4) if kind == "coop" else (steps, B, 1, 4, 4)
    return torch.randn(shape, generator=g, dtype=torch.float64), \
        torch.randint(0, 3, (steps, B), generator=g)


def _single(kind: str, opts: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[float]]:
    model = _model(kind)
    game = model if isinstance(model, Game) else None
    opt = DGNOpt(model, game=game, **opts)
    losses = []
    for x, y in zip(*_data(kind), strict=True):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, losses


def _runner(rank: int, world: int, kind: str, opts: dict[str, Any], pp: int, micro: int,
            mode: str, partition: str) -> Any:
    model = _model(kind)
    ctx = DistContext(rank, world, rank, torch.device("cpu"), "gloo", "env", rank == 0)
    dims = ParallelDims(pp, 0, world)
    game = model if isinstance(model, Game) else None
    return build_pipeline_runner(model, opts, ctx, dims, micro_batches=micro, mode=mode,
                                 partition=partition, game=game), dims


def _train(rank: int, world: int, kind: str, opts: dict[str, Any], pp: int, micro: int,
           mode: str, partition: str, steps: int = STEPS) -> tuple[Any, ...]:
    runner, dims = _runner(rank, world, kind, opts, pp, micro, mode, partition)
    _, dp_rank = dims.coords(rank)
    local = slice(dp_rank * B // dims.dp, (dp_rank + 1) * B // dims.dp)
    losses, per_step = [], []
    for x, y in zip(*_data(kind, steps), strict=True):
        losses.append(runner.train_step(x[local], y[local]).loss)
        if not per_step:
            per_step.append(runner.local_stats())
    return runner.full_state_dict(), losses, per_step[0], runner.comm_stats()


def _assert_equal(results: list[tuple[Any, ...]], expected: dict[str, torch.Tensor],
                  losses: list[float], kind: str) -> None:
    start = _model(kind).state_dict()
    for state, got_losses, _, _ in results:
        for key, value in expected.items():
            assert not torch.allclose(value, start[key]), f"{key} did not move"
            torch.testing.assert_close(state[key], value, rtol=1e-9, atol=1e-11, msg=key)
        assert got_losses == pytest.approx(losses, rel=1e-12)


CASES = [("conv", "fne", "exact"), ("coop", "gr", "exact"), ("conv", "fne", "sampled")]


@pytest.mark.parametrize(("kind", "info", "vxx"), CASES, ids=["-".join(c) for c in CASES])
def test_pp2_exact_equals_single_process(kind: str, info: str, vxx: str) -> None:
    """Boundary '2,2' falls inside the residual block: the state (h, s) crosses it. vxx
    exact has r = 3, sampled r = 2 (the last rank draws from the same RNG stream)."""
    opts = {**BASE, "info": info, "vxx": vxx, "rank": 2}
    expected, losses = _single(kind, opts)
    results = run_distributed(_train, 2, kind, opts, 2, 2, "exact", "2,2")
    _assert_equal(results, expected, losses, kind)
    # Bytes per boundary and pass: mb·d·(1+r) per state tensor and micro-batch (8-byte
    # floats); d = one sample's size of each tensor of the boundary state.
    r = 3 if vxx == "exact" else 2
    d = [2 * 4 * 4, 2 * 4 * 4] if kind == "conv" else [4, 4]  # (h, s) of the block
    mb, micro = B // 2, 2
    first, last = results[0][2], results[1][2]
    assert first["comm/forward_bytes"] == micro * sum(mb * di * 8 for di in d)
    assert last["comm/sweep_bytes"] == micro * sum(mb * di * (1 + r) * 8 for di in d)
    assert first["comm/update_bytes"] == first["comm/forward_bytes"]
    assert last["comm/forward_bytes"] == 0 and first["comm/sweep_bytes"] == 0


@pytest.mark.parametrize("info", ["fne", "gr"])
def test_pp2_exact_ekfac_between_refreshes_equals_single_process(info: str) -> None:
    """EKFAC with the eigenbasis refreshed every other step: on the steps in between the
    pipeline sums the EKFAC scaling per stage as the sweep passes and the Kronecker ``A``
    in the forward pass (rank 1, shared-forward factor pass); parameters equal one process.
    The MLP game: its factors have full rank at this batch (a rank-deficient ``A`` has a
    degenerate null space whose eigenbasis, and so the EKFAC scaling, depends on rounding)."""
    opts = {**BASE, "curvature": "ekfac", "inverse_interval": 2, "info": info,
            "vxx": "empirical"}
    expected, losses = _single("coop", opts)
    results = run_distributed(_train, 2, "coop", opts, 2, 2, "exact", "2,2")
    _assert_equal(results, expected, losses, "coop")


@pytest.mark.parametrize("partition", ["1,3", "3,1"])
def test_pp2_uneven_stages(partition: str) -> None:
    opts = {**BASE, "info": "fne", "vxx": "exact"}
    expected, losses = _single("conv", opts)
    results = run_distributed(_train, 2, "conv", opts, 2, 4, "exact", partition)
    _assert_equal(results, expected, losses, "conv")
    stats = results[0][3]
    params = [stats["memory/params_bytes/rank0"], stats["memory/params_bytes/rank1"]]
    total = sum(p.numel() * 8 for p in _model("conv").parameters())
    assert sum(params) == total and min(params) > 0  # parameters sharded, not replicated


@pytest.mark.parametrize(("kind", "info"), [("conv", "fne"), ("coop", "gr")])
def test_pp2_dp2_exact_equals_single_process(kind: str, info: str) -> None:
    opts = {**BASE, "info": info, "vxx": "exact"}
    expected, losses = _single(kind, opts)
    results = run_distributed(_train, 4, kind, opts, 2, 2, "exact", "uniform", timeout=120)
    _assert_equal(results, expected, losses, kind)
    stats = results[0][3]
    assert stats["comm/allreduce_bytes"] > 0  # dp reductions inside each stage's group


def test_stale_k_olne_equals_exact_and_fne_trains() -> None:
    """Without feedback the sweep never uses k: stale_k is exact. With fne it streams with
    the previous gain and still lowers the loss on a fixed batch."""
    opts = {**BASE, "info": "olne", "vxx": "exact"}
    expected, losses = _single("conv", opts)
    results = run_distributed(_train, 2, "conv", opts, 2, 2, "stale_k", "2,2")
    _assert_equal(results, expected, losses, "conv")
    fne = {**BASE, "info": "fne", "lr": 0.1}
    results = run_distributed(_fixed_batch, 2, fne)
    exact, stale = results[0]
    assert stale[-1] < 0.7 * stale[0] and exact[-1] < 0.7 * exact[0]
    assert stale[1] == pytest.approx(exact[1], rel=1e-12)  # step 0 runs exact
    assert stale[2] != pytest.approx(exact[2], rel=1e-9)  # then the stale gain matters


def _fixed_batch(rank: int, world: int, opts: dict[str, Any]) -> list[list[float]]:
    out = []
    x, y = (t[0] for t in _data("conv", 1))
    for mode in ("exact", "stale_k"):
        runner, _ = _runner(rank, world, "conv", opts, 2, 2, mode, "2,2")
        out.append([runner.train_step(x, y).loss for _ in range(8)])
    return out


def _ahead_or_late(rank: int, world: int, mode: str) -> list[tuple[Any, ...]]:
    """Train with the update's feedback forwards run in the waits -- every wait first runs
    all its tasks, so each rank runs all it can ahead, whatever the timing -- and without."""
    wait = Link.wait

    def drain_then_wait(self: Link, handle: Any, idle: Any = None) -> None:
        queue = IdleQueue(idle) if isinstance(idle, list) else idle
        while queue:
            queue.run_next()
        wait(self, handle)

    out = []
    opts = {**BASE, "info": "fne", "vxx": "exact", "rank": 2}
    for ahead in (True, False):
        model = _model("conv")
        ctx = DistContext(rank, world, rank, torch.device("cpu"), "gloo", "env", rank == 0)
        runner = build_pipeline_runner(model, opts, ctx, ParallelDims(2, 0, world),
                                       micro_batches=2, mode=mode, partition="2,2",
                                       feedback_ahead=ahead)
        Link.wait = drain_then_wait  # type: ignore[method-assign]
        try:
            losses = [runner.train_step(x, y).loss for x, y in zip(*_data("conv"), strict=True)]
        finally:
            Link.wait = wait  # type: ignore[method-assign]
        out.append((runner.full_state_dict(), losses,
                    runner.local_stats()["overlap/feedback_ahead"]))
    return out


@pytest.mark.parametrize("mode", ["exact", "stale_k"])
def test_feedback_forwards_run_ahead_change_nothing(mode: str) -> None:
    """``parallel.feedback_ahead``: the update pass's feedback forwards run in the waits of
    the sweep (the first rank, for its second stage) and of ``δX`` (the last rank, for both
    its stages) give the parameters and losses of the run without, bit for bit."""
    for (ahead, late) in run_distributed(_ahead_or_late, 2, mode):
        assert ahead[2] == 1.0 and late[2] == 0.0  # every one ran ahead, or none
        assert ahead[1] == late[1]
        assert all(torch.equal(ahead[0][k], v) for k, v in late[0].items())


def _predict(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    runner, _ = _runner(rank, world, "conv", {**BASE, "info": "fne"}, 2, 2, "exact", "3,1")
    x, y = (t[0] for t in _data("conv", 1))
    runner.train_step(x, y)
    state = runner.full_state_dict()
    before = runner.predict(x[:5])
    other = {k: v + 0.01 for k, v in state.items()}
    runner.load_full_state_dict(other)
    after = runner.predict(x[:5])
    return before, after, {"state": state, "other": other, "stats": runner.comm_stats()}


def test_predict_and_full_state_on_every_rank() -> None:
    results = run_distributed(_predict, 2)
    model = _model("conv")
    for before, after, extra in results:
        model.load_state_dict(extra["state"])
        x = _data("conv", 1)[0][0, :5]
        torch.testing.assert_close(before, model.eval()(x), rtol=1e-12, atol=1e-14)
        model.load_state_dict(extra["other"])
        torch.testing.assert_close(after, model(x), rtol=1e-12, atol=1e-14)
    stats = results[0][2]["stats"]
    for key in ("time/forward", "time/sweep", "time/update", "comm/forward_bytes",
                "comm/sweep_bytes", "comm/update_bytes", "comm/allreduce_bytes"):
        assert key in stats and f"{key}/rank1" in stats
    assert stats["time/sweep"] > 0 and stats["comm/predict_bytes"] > 0


class _Boom(RuntimeError):
    pass


def _fail_mid_sweep(rank: int, world: int) -> None:
    runner, _ = _runner(rank, world, "conv", {**BASE, "info": "fne"}, 2, 2, "exact", "2,2")
    x, y = (t[0] for t in _data("conv", 1))
    runner.train_step(x, y)

    def hook(*_: object) -> None:
        if torch.is_grad_enabled():  # the sweep re-runs stages with grad; the forward not
            raise _Boom("injected failure in the backward sweep")

    if rank == 1:  # a module of the stage (the sweep runs the stage's flow, not its __call__)
        runner.shard.stages[0].players[0].module.register_forward_hook(hook)
    runner.train_step(x, y)


def test_rank_failing_mid_pass_fails_the_job() -> None:
    start = time.monotonic()
    with pytest.raises(DistributedTestError, match="injected failure in the backward sweep"):
        run_distributed(_fail_mid_sweep, 2, timeout=60)
    assert time.monotonic() - start < 30  # reported, not left to the timeout


def _resume(rank: int, world: int, mode: str) -> tuple[dict[str, torch.Tensor], ...]:
    """2 steps, checkpoint, 1 more step; a fresh runner restored from the checkpoint then
    takes the same third step."""
    opts = {**BASE, "info": "fne", "inverse_interval": 2}
    xs, ys = _data("conv")
    runner, _ = _runner(rank, world, "conv", opts, 2, 2, mode, "2,2")
    for i in range(2):
        runner.train_step(xs[i], ys[i])
    model_sd, optim_sd = runner.full_state_dict(), runner.optimizer_state_dict()
    runner.train_step(xs[2], ys[2])
    straight = runner.full_state_dict()
    fresh, _ = _runner(rank, world, "conv", opts, 2, 2, mode, "2,2")
    fresh.load_full_state_dict(model_sd)
    fresh.load_optimizer_state_dict(optim_sd)
    fresh.train_step(xs[2], ys[2])
    return straight, fresh.full_state_dict(), optim_sd["group"]


@pytest.mark.parametrize("mode", ["exact", "stale_k"])
def test_checkpoint_resume_continues_identically(mode: str) -> None:
    for straight, resumed, group in run_distributed(_resume, 2, mode):
        assert group["dgn_step"] == 2
        for key, value in straight.items():
            torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)


def _nan_step(rank: int, world: int, mode: str) -> tuple[list[bool], float, bool]:
    runner, dims = _runner(rank, world, "conv", {**BASE, "info": "fne"}, 2, 2, mode, "2,2")
    xs, ys = _data("conv")
    _, dp_rank = dims.coords(rank)
    local = slice(dp_rank * B // dims.dp, (dp_rank + 1) * B // dims.dp)
    runner.train_step(xs[0][local], ys[0][local])
    before = runner.full_state_dict()
    bad = xs[1].clone()
    bad[1] = float("nan")  # one example of dp replica 0 only
    with pytest.warns(RuntimeWarning, match="skipped step 1"):
        skipped = runner.train_step(bad[local], ys[1][local]).skipped
    # nothing run ahead for the update is kept (its graphs) after the skipped step
    skipped = skipped and not runner.shard.primals and not runner.shard.ahead_tasks
    after = runner.full_state_dict()
    same = all(torch.equal(before[k], after[k]) for k in before)
    ok = not runner.train_step(xs[2][local], ys[2][local]).skipped
    return [skipped, same, ok], runner.optimizer.param_groups[0]["damping"], \
        all(torch.isfinite(v).all() for v in runner.full_state_dict().values())


@pytest.mark.parametrize(("mode", "world"), [("stale_k", 2), ("exact", 4)])
def test_non_finite_batch_skips_the_step_on_every_rank(mode: str, world: int) -> None:
    """NaN in one replica's batch: every rank (both dp replicas too) skips the step, keeps
    its parameters, raises the damping tenfold, and the next clean step trains."""
    for flags, damping, finite in run_distributed(_nan_step, world, mode, timeout=120):
        assert flags == [True, True, True] and finite
        assert damping == pytest.approx(BASE["damping"] * 10)


def _last_rank_gain_fails(rank: int, world: int) -> tuple[list[bool], float]:
    import dgn_dist.pipeline.schedule as schedule
    from dgn_dist.dgnopt.gains import NonFiniteUpdate

    runner, dims = _runner(rank, world, "conv", {**BASE, "info": "fne"}, 2, 2, "stale_k", "2,2")
    xs, ys = _data("conv")
    pp_rank, dp_rank = dims.coords(rank)
    local = slice(dp_rank * B // dims.dp, (dp_rank + 1) * B // dims.dp)
    runner.train_step(xs[0][local], ys[0][local])  # step 0 runs exact: k_prev for step 1
    before = runner.full_state_dict()
    real = schedule.finish_stage

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise NonFiniteUpdate("injected: non-finite open gain")

    if pp_rank == 1:  # only the last rank's fresh gain fails; its messages had all gone out
        schedule.finish_stage = failing  # type: ignore[assignment]
    try:
        with pytest.warns(RuntimeWarning, match="skipped step 1"):
            skipped = runner.train_step(xs[1][local], ys[1][local]).skipped
    finally:
        schedule.finish_stage = real  # type: ignore[assignment]
    after = runner.full_state_dict()
    same = all(torch.equal(before[k], after[k]) for k in before)
    ok = not runner.train_step(xs[2][local], ys[2][local]).skipped
    return [skipped, same, ok], runner.optimizer.param_groups[0]["damping"]


@pytest.mark.parametrize("world", [2, 4])
def test_last_rank_failing_after_the_stream_rolls_back_every_rank(world: int) -> None:
    """stale_k without gradient clipping has no barrier between the sweep and the update
    pass: the first rank updates while the last one still solves its gains. When that solve
    fails, every rank (and dp replica) learns it in the update's reduction, restores its
    parameters, raises the damping and trains on with the next step."""
    for flags, damping in run_distributed(_last_rank_gain_fails, world, timeout=120):
        assert flags == [True, True, True]
        assert damping == pytest.approx(BASE["damping"] * 10)


def test_bench_reports_bytes_against_the_formula_and_the_update_bound(
        capsys: pytest.CaptureFixture[str]) -> None:
    """`dgn-bench pipeline` end to end (pp=1 then pp=2 stale_k on the DIGITS net): the bytes
    at the boundary equal ``mb·d·(1+r)`` and the last-update bound is printed."""
    import re

    from dgn_dist.pipeline import bench

    assert bench.main(["--models", "digits_resnet", "--batch-size", "8", "--micro-batches",
                       "2", "--steps", "1", "--warmup", "1", "--modes", "stale_k",
                       "--timeout", "240"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"forward (\d+) B \(formula (\d+)\), sweep (\d+) B \(formula "
                      r"mb\*d\*\(1\+r\): (\d+)\)", out)
    assert rows and all(sent == formula for row in rows for sent, formula in
                        (row[0:2], row[2:4]))
    # [4, 5, 8, 8] twice (two state tensors) per micro-batch, 2 micro-batches, float32
    assert int(rows[-1][0]) == 2 * 2 * 4 * 5 * 8 * 8 * 4
    bound = re.findall(r"step >= (\d+\.\d+)x pp1 \(with pp1's work: (\d\.\d+)x\)", out)
    assert bound and all(float(b) >= 0.5 for row in bound for b in row)
