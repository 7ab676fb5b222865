"""One player's parameters in the layout the solvers use (DESIGN.md section 3).

* Kronecker players (Linear, Conv2d) use the matrix ``M = [W | b]`` of shape
  ``[d_out, d_in (+1)]`` from :mod:`dgn_dist.optim.kronecker`;
* diagonal players (BatchNorm) use the flat vector of their parameters.

A tensor "in native form" has that shape, optionally with leading batch dimensions (one per
per-sample gradient). :class:`PlayerView` converts parameter-shaped tensors to and from the
native form and builds per-sample gradients ``ψ_{b,i} = F_θᵀ u_{b,i}`` from the rows the
stage passes captured.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from dgn_dist.game.core import Player
from dgn_dist.optim.kronecker import (
    input_rows,
    is_kronecker_layer,
    matrix_to_param_updates,
    output_rows,
    weight_to_matrix,
)


class PlayerView:
    """Native layout, rows and per-sample gradients of one player.

    Args:
        player: the game's player; ``"kron"`` players must be Linear / Conv2d (groups 1) with
            all of ``weight`` (and ``bias``) trainable; ``"diag"`` players must be BatchNorm.
    """

    def __init__(self, player: Player) -> None:
        self.player = player
        self.name = player.name
        self.module = player.module
        self.params: list[nn.Parameter] = player.parameters()
        self.kron = player.curvature == "kron"
        if self.kron:
            if not is_kronecker_layer(self.module):
                raise ValueError(f"player {self.name}: Kronecker curvature needs nn.Linear or "
                                 f"nn.Conv2d with groups=1, got {type(self.module).__name__}")
            expected = [p for p in (self.module.weight, self.module.bias) if p is not None]
            if len(self.params) != len(expected):
                raise ValueError(f"player {self.name}: all of weight/bias must be trainable "
                                 "for Kronecker curvature (freeze the whole layer instead)")
        elif not isinstance(self.module, _BatchNorm):
            raise ValueError(f"player {self.name}: diagonal players must be BatchNorm layers, "
                             f"got {type(self.module).__name__}")

    # -- layout ------------------------------------------------------------------------
    def to_native(self, tensors: Sequence[Tensor]) -> Tensor:
        """Parameter-shaped tensors (``Player.parameters()`` order) -> native form."""
        if self.kron:
            bias = tensors[1] if len(tensors) > 1 else None
            return weight_to_matrix(tensors[0], bias)
        return torch.cat([t.reshape(-1) for t in tensors])

    def from_native(self, native: Tensor) -> list[Tensor]:
        """Native form -> parameter-shaped tensors (``Player.parameters()`` order)."""
        if self.kron:
            return matrix_to_param_updates(self.module, native)
        out, offset = [], 0
        for p in self.params:
            out.append(native[offset:offset + p.numel()].reshape(p.shape))
            offset += p.numel()
        return out

    def theta(self) -> Tensor:
        """The current parameters in native form."""
        return self.to_native([p.detach() for p in self.params])

    # -- rows --------------------------------------------------------------------------
    def a_rows(self, layer_input: Tensor) -> Tensor:
        """Input rows ``[N * L, d_in (+1)]`` (Kronecker players)."""
        return input_rows(self.module, layer_input.detach())

    def g_rows(self, grad_output: Tensor) -> Tensor:
        """Output-side rows ``[N' * L, d_out]`` (Kronecker players)."""
        return output_rows(self.module, grad_output.detach())

    def normalized_input(self, layer_input: Tensor) -> Tensor:
        """``x̂ = (x - mean) / sqrt(var + eps)`` as the BatchNorm layer computes it (batch
        statistics in training mode or without running statistics, else running ones)."""
        m = self.module
        assert isinstance(m, _BatchNorm)
        batch_stats = m.training or m.running_mean is None
        return F.batch_norm(layer_input.detach(), None if batch_stats else m.running_mean,
                            None if batch_stats else m.running_var, None, None,
                            batch_stats, 0.0, m.eps)

    def per_sample(self, num: int, rank: int, a: Tensor, g: Tensor) -> Tensor:
        """Per-sample gradients ``ψ_{b,i}`` in native form, shape ``[num * rank, *native]``.

        Args:
            num: number of samples ``b`` in this chunk.
            rank: factors per sample.
            a: Kronecker: input rows of the chunk ``[num * L, d_in]``; diagonal: the normalised
                input ``x̂`` of the chunk ``[num, C, ...]``.
            g: Kronecker: output rows ``[num * rank * L, d_out]``; diagonal: the output-side
                vectors ``[num * rank, C, ...]``.
        """
        if self.kron:
            locs = a.shape[0] // num
            a3 = a.reshape(num, locs, a.shape[-1])
            g4 = g.reshape(num, rank, locs, g.shape[-1])
            psi = torch.einsum("nrlo,nli->nroi", g4, a3)
            return psi.reshape(num * rank, *psi.shape[2:])
        x_hat = a.repeat_interleave(rank, dim=0)
        dims = [d for d in range(g.dim()) if d not in (0, 1)]
        parts = []
        for name in self._bn_param_names():
            if name == "weight":
                parts.append((g * x_hat).sum(dims) if dims else g * x_hat)
            else:
                parts.append(g.sum(dims) if dims else g)
        return torch.cat(parts, dim=1)

    def _bn_param_names(self) -> list[str]:
        ids = {id(p): n for n, p in self.module.named_parameters(recurse=False)}
        return [ids[id(p)] for p in self.params]


def native_grads(views: Sequence[PlayerView], grads: Sequence[Tensor]) -> list[Tensor]:
    """Per view, its parameters' leading entries of ``grads`` (the views' parameters in
    order; anything after them is ignored) in native form, detached."""
    out, offset = [], 0
    for v in views:
        out.append(v.to_native([g.detach() for g in grads[offset:offset + len(v.params)]]))
        offset += len(v.params)
    return out
