"""Per-sample inner products in the form that is fast on each backend.

The sweep, the Gram matrix ``Γ_b`` (DESIGN.md section 3) and the update pass contract long
per-sample vectors (a state ``[B, r, C, H, W]`` or a layer's projections ``[B, r, d_out·d_in]``)
down to ``[B, r, s]`` with small ``r, s``. Written as a batched matrix product, cuBLAS runs such
a contraction as batched gemv with one thread block per output row, so a batch of 8-128 samples
occupies a handful of an H100's 132 SMs: it took 40 % of a DGNOpt ResNet-18 step's GPU time
(``launch/gpu_check.sh``, batch 128). An elementwise product with a sum spreads each
reduction over the whole GPU. On the CPU the BLAS dot product is the faster form (7 samples
of 2.4M: 3.8 ms against 28 ms for the two passes), so the CPU keeps the matrix product.
"""

from __future__ import annotations

from torch import Tensor

#: The elementwise form materialises ``[B, r, s, D]``: only for ``r·s`` up to this.
MAX_ELEMENTWISE_PAIRS = 4


def _elementwise(x: Tensor, pairs: int, elementwise: bool | None) -> bool:
    if elementwise is not None:
        return elementwise
    return x.is_cuda and pairs <= MAX_ELEMENTWISE_PAIRS


def sample_inner(x: Tensor, y: Tensor, elementwise: bool | None = None) -> Tensor:
    """``out[b, i, j] = <x[b, i], y[b, j]>`` for ``x [B, r, D]``, ``y [B, s, D]``.
    ``elementwise``: force one form (tests); ``None`` picks by device (module docstring)."""
    if _elementwise(x, x.shape[1] * y.shape[1], elementwise):
        return (x.unsqueeze(2) * y.unsqueeze(1)).sum(-1)
    return x @ y.transpose(1, 2)


def rows_dot(rows: Tensor, w: Tensor, elementwise: bool | None = None) -> Tensor:
    """``rows @ w`` for ``rows [N, D]`` and ``w [D]``, ``[N]`` (few long rows: see
    :func:`sample_inner`)."""
    if _elementwise(rows, 1, elementwise) and rows.shape[0] <= rows.shape[1]:
        return (rows * w).sum(-1)
    return rows @ w


def state_dots(u: Tensor, v: Tensor, elementwise: bool | None = None) -> Tensor:
    """``<u[b, i], v[b]>`` for factors ``u [B, r, *s]`` and a state ``v [B, *s]``, ``[B, r]``."""
    return sample_inner(u.flatten(2), v.flatten(1).unsqueeze(1), elementwise).squeeze(-1)


def combine(coef: Tensor, u: Tensor, elementwise: bool | None = None) -> Tensor:
    """``Σ_i coef[b, i] u[b, i]`` for ``coef [B, r]`` and factors ``u [B, r, *s]``, ``[B, *s]``."""
    if _elementwise(u, coef.shape[1], elementwise):
        return (coef.reshape(*coef.shape, *([1] * (u.dim() - 2))) * u).sum(1)
    return (coef.unsqueeze(1) @ u.flatten(2)).reshape(u.shape[0], *u.shape[2:])
