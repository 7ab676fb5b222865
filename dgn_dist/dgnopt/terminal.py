"""Terminal conditions of the backward sweep (DESIGN.md section 3).

For ``phi(X_T) = mean_b CE(x_{T,b}, y_b)`` the co-state is ``V_x^T = (p - y) / B`` (taken from
the trainer's own ``loss.backward()``), and the terminal Hessian ``V_xx^T`` is block diagonal
over samples with blocks ``(diag p_b - p_b p_bᵀ) / B``. It is represented by per-sample factors
``u [B, r, C]`` with ``V_xx,b ≈ sum_i u_{b,i} u_{b,i}ᵀ``:

* ``empirical`` (r = 1): ``u_b = sqrt(B) V_x,b`` -- the outer-product form of eq. 13 / 27;
* ``sampled`` (r = k): ``u_{b,i} = (p_b - onehot(ŷ_{b,i})) / sqrt(k B)``, ``ŷ ~ p_b``;
* ``exact`` (r = C): ``u_{b,c} = sqrt(p_{b,c} / B) (e_c - p_b)``, since
  ``diag p - p pᵀ = sum_c p_c (e_c - p)(e_c - p)ᵀ``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

VxxKind = Literal["empirical", "sampled", "exact"]
VXX_KINDS: tuple[str, ...] = ("empirical", "sampled", "exact")


def factor_rank(kind: str, rank: int, num_classes: int) -> int:
    """The rank ``r`` of the terminal factors: 1, ``rank`` or the number of classes."""
    if kind == "empirical":
        return 1
    if kind == "sampled":
        return rank
    if kind == "exact":
        return num_classes
    raise ValueError(f"vxx must be one of {', '.join(VXX_KINDS)}; got {kind!r}")


def terminal_factors(logits: Tensor, v_x: Tensor, kind: str, rank: int = 1,
                     generator: torch.Generator | None = None,
                     batch_size: int | None = None) -> Tensor:
    """Per-sample factors ``u [B, r, C]`` of the terminal ``V_xx`` (DESIGN.md section 3).

    Args:
        logits: the network output ``x_T`` of shape ``[B, C]``.
        v_x: ``∂loss/∂logits`` of shape ``[B, C]`` (used by ``empirical``).
        kind: ``"empirical"``, ``"sampled"`` or ``"exact"``.
        rank: number of Monte-Carlo samples for ``sampled`` (ignored otherwise).
        generator: random generator for ``sampled`` (the global one when ``None``).
        batch_size: the ``B`` of ``φ = mean_b CE`` -- the GLOBAL batch under data
            parallelism (``v_x`` then holds this replica's rows of the global ``∂φ/∂x_T``);
            ``None``: the rows of ``logits``.

    Returns:
        ``u`` with ``sum_i u_{b,i} u_{b,i}ᵀ`` the factorised ``V_xx`` block of sample ``b``.
    """
    if logits.dim() != 2:
        raise ValueError("DGNOpt needs logits of shape [batch, classes]; got "
                         f"{tuple(logits.shape)}")
    c = logits.shape[1]
    b = logits.shape[0] if batch_size is None else batch_size
    if kind == "empirical":
        return (b ** 0.5) * v_x.detach()[:, None, :]
    p = torch.softmax(logits.detach(), dim=1)
    if kind == "sampled":
        if rank < 1:
            raise ValueError(f"rank must be >= 1 for vxx='sampled'; got {rank}")
        draws = torch.multinomial(p.float(), rank, replacement=True, generator=generator)
        onehot = torch.nn.functional.one_hot(draws, c).to(p.dtype)  # [B, k, C]
        return (p[:, None, :] - onehot) / (rank * b) ** 0.5
    if kind == "exact":
        eye = torch.eye(c, dtype=p.dtype, device=p.device)
        return (p / b).sqrt()[:, :, None] * (eye[None] - p[:, None, :])
    raise ValueError(f"vxx must be one of {', '.join(VXX_KINDS)}; got {kind!r}")
