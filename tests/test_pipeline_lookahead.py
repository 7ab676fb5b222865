"""The next step's forward run ahead (``train_step(x, y, next_x=...)``,
:mod:`dgn_dist.pipeline.lookahead`): bitwise the same training as without it, with BatchNorm
running statistics, in both modes, on 2 and 3 pipeline ranks; a skipped step, another batch
than announced and a load in between drop it without a hang. The ``stale_k`` stream reuses
the input rows the forward formed for its ``A`` statistics: bitwise the same as forming them
again."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from dist_helper import run_distributed
from torch import nn

from dgn_dist.distributed.env import DistContext
from dgn_dist.distributed.validate import ParallelDims
from dgn_dist.models.blocks import ResidualBlock
from dgn_dist.pipeline import build_pipeline_runner

B, STEPS = 8, 4
OPTS = {"lr": 0.2, "damping": 0.1, "curvature": "kfac", "inverse_interval": 1, "info": "fne"}


def _model() -> nn.Module:
    """Four stages, BatchNorm in three of them (running statistics change in the forward)."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Tanh(),
                         ResidualBlock(2, 2, nn.Tanh, batch_norm=True), nn.Flatten(),
                         nn.Linear(2 * 4 * 4, 3)).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn((STEPS, B, 1, 4, 4), generator=g, dtype=torch.float64), \
        torch.randint(0, 3, (STEPS, B), generator=g)


def _runner(rank: int, world: int, mode: str) -> tuple[Any, slice]:
    """pp = world, except 4 processes: pp=2 x dp=2 (then this replica's rows)."""
    ctx = DistContext(rank, world, rank, torch.device("cpu"), "gloo", "env", rank == 0)
    pp = 2 if world == 4 else world
    dims = ParallelDims(pp, 0, world)
    dp_rank = dims.coords(rank)[1]
    rows = slice(dp_rank * B // dims.dp, (dp_rank + 1) * B // dims.dp)
    return build_pipeline_runner(_model(), OPTS, ctx, dims, micro_batches=2, mode=mode,
                                 partition="2,1,1" if pp == 3 else "2,2"), rows


def _run(rank: int, world: int, mode: str, scenario: str, ahead: bool) -> dict[str, Any]:
    """STEPS steps of ``scenario``; with ``ahead`` every call announces the next batch."""
    import warnings

    import dgn_dist.pipeline.schedule as schedule

    warnings.simplefilter("ignore", RuntimeWarning)  # the skip's warning; asserted by flag
    runner, rows = _runner(rank, world, mode)
    xs, ys = _data()
    xs, ys = xs[:, rows], ys[:, rows]
    if scenario == "nan":  # step 2 skips: its forward was run ahead, then the step after
        xs[2, 1] = float("nan")
    order = [0, 1, 2, 3]
    announced = list(order[1:]) + [None]
    if scenario == "other" and ahead:
        announced[1] = 3  # step 1 announces batch 3, but the next call brings batch 2
    early_forwards, reused = [], []
    real, real_stream = schedule.Shard.forward, schedule.stream_stage

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        early_forwards.append(kwargs.get("flush", True) is False)
        if scenario == "form_rows_again":
            kwargs["keep_rows"] = False
        return real(self, *args, **kwargs)

    def stream(*args: Any, **kwargs: Any) -> Any:
        reused.append(len(kwargs.get("a_rows") or {}))
        return real_stream(*args, **kwargs)

    schedule.Shard.forward = counting  # type: ignore[method-assign]
    schedule.stream_stage = stream
    losses, skipped, mid = [], [], None
    try:
        for i, b in enumerate(order):
            nxt = announced[i]
            out = runner.train_step(xs[b], ys[b], next_x=xs[nxt] if ahead and nxt is not None
                                    else None)
            losses.append(out.loss)
            skipped.append(out.skipped)
            if i == 1:  # a checkpoint between two steps, a forward pending
                mid = runner.full_state_dict()
                if scenario == "load":
                    runner.load_full_state_dict(mid)
    finally:
        schedule.Shard.forward = real  # type: ignore[method-assign]
        schedule.stream_stage = real_stream
    return {"state": runner.full_state_dict(), "losses": losses, "skipped": skipped,
            "mid": mid, "early": sum(early_forwards), "reused": sum(reused), "damping":
            runner.optimizer.param_groups[0]["damping"]}


def _same(got: dict[str, Any], want: dict[str, Any]) -> None:
    for key in ("state", "mid"):
        for name, value in want[key].items():
            torch.testing.assert_close(got[key][name], value, rtol=0, atol=0,
                                       msg=f"{key}: {name}")
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]),
                               rtol=0, atol=0, equal_nan=True)  # a skipped step's is NaN
    assert got["skipped"] == want["skipped"]
    assert got["damping"] == want["damping"]


@pytest.mark.parametrize(("mode", "world"), [("stale_k", 2), ("exact", 2), ("stale_k", 3),
                                             ("stale_k", 4)])
def test_running_ahead_trains_bitwise_the_same(mode: str, world: int) -> None:
    """pp=2 in both modes, pp=3 (a middle rank runs ahead on what the first one sent) and
    pp=2 x dp=2."""
    ahead = run_distributed(_run, world, mode, "plain", True, timeout=120)
    plain = run_distributed(_run, world, mode, "plain", False, timeout=120)
    start = _model().state_dict()
    assert any(not torch.equal(plain[0]["state"][k], v) for k, v in start.items()
               if "running" in k)  # BatchNorm statistics moved
    for rank, (got, want) in enumerate(zip(ahead, plain, strict=True)):
        _same(got, want)
        # every rank before the last ran STEPS - 1 forwards ahead; the last rank none
        last = rank >= 2 if world == 4 else rank == world - 1  # ranks 2, 3: pp rank 1
        assert got["early"] == (0 if last else STEPS - 1)
        assert want["early"] == 0


def test_a_skipped_step_drops_the_forward_run_ahead() -> None:
    """The NaN batch is run ahead by step 1, fails step 2 (skipped on every rank), whose own
    forward of batch 3 is dropped and run again: the same as without running ahead."""
    ahead = run_distributed(_run, 2, "stale_k", "nan", True, timeout=120)
    plain = run_distributed(_run, 2, "stale_k", "nan", False, timeout=120)
    for got, want in zip(ahead, plain, strict=True):
        assert got["skipped"] == [False, False, True, False]
        # the skipped step's forward (a NaN batch) left no NaN running statistics behind
        assert all(torch.isfinite(v).all() for v in got["state"].values())
        _same(got, want)
    assert ahead[0]["early"] == 3  # run ahead for steps 1, 2 and 3; step 3 ran again


@pytest.mark.parametrize("scenario", ["other", "load"])
def test_another_batch_or_a_load_drops_the_forward_run_ahead(scenario: str) -> None:
    ahead = run_distributed(_run, 2, "stale_k", scenario, True, timeout=120)
    plain = run_distributed(_run, 2, "stale_k", scenario, False, timeout=120)
    for got, want in zip(ahead, plain, strict=True):
        _same(got, want)


def test_the_trainer_announces_each_next_batch_as_the_tensor_it_then_trains_on() -> None:
    from dgn_dist.trainer import with_next_batch

    batches = [(torch.full((2, 1), float(i)), torch.tensor([i, i])) for i in range(3)]
    items = list(with_next_batch(batches, torch.device("cpu"), ahead=True))
    assert [float(x[0, 0]) for x, _, _ in items] == [0.0, 1.0, 2.0]
    assert items[0][2] is items[1][0] and items[1][2] is items[2][0] and items[2][2] is None
    assert all(n is None for _, _, n in with_next_batch(batches, torch.device("cpu"), False))


@pytest.mark.parametrize("ahead", [True, False])
def test_the_stream_reuses_the_forwards_input_rows_bitwise(ahead: bool) -> None:
    """The first rank's stream takes the Kronecker input rows its forward formed for ``A``
    (one per Kronecker player, micro-batch and streamed step) instead of forming them again;
    the training is bitwise the same as forming them again."""
    kept = run_distributed(_run, 2, "stale_k", "plain", ahead, timeout=120)
    again = run_distributed(_run, 2, "stale_k", "form_rows_again", ahead, timeout=120)
    # rank 0: stages conv+BN and the residual block's first layer (2 micro-batches each) in
    # the 3 streamed steps; the last rank sums A from its stream's own rows
    assert kept[0]["reused"] == 3 * 2 * 2 and again[0]["reused"] == 0
    assert kept[1]["reused"] == 0
    for got, want in zip(kept, again, strict=True):
        _same(got, want)
