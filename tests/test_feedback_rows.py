"""The update pass's feedback solve from the ``a Q_A`` the sweep's Gram matrix formed
(dgn_dist.dgnopt.feedback_rows) equals the plain solve of ``Q_θx δX`` (float64): in the
exact sweep, in the stale_k stream over micro-batches, and over whole optimizer steps; rows
in another basis, of another batch size or larger than ``Q_A`` are never used."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dgnopt_helpers import game_of, linear_residual
from torch import Tensor, nn

from dgn_dist.dgnopt import DGNOpt
from dgn_dist.dgnopt.blocks import KronBlock
from dgn_dist.dgnopt.capture import frozen_batchnorm
from dgn_dist.dgnopt.feedback_rows import ProjectedInputs
from dgn_dist.dgnopt.gains import StageSolver
from dgn_dist.dgnopt.reduction import LOCAL
from dgn_dist.dgnopt.stage_batch import StageBatch
from dgn_dist.dgnopt.sweep import SweepOptions, sweep_stage
from dgn_dist.dgnopt.terminal import terminal_factors
from dgn_dist.dgnopt.update_pass import FeedbackPrimal, feedback_primal, feedback_term
from dgn_dist.game import Game
from dgn_dist.models.blocks import ResidualBlock
from dgn_dist.optim.kronecker import ExampleRows
from dgn_dist.pipeline.comm import split_rows
from dgn_dist.pipeline.passes import (
    StreamedStage,
    feedback_primals,
    finish_stage,
    stream_stage,
    update_range,
)

DT = torch.float64
B = 4


def deep_net(batch_norm: bool = False) -> nn.Module:
    """Few locations, many input channels (ResNet's layer4 in small): 2x2 maps after the
    strided block, so ``B · L = 16`` rows against ``d_in = 37`` and ``73`` (with the bias
    column) -- those rows are kept."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(),
                         ResidualBlock(4, 8, nn.Tanh, stride=2, batch_norm=batch_norm),
                         nn.Flatten(), nn.Linear(8 * 2 * 2, 3)).to(DT)


def _opts(refresh: bool = True, damping: float = 0.1) -> SweepOptions:
    return SweepOptions(feedback=True, use_factors=True, weight_decay=1e-3, damping=damping,
                        decay=0.9, update_factors=True, refresh=refresh)


def _to_stage(game: Game, t: int, vxx: str
              ) -> tuple[list[tuple[Tensor, ...]], tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Trajectory, ``V_x^{t+1}`` and ``U^{t+1}`` (later stages swept with fresh solvers,
    damped enough that ``Γ_b < I``: clipped to zero, ``U`` would make every feedback 0)."""
    x = torch.randn(B, 4, dtype=DT) if isinstance(game.stages[0].players[0].module, nn.Linear) \
        else torch.randn(B, 1, 4, 4, dtype=DT)
    states = game.trajectory(x)
    logits = states[-1][0]
    v_x = torch.softmax(logits, 1) / B
    vx_next: tuple[Tensor, ...] = (v_x,)
    u_next: tuple[Tensor, ...] = (terminal_factors(logits, v_x, vxx),)
    for s in reversed(range(t + 1, len(game.stages))):
        stage = game.stage_list()[s]
        with frozen_batchnorm(game):
            _, vx, u = sweep_stage(stage, StageSolver(stage, "fne", "kfac"), states[s],
                                   vx_next, u_next, _opts(damping=1.0), need_value=True)
        assert vx is not None and u is not None
        vx_next, u_next = vx, u
    assert all(bool(x.abs().amax((1, 2)).gt(0).all()) for x in (u.flatten(2) for u in u_next))
    return states, vx_next, u_next


def _expected_counts(blocks: list[KronBlock], locs: int) -> list[int]:
    """Blocks keep their rows where ``B · L`` rows are at most ``d_in`` (joint width)."""
    return [B if B * locs <= sum(b.widths) else 0 for b in blocks]


def _kron(solver: StageSolver) -> list[KronBlock]:
    blocks = [b for b in solver.blocks if isinstance(b, KronBlock)]
    assert blocks
    return blocks


def _plain_and_fast(stage, solver: StageSolver, x_t, u_next) -> None:  # type: ignore[no-untyped-def]
    """The kept rows' feedback solve, then (nothing kept any more) the plain one: equal."""
    dx = tuple(0.1 * torch.randn_like(s) for s in x_t)
    kept = [n for b in _kron(solver) if b.inputs_projected.count for n in b.members]
    with frozen_batchnorm(stage):
        fast, out_fast = feedback_term(stage, solver, x_t, dx, u_next)
        assert all(b.inputs_projected.count == 0 for b in _kron(solver)), "rows not taken"
        plain, out_plain = feedback_term(stage, solver, x_t, dx, u_next)
    assert all(fast[n].abs().max() > 0 for n in kept)
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for a, b in zip(out_fast, out_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
@pytest.mark.parametrize("vxx", ["empirical", "exact"])
@pytest.mark.parametrize(("net", "t"), [("conv", 1), ("conv", 2), ("conv_bn", 2),
                                        ("linear", 2)])
def test_feedback_from_the_sweeps_rows_equals_the_plain_solve(
        curvature: str, vxx: str, net: str, t: int) -> None:
    """Convolutions on 2x2 maps (``t = 2``: ``conv2`` keeps its rows, the 1x1 shortcut with
    ``d_in = 5`` does not); BatchNorm couples the samples; ``linear``'s merge stage under
    ``gr`` is one joint-input block (``lin2`` and the shortcut add into one output);
    ``vxx = exact`` has rank ``r > 1``."""
    torch.manual_seed(0)
    game = linear_residual("second") if net == "linear" else \
        game_of(deep_net(net == "conv_bn"), "second")
    states, vx_next, u_next = _to_stage(game, t, vxx)
    stage = game.stage_list()[t]
    solver = StageSolver(stage, "gr" if net == "linear" else "fne", curvature)
    with frozen_batchnorm(game):
        sol, _, _ = sweep_stage(stage, solver, states[t], vx_next, u_next, _opts(), True)
    blocks = _kron(solver)
    counts = [b.inputs_projected.count for b in blocks]
    assert counts == _expected_counts(blocks, 1 if net == "linear" else 4) and B in counts
    assert net != "linear" or [len(b.members) for b in blocks] == [2]
    assert sol.u_next is not None
    _plain_and_fast(stage, solver, states[t], sol.u_next)


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
@pytest.mark.parametrize("refresh", [False, True])
def test_stream_keeps_the_micro_batches_rows_in_order(curvature: str, refresh: bool) -> None:
    """The stale_k stream keeps each micro-batch's rows (sizes 1 and 3: a misplaced
    micro-batch would change the sum). An eigenbasis refresh in finish_stage voids them (the
    stream projected into the previous basis): the plain solve runs instead, or, with
    ``ekfac``, finish_stage's scaling pass over the batch projects them again in the new
    basis."""
    torch.manual_seed(0)
    game = game_of(deep_net(), "second")
    t = 2
    states, vx_next, u_next = _to_stage(game, t, "empirical")
    stage = game.stage_list()[t]
    solver = StageSolver(stage, "fne", curvature)
    earlier = tuple(s + 0.5 * torch.randn_like(s) for s in states[t])  # the previous batch
    with frozen_batchnorm(game):
        sol, _, _ = sweep_stage(stage, solver, earlier, vx_next, u_next, _opts(), True)
    solver.take_projected_inputs(B)  # that step's update pass is not under test
    opts = _opts(refresh)
    opts.examples = B
    acc = StreamedStage()
    sizes = [1, 3]
    with frozen_batchnorm(game):
        for xs, vs, us in zip(split_rows(states[t], sizes), split_rows(vx_next, sizes),
                              split_rows(u_next, sizes), strict=True):
            stream_stage(stage, solver, xs, vs, us, sol.k, opts, True, acc)
        blocks = _kron(solver)
        assert [b.inputs_projected.count for b in blocks] == _expected_counts(blocks, 4)
        before = [b.factor.q_a for b in blocks]
        fresh = finish_stage(stage, solver, states[t], acc, opts)
    assert [b.factor.q_a is not q for b, q in zip(blocks, before, strict=True)] == \
        [refresh] * len(blocks)
    assert fresh.u_next is not None
    _plain_and_fast(stage, solver, states[t], fresh.u_next)


def _rows(num: int, locs: int, width: int, projected: bool = True) -> ExampleRows:
    a = torch.randn(num, 1, locs, width, dtype=DT)
    return ExampleRows(a, a, None if projected else torch.eye(width, dtype=DT), None)


def _batch(num: int) -> StageBatch:
    return StageBatch(num=num, rank=1, q_theta=[], a=[], g=[])


def test_projected_inputs_keep_only_rows_that_serve() -> None:
    q_a = torch.eye(8, dtype=DT)
    kept = ProjectedInputs()
    batch = _batch(2)
    kept.add(batch, 0, [0], [_rows(2, 2, 8)], q_a)
    assert kept.count == 0, "not armed: nothing kept"
    kept.arm(4)
    kept.add(batch, 0, [0], [_rows(2, 2, 8, projected=False)], q_a)
    assert kept.count == 0, "the block projected its per-sample gradients instead"
    kept.add(batch, 0, [0], [_rows(2, 3, 8)], q_a)
    assert kept.count == 0, "3 locations x 4 examples > d_in = 8: larger than Q_A"
    first, second = _rows(2, 2, 8), _rows(2, 2, 8)
    kept.add(batch, 0, [0], [first], q_a)
    kept.add(batch, 0, [0], [_rows(2, 2, 8)], q_a)  # the same chunk again (EKFAC, then Γ)
    other = _batch(2)
    kept.add(other, 0, [0], [second], q_a)
    assert kept.count == 4
    rows = kept.take(4, q_a)
    assert rows is not None
    torch.testing.assert_close(rows[0], torch.cat([first.a.reshape(4, 8),
                                                   second.a.reshape(4, 8)]))
    assert kept.count == 0 and kept.take(4, q_a) is None, "taken once"


@pytest.mark.parametrize("change", ["refresh", "in_place", "batch_size"])
def test_projected_inputs_in_another_basis_or_batch_are_dropped(change: str) -> None:
    q_a = torch.eye(8, dtype=DT)
    kept = ProjectedInputs()
    kept.arm(2)
    kept.add(_batch(2), 0, [0], [_rows(2, 2, 8)], q_a)
    assert kept.count == 2
    if change == "refresh":
        assert kept.take(2, q_a.clone()) is None
    elif change == "in_place":
        q_a.mul_(-1.0)  # e.g. a loaded state_dict copied into the basis
        assert kept.take(2, q_a) is None
    else:
        assert kept.take(3, q_a) is None
    assert kept.count == 0


@pytest.mark.parametrize("info", ["fne", "gr"])
@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_optimizer_steps_equal_without_the_kept_rows(info: str, curvature: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Three DGNOpt steps (the ordinary loop) with and without the kept rows: equal
    parameters; the kept rows served at least one block each step."""
    def run(keep: bool) -> tuple[dict[str, Tensor], int]:
        torch.manual_seed(1)
        model = deep_net(batch_norm=True)
        game = game_of(model, "first" if info == "gr" else "second")
        opt = DGNOpt(model, game=game, lr=0.1, info=info, curvature=curvature,
                     damping=0.1, inverse_interval=2)
        served = 0
        real = StageSolver.project_feedback

        def spy(self, kept, g_rows):  # type: ignore[no-untyped-def]
            nonlocal served
            served += len(kept)
            return real(self, kept, g_rows)

        with monkeypatch.context() as m:
            m.setattr(StageSolver, "project_feedback", spy)
            if not keep:
                m.setattr(ProjectedInputs, "add", lambda *a, **k: None)
            for step in range(3):
                x = torch.randn(B, 1, 4, 4, dtype=DT)
                y = torch.tensor([step % 3, 1, 2, 0])
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, served

    kept, served = run(True)
    plain, none = run(False)
    assert served >= 3 and none == 0
    for key, value in plain.items():
        torch.testing.assert_close(kept[key], value, rtol=1e-8, atol=1e-10, msg=key)


def _swept_twice(net: str, vxx: str, t: int, curvature: str):  # type: ignore[no-untyped-def]
    """One stage swept by two fresh solvers alike (the sweep keeps rows in each)."""
    game = linear_residual("second") if net == "linear" else \
        game_of(deep_net(net == "conv_bn"), "second")
    states, vx_next, u_next = _to_stage(game, t, vxx)
    stage = game.stage_list()[t]
    info = "gr" if net == "linear" else "fne"
    solvers = [StageSolver(stage, info, curvature) for _ in range(2)]
    with frozen_batchnorm(game):
        sols = [sweep_stage(stage, s, states[t], vx_next, u_next, _opts(), True)[0]
                for s in solvers]
    return game, stage, states[t], solvers, [s.u_next for s in sols]


def _terms_equal(a: tuple[list[Tensor], tuple[Tensor, ...]],
                 b: tuple[list[Tensor], tuple[Tensor, ...]]) -> bool:
    return all(torch.equal(x, y) for x, y in zip([*a[0], *a[1]], [*b[0], *b[1]], strict=True))


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
@pytest.mark.parametrize("vxx", ["empirical", "exact"])
@pytest.mark.parametrize("net", ["conv", "conv_bn", "linear"])
def test_feedback_forward_run_ahead_gives_the_same_term(curvature: str, vxx: str,
                                                        net: str) -> None:
    """``feedback_primal`` -- the feedback term's forward run before ``δX`` is known, as a
    pipeline rank runs it while ``δX`` is on its way -- then ``feedback_term`` from it gives
    exactly the term and primal of ``feedback_term``'s own forward: with the sweep's kept
    rows (the projected path) and, once taken, without them (the weight gradients). A
    forward run at another trajectory changes the term: it is the one read."""
    torch.manual_seed(0)
    game, stage, x_t, solvers, u_next = _swept_twice(net, vxx, 2, curvature)
    dx = tuple(0.1 * torch.randn_like(s) for s in x_t)
    with frozen_batchnorm(game):
        for kept in (True, False):
            assert any(b.inputs_projected.count for b in _kron(solvers[1])) == kept
            own = feedback_term(stage, solvers[0], x_t, dx, u_next[0])
            ahead = feedback_primal(stage, solvers[1], x_t)
            got = feedback_term(stage, solvers[1], x_t, dx, u_next[1], primal=ahead)
            assert _terms_equal(own, got)
        elsewhere = feedback_primal(stage, solvers[1], tuple(1.5 * s for s in x_t))
        moved = feedback_term(stage, solvers[1], x_t, dx, u_next[1], primal=elsewhere)
    assert not _terms_equal(own, moved)


def _range_update(game: Game, x: Tensor, dx_scale: float, ahead: str) -> list[Tensor]:
    """Sweep every stage, then ``update_range`` over stages ``1 …`` from a ``δX_1`` as a
    previous rank sends it; ``ahead``: ``none``, ``all`` (every task of
    ``feedback_primals`` run first) or ``moved`` (those forwards at a moved trajectory).
    Returns the parameters after it and ``δX`` out of the range."""
    stages = game.stage_list()
    states = game.trajectory(x)
    logits = states[-1][0]
    vx: tuple[Tensor, ...] = (torch.softmax(logits, 1) / B,)
    u: tuple[Tensor, ...] = (terminal_factors(logits, vx[0], "empirical"),)
    solvers = [StageSolver(s, "fne", "kfac") for s in stages]
    sols = []
    with frozen_batchnorm(game):
        for t in reversed(range(len(stages))):
            sol, vx_prev, u_prev = sweep_stage(stages[t], solvers[t], states[t], vx, u,
                                               _opts(damping=1.0), need_value=t > 0)
            sols.insert(0, sol)
            if vx_prev is not None and u_prev is not None:
                vx, u = vx_prev, u_prev
        dx = tuple(dx_scale * torch.ones_like(s) for s in states[1])
        primals: dict[int, FeedbackPrimal] = {}
        moved = [tuple(1.5 * s for s in st) for st in states[1:]]
        tasks = feedback_primals(stages[1:], solvers[1:], states[1:] if ahead != "moved"
                                 else moved, list(range(len(stages) - 1)), primals)
        assert len(tasks) == len(stages) - 1
        if ahead != "none":
            for task in tasks:
                task()
            assert sorted(primals) == list(range(len(stages) - 1))
        res = update_range(stages[1:], solvers[1:], states[1:], sols[1:],
                           tuple(a + d for a, d in zip(states[1], dx, strict=True)), dx,
                           lr=0.1, feedback_scale=1.0, feedback=True, reducer=LOCAL,
                           primals=primals)
    assert res.finite
    return [p.detach().clone() for p in game.parameters()] + list(res.dx)


def test_update_range_with_the_feedback_forwards_run_ahead_is_unchanged() -> None:
    """``update_range`` from forwards run ahead (:func:`feedback_primals`, what a rank runs
    while it waits for ``δX``) changes the parameters exactly as without them; forwards run
    at another trajectory change them (the update reads what was run ahead)."""
    results = {}
    for ahead in ("none", "all", "moved"):
        torch.manual_seed(0)
        game = game_of(deep_net(True), "second")
        results[ahead] = _range_update(game, torch.randn(B, 1, 4, 4, dtype=DT), 0.1, ahead)
    assert all(torch.equal(a, b) for a, b in zip(results["none"], results["all"], strict=True))
    assert not all(torch.equal(a, b)
                   for a, b in zip(results["none"], results["moved"], strict=True))
