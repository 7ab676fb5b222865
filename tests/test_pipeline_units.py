"""Pipeline pieces that need no processes: partitions, launch checks, options, shapes, and
the stale_k stage pieces against the exact sweep (float64)."""

from __future__ import annotations

import pytest
import torch
from dgnopt_helpers import conv_residual, linear_residual
from torch import nn

from dgn_dist.config.schema import Config
from dgn_dist.dgnopt.capture import PlayerTap, frozen_batchnorm
from dgn_dist.dgnopt.gains import StageSolver
from dgn_dist.dgnopt.streamed import input_blocks_due
from dgn_dist.dgnopt.sweep import SweepOptions, sweep_stage
from dgn_dist.dgnopt.terminal import terminal_factors
from dgn_dist.distributed.validate import DistributedSetupError
from dgn_dist.game import build_game
from dgn_dist.pipeline import check_pipeline, partition_stages
from dgn_dist.pipeline.comm import factor_specs, meta_copy, split_rows, state_specs
from dgn_dist.pipeline.options import make_options
from dgn_dist.pipeline.partition import balanced_counts, stage_param_counts
from dgn_dist.pipeline.passes import StreamedStage, finish_stage, stream_stage


def _game():  # stem, b:1 (branch), b:2 (merge), head
    return build_game(conv_residual(), "second")


def test_partition_uniform_params_and_explicit() -> None:
    game = _game()
    assert [list(r) for r in partition_stages(game, 2, "uniform")] == [[0, 1], [2, 3]]
    assert [list(r) for r in partition_stages(game, 3, "uniform")] == [[0, 1], [2], [3]]
    assert [list(r) for r in partition_stages(game, 2, " 1, 3 ")] == [[0], [1, 2, 3]]
    counts = stage_param_counts(game)
    assert counts == [20, 38, 38, 99]  # conv 1->2 (3x3), two 2->2 convs, Linear(32, 3)
    ranges = partition_stages(game, 2, "params")
    loads = [sum(counts[t] for t in r) for r in ranges]
    assert max(loads) == min(max(sum(counts[:i]), sum(counts[i:])) for i in range(1, 4))
    assert [len(r) for r in ranges] == [3, 1]


def test_balanced_counts_minimise_the_largest_load() -> None:
    assert balanced_counts([1, 1, 1, 10, 1, 1], 3) == [3, 1, 2]
    assert balanced_counts([5, 5, 5, 5], 4) == [1, 1, 1, 1]
    assert balanced_counts([0, 0, 0], 2) in ([1, 2], [2, 1])


@pytest.mark.parametrize(("pp", "spec", "needle"), [
    (5, "uniform", "parallel.pp <= 4"),
    (2, "2,1", "summing to the game's 4 stages"),
    (2, "4,0", "positive stage counts"),
    (2, "half", "comma list of stage counts"),
])
def test_partition_errors_say_what_to_change(pp: int, spec: str, needle: str) -> None:
    with pytest.raises(DistributedSetupError, match=needle):
        partition_stages(_game(), pp, spec)


def _cfg(**parallel: object) -> Config:
    cfg = Config()
    cfg.optim.name = "dgnopt"
    cfg.data.batch_size = 8
    for k, v in parallel.items():
        setattr(cfg.parallel, k, v)
    return cfg


def test_check_pipeline_accepts_and_rejects() -> None:
    dims = check_pipeline(_cfg(pp=2, micro_batches=2), 4, _game())
    assert (dims.pp, dims.dp) == (2, 2)
    with pytest.raises(DistributedSetupError, match="micro_batches in"):
        check_pipeline(_cfg(pp=2, micro_batches=3), 4, _game())
    with pytest.raises(DistributedSetupError, match="exceeds the model's 4 stages"):
        check_pipeline(_cfg(pp=8), 8, _game())
    with pytest.raises(DistributedSetupError, match="pipeline_mode must be one of"):
        check_pipeline(_cfg(pp=2, pipeline_mode="async"), 2, _game())
    with pytest.raises(DistributedSetupError, match="parallel.partition"):
        check_pipeline(_cfg(pp=2, partition="1,1"), 2, _game())
    cfg = _cfg(pp=2)
    cfg.optim.name = "sgd"
    with pytest.raises(DistributedSetupError, match="pipelines DGNOpt only"):
        check_pipeline(cfg, 2, _game())
    cfg = _cfg(pp=2)
    cfg.optim.dgnopt_kl_clip = 1e-3
    cfg.game.feedback_consistency = True
    with pytest.raises(DistributedSetupError,
                       match="optim.dgnopt_kl_clip and game.feedback_consistency"):
        check_pipeline(cfg, 2, _game())


def test_options_reject_unsupported_and_invalid() -> None:
    assert make_options({"info": "gr", "lr": 0.5}).lr == 0.5
    with pytest.raises(ValueError, match="not supported with pipeline parallelism"):
        make_options({"kl_clip": 1e-3})
    for key, on in (("feedback_consistency", True), ("game_extended", True),
                    ("gain_scale", 2.0)):  # True == 1.0 must not pass as gain_scale's off
        with pytest.raises(ValueError, match=key):
            make_options({key: on})
    assert make_options({"kl_clip": 0.0, "feedback_consistency": False}).info == "fne"
    with pytest.raises(ValueError, match="unknown DGNOpt options"):
        make_options({"learning_rate": 1.0})
    with pytest.raises(ValueError, match="info must be one of"):
        make_options({"info": "nash"})


def test_meta_shapes_match_a_real_trajectory() -> None:
    game = _game()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    specs = state_specs(meta_copy(game), x.shape[1:], x.dtype, 3)
    real = game.trajectory(x)
    assert [[s.shape for s in st] for st in specs] == [[tuple(t.shape) for t in st]
                                                       for st in real]
    assert [len(st) for st in specs] == [1, 1, 2, 1, 1]  # (h, s) inside the block
    assert factor_specs(specs[2], 4)[1].shape == (3, 4, 2, 4, 4)
    assert all(p.device.type == "cpu" for p in game.parameters())  # the copy is separate


@pytest.mark.parametrize(("vxx", "curvature"), [("exact", "kfac"), ("empirical", "kfac"),
                                               ("exact", "ekfac"), ("empirical", "ekfac")])
@pytest.mark.parametrize("info", ["fne", "gr"])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("inputs", ["stream", "finish", "forward"])
def test_stream_with_the_current_gain_equals_the_exact_sweep(info: str, vxx: str,
                                                             curvature: str, rescale: bool,
                                                             inputs: str) -> None:
    """stream_stage given THIS step's gain and curvature reproduces sweep_stage's V_x^t and
    U^t micro-batch by micro-batch; finish_stage on the streamed statistics of a solver in
    the same state gives sweep_stage's k and curvature state (so stale_k differs from exact
    only by the stale gain). ``empirical`` (rank 1) takes the shared-forward factor pass,
    ``exact`` (rank 10) the repeated-samples one; with ``ekfac`` both solvers first take one
    identical step, so that the second (no eigenbasis refresh) sums the EKFAC scaling per
    micro-batch and the stream's Gram reuses those projections. The rows of the
    micro-batches are kept for finish_stage only where it reads them: here (no BatchNorm,
    one player per block) only for the rescaling's rows path. ``inputs``: where the
    Kronecker ``A`` is summed -- in the stream; in finish_stage from the kept input rows (the
    last rank); from the forward pass's taps, queued as the first ranks do and here run only
    after every micro-batch streamed (the latest a wait of the sweep can leave them)."""
    game = linear_residual("first") if info == "gr" else _game()
    x = torch.randn(6, 4, dtype=torch.float64) if info == "gr" else \
        torch.randn(6, 1, 4, 4, dtype=torch.float64)
    states = game.trajectory(x)
    logits = states[-1][0]
    v_x = torch.softmax(logits, 1) / 6
    u = (terminal_factors(logits, v_x, vxx),)
    assert (u[0].shape[1] == 1) == (vxx == "empirical")
    opts = SweepOptions(feedback=True, use_factors=True, weight_decay=1e-3, damping=0.1,
                        decay=0.9, update_factors=True, refresh=True, rescale=rescale)
    t = 2  # the merge stage: state (h, s) in, logits-side state out
    stage = game.stage_list()[t]
    vx_next, u_next = (v_x,), u
    for s in reversed(range(t + 1, len(game.stages))):
        solver = StageSolver(game.stage_list()[s], info, "kfac")
        with frozen_batchnorm(game):
            _, vx_next, u_next = sweep_stage(game.stage_list()[s], solver, states[s], vx_next,
                                             u_next, opts, need_value=True)
    exact = StageSolver(stage, info, curvature)
    fresh = StageSolver(stage, info, curvature)
    if curvature == "ekfac":  # one identical step first: both get an eigenbasis
        for solver in (exact, fresh):
            sweep_stage(stage, solver, states[t], vx_next, u_next, opts, True)
        opts.refresh = False
    sol, vx_t, u_t = sweep_stage(stage, exact, states[t], vx_next, u_next, opts, True)
    sizes = [2, 4]
    parts = zip(split_rows(states[t], sizes), split_rows(vx_next, sizes),
                split_rows(u_next, sizes), strict=True)
    acc = StreamedStage(defer_inputs=inputs == "finish")  # the last rank: Q_θ deferred too
    streamed = [stream_stage(stage, exact, xs, vs, us, sol.k, opts, True, acc)
                for xs, vs, us in parts]
    for i in range(len(vx_t)):
        torch.testing.assert_close(torch.cat([s[0][i] for s in streamed]), vx_t[i])
        torch.testing.assert_close(torch.cat([s[1][i] for s in streamed]), u_t[i])
    assert len(acc.pending_q) == (len(sizes) if inputs == "finish" else 0)
    assert (acc.q_theta is None) == (inputs == "finish")
    acc2 = StreamedStage(defer_inputs=inputs == "finish")
    if inputs == "forward":  # marked when queued, as Shard.forward does
        acc2.stats.input_blocks |= input_blocks_due(fresh.blocks, opts.update_factors)
    for xs, vs, us in zip(split_rows(states[t], sizes), split_rows(vx_next, sizes),
                          split_rows(u_next, sizes), strict=True):
        stream_stage(stage, fresh, xs, vs, us, [torch.zeros_like(k) for k in sol.k], opts,
                     False, acc2)
    assert bool(acc2.stats.psi_blocks) == (curvature == "ekfac")  # streamed EKFAC sums
    assert bool(acc2.a) == rescale
    assert bool(acc2.inputs) == (inputs == "finish")
    assert bool(acc2.stats.input_blocks) == (inputs != "stream")
    if inputs == "forward":
        for xs in split_rows(states[t], sizes):
            with torch.no_grad(), PlayerTap([v.player for v in fresh.views]) as tap:
                stage(xs)
            fresh.accumulate_inputs(acc2.stats, tap, xs[0].shape[0],
                                    update_factors=opts.update_factors, refresh=opts.refresh)
    assert len(acc2.pending_q) == (len(sizes) if inputs == "finish" else 0)
    sol2 = finish_stage(stage, fresh, states[t], acc2, opts)
    assert not acc2.pending_q  # the deferred Q_θ pulled back: the same sum as the sweep's
    for a, b in zip(sol2.q_theta, sol.q_theta, strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(sol2.k, sol.k, strict=True):
        torch.testing.assert_close(a, b)
    state_exact, state_streamed = exact.state(), fresh.state()
    assert state_exact.keys() == state_streamed.keys()
    for key, value in state_exact.items():
        torch.testing.assert_close(state_streamed[key], value, msg=key)
    assert not torch.allclose(sol.k[0], torch.zeros_like(sol.k[0]))


def test_params_of_sequential_counted_once() -> None:
    shared = nn.Linear(3, 3)
    game = build_game(nn.Sequential(shared, nn.Tanh(), nn.Linear(3, 2)), "second")
    assert stage_param_counts(game) == [12, 8]


def test_runner_from_config_single_process_equals_dgnopt() -> None:
    """pp=1 without a process group: the runner (2 micro-batches) is DGNOpt."""
    import torch.nn.functional as F

    from dgn_dist.dgnopt import DGNOpt, dgnopt_kwargs
    from dgn_dist.distributed.env import DistContext
    from dgn_dist.pipeline import runner_from_config

    cfg = _cfg(micro_batches=2)
    cfg.optim.lr, cfg.curvature.kind, cfg.curvature.damping = 0.2, "kfac", 0.1
    torch.manual_seed(3)
    ref = conv_residual()
    model = conv_residual()
    model.load_state_dict(ref.state_dict())
    opt = DGNOpt(ref, **dgnopt_kwargs(cfg))  # type: ignore[arg-type]
    ctx = DistContext(0, 1, 0, torch.device("cpu"), None, "none", True)
    runner = runner_from_config(cfg, model, ctx)
    g = torch.Generator().manual_seed(4)
    for _ in range(2):
        x = torch.randn(8, 1, 4, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (8,), generator=g)
        loss = F.cross_entropy(ref(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        res = runner.train_step(x, y)
        assert res.loss == pytest.approx(float(loss.detach()), rel=1e-12) and res.count == 8
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-10, atol=1e-12)
    assert runner.optimizer.param_groups[0]["dgn_step"] == 2
    assert runner.shard.feedback_ahead  # parallel.feedback_ahead's default
    cfg.parallel.feedback_ahead = False
    assert not runner_from_config(cfg, conv_residual(), ctx).shard.feedback_ahead


def test_bench_commands_reject_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    from dgn_dist.pipeline import bench, convergence

    assert bench.main(["--models", "vgg"]) == 2
    assert bench.main(["--batch-size", "10", "--micro-batches", "4"]) == 2
    assert bench.main(["--rounds", "0"]) == 2
    assert bench.main(["--feedback-ahead", "sometimes"]) == 2
    assert convergence.main(["--batch-size", "6", "--micro-batches", "4"]) == 2
    assert "micro-batches" in capsys.readouterr().err


def test_bench_runs_each_mode_with_and_without_the_feedback_forwards_ahead() -> None:
    from dgn_dist.pipeline.bench import pp2_configs

    modes = ["exact", "stale_k"]
    assert pp2_configs(modes, "on") == [("exact", True), ("stale_k", True)]
    assert pp2_configs(modes, "off") == [("exact", False), ("stale_k", False)]
    assert pp2_configs(modes, "both") == [("exact", True), ("exact", False),
                                          ("stale_k", True), ("stale_k", False)]


def test_tail_bound() -> None:
    from dgn_dist.pipeline.bench import tail_bound

    # pp · step >= work + (pp - 1) · last update: 20 s of work, a 3 s last update
    assert tail_bound(20.0, 3.0, 2) == pytest.approx(11.5)
    assert tail_bound(20.0, 3.0, 4) == pytest.approx(29.0 / 4)
    assert tail_bound(20.0, 0.0, 2) == pytest.approx(10.0)  # nothing exposed: work / pp
    assert tail_bound(20.0, 3.0, 1) == pytest.approx(20.0)
    for bad in ((0.0, 1.0, 2), (1.0, -1.0, 2), (1.0, 1.0, 0)):
        with pytest.raises(ValueError, match="work_s"):
            tail_bound(*bad)


def test_rounds_report_the_median_of_per_round_ratios() -> None:
    """Each pp2 run is divided by the pp1 of its own round; the slowest rank sets a step."""
    from dgn_dist.pipeline.bench import format_rounds

    def rnd(pp1: float, pp2: tuple[float, float]) -> list[tuple[str, list[dict[str, float]]]]:
        return [("pp1", [{"step_s": pp1}]),
                ("pp2 stale_k", [{"step_s": pp2[0]}, {"step_s": pp2[1]}])]

    out = format_rounds("resnet18", [rnd(10.0, (6.0, 5.0)), rnd(20.0, (9.0, 10.0)),
                                     rnd(16.0, (8.8, 8.0))]).splitlines()
    assert out[0] == "== resnet18: 3 alternated rounds (step s; x pp1 of the same round)"
    assert out[1].split()[-3:] == ["median", "16.000", "s"]  # pp1's steps 10, 20, 16
    assert out[2].split()[-5:] == ["0.600", "0.500", "0.550", "median", "0.550"]
    two = format_rounds("m", [rnd(10.0, (6.0, 5.0)), rnd(20.0, (9.0, 10.0))]).splitlines()
    # per-round ratios 0.6 and 0.5: median 0.55; medians of the steps: 8.0 / 15.0 = 0.533
    assert two[2].split()[-1] == "0.550"


def test_grad_clip_matches_dgnopt() -> None:
    import torch.nn.functional as F

    from dgn_dist.dgnopt import DGNOpt
    from dgn_dist.distributed.env import DistContext
    from dgn_dist.distributed.validate import ParallelDims
    from dgn_dist.pipeline import build_pipeline_runner

    opts = {"lr": 0.2, "info": "fne", "curvature": "kfac", "damping": 0.1}
    torch.manual_seed(5)
    ref, model = conv_residual(), conv_residual()
    model.load_state_dict(ref.state_dict())
    opt = DGNOpt(ref, **opts)  # type: ignore[arg-type]
    opt.grad_clip = 1e-3
    ctx = DistContext(0, 1, 0, torch.device("cpu"), None, "none", True)
    runner = build_pipeline_runner(model, opts, ctx, ParallelDims(1, 1, 1), grad_clip=1e-3)
    x = torch.randn(8, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    start = {k: v.clone() for k, v in ref.state_dict().items()}
    F.cross_entropy(ref(x), y).backward()
    opt.step()
    runner.train_step(x, y)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-10, atol=1e-13)
    moved = max(float((ref.state_dict()[k] - start[k]).abs().max()) for k in start)
    assert 0 < moved < 1e-3  # the clip was active


def test_finish_rescales_batchnorm_stages_at_the_micro_batches_linearisations(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Where BatchNorm couples the samples, finish_stage's rescaling sums the batch
    Gauss-Newton term over the micro-batches, each linearised at its own batch statistics
    (where the streamed V_x is linearised), from the forwards the stream recorded -- no
    forward over the whole batch. Checked against JVPs of torch.func at each micro-batch."""
    from torch.func import functional_call, jvp

    import dgn_dist.dgnopt.sweep as sweep_module
    from dgn_dist.pipeline.comm import split_rows

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(),
                          nn.Flatten(), nn.Linear(48, 3)).double()
    game = build_game(model, "second")
    stage, head = game.stage_list()
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    opts = SweepOptions(feedback=True, use_factors=True, weight_decay=1e-3, damping=1e-3,
                        decay=0.9, update_factors=True, refresh=True, rescale=True)
    with frozen_batchnorm(game):
        states = game.trajectory(x)
        v_x = torch.softmax(states[-1][0], 1) / 6
        u_head = (terminal_factors(states[-1][0], v_x, "empirical"),)
        _, vx_next, u_next = sweep_stage(head, StageSolver(head, "fne", "kfac"), states[1],
                                         (v_x,), u_head, opts, need_value=True)
        sizes = [2, 4]
        gains = []
        for rescale in (False, True):
            opts.rescale = rescale
            solver, acc = StageSolver(stage, "fne", "kfac"), StreamedStage()
            for xs, vs, us in zip(split_rows(states[0], sizes), split_rows(vx_next, sizes),
                                  split_rows(u_next, sizes), strict=True):
                zero = [torch.zeros_like(p) for v in solver.views
                        for p in [v.to_native([q.detach() for q in v.params])]]
                stream_stage(stage, solver, xs, vs, us, zero, opts, False, acc)
            assert len(acc.lins) == (len(sizes) if rescale else 0)
            if rescale:  # the finish must not record a forward of its own
                monkeypatch.setattr(sweep_module, "Linearization", None)
            sol = finish_stage(stage, solver, states[0], acc, opts)
            gains.append(sol)
        units = solver.rescale_units()
        names = {id(p): n for n, p in stage.named_parameters()}
        primals = {n: p.detach() for n, p in stage.named_parameters()}

        def batch_term(members: list[int], parts: list[tuple]) -> torch.Tensor:
            total = torch.zeros((), dtype=torch.float64)
            tangents = {n: torch.zeros_like(p) for n, p in primals.items()}
            for n in members:
                view = solver.views[n]
                for p, d in zip(view.params, view.from_native(gains[0].k[n]), strict=True):
                    tangents[names[id(p)]] = d
            for xs, us in parts:
                _, jk = jvp(lambda prm, xs=xs: functional_call(stage, prm, (xs,)),
                            (primals,), (tangents,))
                coef = sum(torch.einsum("bi...,b...->bi", u, j)
                           for u, j in zip(us, jk, strict=True))
                total = total + (coef ** 2).sum()
            return total

        micro = list(zip(split_rows(states[0], sizes), split_rows(u_next, sizes), strict=True))
        scaled_any = False
        for members, damping in units:
            k0 = gains[0].k
            model_quad = sum((gains[0].q_theta[n] * k0[n]).sum() for n in members)
            reg = damping * sum((k0[n] ** 2).sum() for n in members)
            scale = max(1.0, float((batch_term(members, micro) + reg) / model_quad))
            whole = max(1.0, float((batch_term(members, [(states[0], u_next)]) + reg)
                                   / model_quad))
            scaled_any |= scale > 1.01 and abs(scale - whole) > 1e-3 * scale
            for n in members:
                torch.testing.assert_close(gains[1].k[n], k0[n] / scale)
    assert scaled_any  # a unit the micro-batch linearisation scales differently
