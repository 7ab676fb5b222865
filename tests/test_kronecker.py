"""Kronecker factors against dense float64 matrices built with torch.kron."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgn_dist.optim.kronecker import (
    KroneckerFactor,
    grad_to_matrix,
    gram,
    input_rows,
    matrix_to_param_updates,
    output_rows,
    projected_sq_grads,
    weight_to_matrix,
)

DT = torch.float64


def vec(mat: Tensor) -> Tensor:
    """Column-stacking vec, the module's convention."""
    return mat.T.reshape(-1)


def unvec(v: Tensor, d_out: int) -> Tensor:
    return v.reshape(-1, d_out).T


def make_layer(kind: str) -> tuple[nn.Module, Tensor]:
    if kind == "linear":
        return nn.Linear(3, 2).to(DT), torch.randn(7, 3, dtype=DT)
    return (nn.Conv2d(2, 3, 3, stride=2, padding=1).to(DT),
            torch.randn(3, 2, 5, 5, dtype=DT))


def per_example_grads(module: nn.Module, x: Tensor, gout: Tensor) -> Tensor:
    """``[B, d_out, d_in+1]``: autograd gradient of ``<out_b, gout_b>`` for each example."""
    mats = []
    for b in range(x.shape[0]):
        module.zero_grad()
        (module(x[b:b + 1]) * gout[b:b + 1]).sum().backward()
        mats.append(grad_to_matrix(module).clone())
    return torch.stack(mats)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("mode", ["kfac", "ekfac"])
def test_precondition_equals_dense_kron_solve(kind: str, mode: str) -> None:
    module, x = make_layer(kind)
    out = module(x)
    gout = torch.randn_like(out)
    n = x.shape[0]
    a, g = input_rows(module, x.detach()), output_rows(module, gout)
    factor = KroneckerFactor(mode)  # type: ignore[arg-type]
    factor.update(a, g, decay=0.9, num_examples=n)  # first update copies the batch stats
    factor.refresh_eigenbasis()
    a_mat, g_mat = a.T @ a / a.shape[0], g.T @ g / n
    torch.testing.assert_close(factor.A, a_mat)
    torch.testing.assert_close(factor.G, g_mat)
    if mode == "kfac":
        dense = torch.kron(a_mat, g_mat)
    else:
        factor.update_scaling(a, g, decay=0.0, num_examples=n)
        assert factor.q_a is not None and factor.q_g is not None
        per_ex = per_example_grads(module, x, gout)
        s = ((factor.q_g.T @ per_ex @ factor.q_a) ** 2).mean(0)
        torch.testing.assert_close(factor.scaling, s)
        q = torch.kron(factor.q_a, factor.q_g)
        dense = q @ torch.diag(vec(s)) @ q.T
    mat = torch.randn(g.shape[1], a.shape[1], dtype=DT)
    damping = 0.05
    expected = torch.linalg.solve(dense + damping * torch.eye(dense.shape[0], dtype=DT),
                                  vec(mat))
    got = factor.precondition(mat, damping)
    torch.testing.assert_close(got, unvec(expected, g.shape[1]), rtol=1e-9, atol=1e-10)


def test_single_example_linear_identity() -> None:
    """F_θᵀ u uᵀ F_θ (dense Jacobian of a Linear + tanh stage) = (a aᵀ) ⊗ (g gᵀ)."""
    layer = nn.Linear(3, 2).to(DT)
    x = torch.randn(3, dtype=DT)
    u = torch.randn(2, dtype=DT)
    m0 = weight_to_matrix(layer.weight, layer.bias).detach()

    def stage(m: Tensor) -> Tensor:
        return torch.tanh(m[:, :-1] @ x + m[:, -1])

    jac = torch.autograd.functional.jacobian(stage, m0)  # [2, 2, 4]
    f_theta = jac.permute(0, 2, 1).reshape(2, -1)  # columns in vec (column-major) order
    dense = f_theta.T @ torch.outer(u, u) @ f_theta
    a = input_rows(layer, x[None])
    j_out = torch.autograd.functional.jacobian(torch.tanh, layer(x[None])[0].detach())
    g = output_rows(layer, (j_out.T @ u)[None])
    torch.testing.assert_close(torch.kron(a.T @ a, g.T @ g), dense)
    factor = KroneckerFactor("kfac")
    factor.update(a, g, decay=0.0, num_examples=1)
    factor.refresh_eigenbasis()
    grad = torch.randn(2, 4, dtype=DT)
    expected = torch.linalg.solve(dense + 0.1 * torch.eye(8, dtype=DT), vec(grad))
    torch.testing.assert_close(factor.precondition(grad, 0.1), unvec(expected, 2))


@pytest.mark.parametrize("conv_kwargs", [
    dict(stride=2, padding=1),
    dict(stride=1, padding=2, dilation=2),
    dict(stride=1, padding="same", padding_mode="reflect"),
    dict(stride=2, padding=1, bias=False, padding_mode="circular"),
    dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0)),
    dict(kernel_size=1, stride=2, bias=False),
    dict(stride=(2, 1), padding=(0, 1), padding_mode="replicate"),
])
def test_conv_rows_match_autograd(conv_kwargs: dict) -> None:
    kwargs = {"kernel_size": 3, **conv_kwargs}
    conv = nn.Conv2d(2, 3, **kwargs).to(DT)
    x = torch.randn(2, 2, 6, 6, dtype=DT)
    out = conv(x)
    gout = torch.randn_like(out)
    (out * gout).sum().backward()
    a, g = input_rows(conv, x), output_rows(conv, gout)
    assert a.shape[0] == g.shape[0] == 2 * out.shape[2] * out.shape[3]
    torch.testing.assert_close(g.T @ a, grad_to_matrix(conv))
    # and row by row, F.unfold's layout (example-major, then location; channel, kernel row,
    # kernel column): the strided fast path must reproduce it exactly
    if isinstance(conv.padding, str):
        return
    if conv.padding_mode == "zeros":
        ref = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                       stride=conv.stride)
    else:
        ref = F.unfold(F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode),
                       conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    ref = ref.transpose(1, 2).reshape(-1, ref.shape[1])
    if conv.bias is not None:
        ref = torch.cat([ref, ref.new_ones(ref.shape[0], 1)], dim=1)
    assert torch.equal(a, ref)


def test_factor_dim_rows_and_per_example_scaling() -> None:
    """``[B*r, C, H, W]`` output vectors: S sums over factors, averages over examples."""
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1).to(DT)
    x = torch.randn(3, 2, 5, 5, dtype=DT)
    out = conv(x)
    r = 2
    u = torch.randn(3, r, *out.shape[1:], dtype=DT)
    a, g = input_rows(conv, x.detach()), output_rows(conv, u.reshape(3 * r, *out.shape[1:]))
    assert g.shape[0] == r * a.shape[0]
    q_a = torch.linalg.qr(torch.randn(a.shape[1], a.shape[1], dtype=DT))[0]
    q_g = torch.linalg.qr(torch.randn(3, 3, dtype=DT))[0]
    expected = torch.zeros(3, a.shape[1], dtype=DT)
    for i in range(r):
        per_ex = per_example_grads(conv, x, u[:, i])
        expected += ((q_g.T @ per_ex @ q_a) ** 2).sum(0) / 3
    torch.testing.assert_close(projected_sq_grads(a, g, 3, q_a, q_g), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_use_float32_eigh(dtype: torch.dtype) -> None:
    a = torch.randn(64, 5).to(dtype)
    g = torch.randn(64, 4).to(dtype)
    factor = KroneckerFactor("ekfac")
    factor.update(a, g, decay=0.0, num_examples=64)
    factor.refresh_eigenbasis()
    factor.update_scaling(a, g, decay=0.5, num_examples=64)
    for t in (factor.A, factor.G, factor.q_a, factor.eig_a, factor.q_g, factor.scaling):
        assert t is not None and t.dtype == torch.float32
    a64 = a.double()
    torch.testing.assert_close(factor.eig_a.double(), torch.linalg.eigvalsh(a64.T @ a64 / 64),
                               rtol=1e-5, atol=1e-6)
    out = factor.precondition(torch.randn(4, 5).to(dtype), 1e-2)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()


def test_matrix_round_trip_and_missing_grad() -> None:
    conv = nn.Conv2d(2, 3, 3)
    mat = weight_to_matrix(conv.weight, conv.bias)
    back = matrix_to_param_updates(conv, mat)
    assert [t.shape for t in back] == [conv.weight.shape, conv.bias.shape]
    torch.testing.assert_close(back[0], conv.weight.detach())
    torch.testing.assert_close(back[1], conv.bias.detach())
    with pytest.raises(ValueError, match="backward"):
        grad_to_matrix(conv)
    with pytest.raises(ValueError, match="groups=1"):
        input_rows(nn.Conv2d(2, 2, 3, groups=2), torch.randn(1, 2, 4, 4))


def test_stats_state_round_trip_and_errors() -> None:
    factor = KroneckerFactor("ekfac")
    assert factor.stats() == {}
    with pytest.raises(RuntimeError, match="update"):
        factor.refresh_eigenbasis()
    a, g = torch.randn(10, 4), torch.randn(10, 3)
    factor.update(a, g, 0.0, 10)
    factor.refresh_eigenbasis()
    stats = factor.stats()
    assert set(stats) == {f"{k}_{s}" for k in "AG" for s in ("eig_max", "eig_min", "cond")}
    assert stats["A_eig_max"] == pytest.approx(float(torch.linalg.eigvalsh(factor.A).max()))
    other = KroneckerFactor("ekfac")
    other.load_state_dict(factor.state_dict())
    mat = torch.randn(3, 4)
    torch.testing.assert_close(other.precondition(mat, 1e-3), factor.precondition(mat, 1e-3))
    with pytest.raises(ValueError, match="mode"):
        KroneckerFactor("kfac").load_state_dict(factor.state_dict())
    with pytest.raises(ValueError, match="mode"):
        KroneckerFactor("natural")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="decay"):
        factor.update(a, g, 1.0, 10)


def test_linear_rows_with_extra_dims() -> None:
    """Linear inputs with extra dims give one row per position, bias column last."""
    layer = nn.Linear(4, 2).to(DT)
    x = torch.randn(2, 3, 4, dtype=DT)
    out = layer(x)
    gout = torch.randn_like(out)
    (out * gout).sum().backward()
    a, g = input_rows(layer, x), output_rows(layer, gout)
    assert a.shape == (6, 5) and torch.equal(a[:, -1], torch.ones(6, dtype=DT))
    torch.testing.assert_close(g.T @ a, grad_to_matrix(layer))


@pytest.mark.parametrize("width", [3, 255, 256, 577, 1030])
def test_gram_equals_the_full_product_and_is_symmetric(width: int) -> None:
    """``gram`` (block upper triangle from width 256 on, widths not divisible by the block
    count included) equals ``xᵀx``; the lower triangle is the mirrored upper one."""
    x = torch.randn(37, width, dtype=torch.float64)
    out = gram(x)
    torch.testing.assert_close(out, x.T @ x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, out.T, rtol=1e-13, atol=1e-12)
    if width >= 256:  # the blocks below the diagonal are copies
        q = width // 4
        assert torch.equal(out[q:, :q], out[:q, q:].T)
