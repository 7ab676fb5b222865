"""Forms of execution that must not change the math: both forms of the per-sample contractions
(dgn_dist.dgnopt.dots) equal the einsum definitions, a whole DGNOpt step taken with the
elementwise (CUDA) form equals the matrix-product (CPU) form, and the per-sample chunk budget
(curvature.chunk_mb) changes the step only by rounding."""

from __future__ import annotations

import pytest
import torch

from dgn_dist.dgnopt import dots

FORMS = [True, False]


@pytest.mark.parametrize("elementwise", FORMS)
@pytest.mark.parametrize("r,s", [(1, 1), (2, 2), (3, 4)])
def test_sample_inner(elementwise: bool, r: int, s: int) -> None:
    g = torch.Generator().manual_seed(r * 10 + s)
    x = torch.randn(5, r, 37, generator=g, dtype=torch.float64)
    y = torch.randn(5, s, 37, generator=g, dtype=torch.float64)
    got = dots.sample_inner(x, y, elementwise)
    torch.testing.assert_close(got, torch.einsum("bid,bjd->bij", x, y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("elementwise", FORMS)
def test_rows_dot_state_dots_combine(elementwise: bool) -> None:
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 50, generator=g, dtype=torch.float64)
    w = torch.randn(50, generator=g, dtype=torch.float64)
    torch.testing.assert_close(dots.rows_dot(rows, w, elementwise), rows @ w)
    u = torch.randn(4, 2, 3, 5, 5, generator=g, dtype=torch.float64)
    v = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    coef = torch.randn(4, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(dots.state_dots(u, v, elementwise),
                               torch.einsum("bi...,b...->bi", u, v))
    torch.testing.assert_close(dots.combine(coef, u, elementwise),
                               torch.einsum("bi,bi...->b...", coef, u))


def test_auto_form_is_the_matrix_product_on_cpu() -> None:
    x = torch.randn(2, 1, 8)
    assert not dots._elementwise(x, 1, None)
    assert dots._elementwise(x, 1, True)


def _params_after_steps(model_name: str, info: str, steps: int = 2,
                        batch: int = 32, chunk_mb: float = 0.0) -> list[torch.Tensor]:
    """Float64 DGNOpt steps with a fresh eigenbasis each step (a stale basis is defined only
    up to a null-space rotation, see dgn_dist.parity): the step is then well posed."""
    from dgn_dist.parity import run_steps

    name = "dgnopt-gr" if info == "gr" else "dgnopt"
    return run_steps(model_name, name, torch.device("cpu"), steps, batch, chunk_mb=chunk_mb)


@pytest.mark.parametrize("model_name,info", [("digits_resnet", "fne"), ("mnist_resnet", "fne"),
                                             ("digits_resnet", "gr")])
def test_dgnopt_step_is_the_same_in_both_forms(model_name: str, info: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Every call site routed through ``dots`` (sweep, Gram, rescaling, update pass) gives the
    same parameters when forced onto the CUDA form; the step itself moves them."""
    before = _params_after_steps(model_name, info, steps=0)
    reference = _params_after_steps(model_name, info)
    calls = []

    def always(x: torch.Tensor, pairs: int, elementwise: bool | None) -> bool:
        calls.append(pairs)
        return True

    monkeypatch.setattr(dots, "_elementwise", always)
    forced = _params_after_steps(model_name, info)
    assert calls, "no contraction went through dgn_dist.dgnopt.dots"
    moved = max(float((a - b).abs().max()) for a, b in zip(reference, before, strict=True))
    assert 1e-4 < moved < 10.0, moved  # a real step, not a diverged one (1e19 and up)
    # Not bit-equal: the two forms round differently, and the step amplifies rounding (the
    # square root of I - Γ near a clipped eigenvalue; a 1e-15 perturbation of the mnist_resnet
    # weights moves its step-2 parameters by 2e-9). A wrong contraction moves them by O(1).
    for a, b in zip(forced, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("model_name,info", [("mnist_resnet", "fne"), ("digits_resnet", "gr")])
def test_chunk_budget_changes_nothing_but_rounding(model_name: str, info: str) -> None:
    """A budget of a few KiB puts one sample in each chunk; the default puts the whole batch
    of these small nets in one."""
    whole = _params_after_steps(model_name, info)
    one_by_one = _params_after_steps(model_name, info, chunk_mb=0.005)
    for a, b in zip(one_by_one, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_chunk_budget_sets_the_chunk_size() -> None:
    from dgn_dist.config import Config
    from dgn_dist.dgnopt.gains import StageSolver, chunk_elements
    from dgn_dist.game import build_game
    from dgn_dist.models import build_model

    model = build_model(Config().model, (1, 8, 8), 10)
    stage = next(s for s in build_game(model, "second").stage_list()
                 if any(p.parameters() for p in s.players))
    assert chunk_elements(1.0, torch.device("cpu")) == 2**18
    assert chunk_elements(0.0, torch.device("cpu")) == 2**24  # auto: 64 MiB
    assert chunk_elements(0.0, torch.device("cuda")) == 2**26  # auto: 256 MiB
    with pytest.raises(ValueError, match="chunk_mb must be >= 0"):
        StageSolver(stage, "fne", "kfac", chunk_mb=-1.0)
