"""Cooperative solves of two output groups (eq. 11, 14, 15, 27; DESIGN.md section 3).

:class:`CoopPairBlock` couples two :class:`~dgn_dist.dgnopt.blocks.KronBlock` groups ``u``,
``v`` that write separate outputs through the cross factors ``A_uv = mean_rows a_u a_vᵀ``,
``B_uv = Σ_rows g_u g_vᵀ`` and solves the block-Kronecker matrix exactly (to the CG
tolerance) in the Schur form of eq. 11, with Prop. 5's ``(Ã ⊗ B̃ + λ)⁻¹`` as preconditioner.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dgn_dist.dgnopt.blocks import Block, KronBlock, Native, PsiRows, StageBatch, _batch_dot, _ema
from dgn_dist.dgnopt.reduction import Stat
from dgn_dist.optim.kronecker import KroneckerFactor, stat_dtype


def pcg(apply: Callable[[Tensor], Tensor], precond: Callable[[Tensor], Tensor], rhs: Tensor,
        iters: int, tol: float) -> Tensor:
    """Preconditioned conjugate gradients for ``apply(x) = rhs``, batched over the leading
    dims of ``rhs`` (matrices in the last two dims). ``iters = 0`` returns ``precond(rhs)``."""
    lead = rhs.dim() - 2
    x = precond(rhs)
    if iters <= 0:
        return x
    norm = _batch_dot(rhs, rhs, lead).sqrt().clamp_min(torch.finfo(rhs.dtype).tiny)
    r = rhs - apply(x)
    z = precond(r)
    p = z
    rz = _batch_dot(r, z, lead)
    expand = (...,) + (None, None)
    for _ in range(iters):
        if float((_batch_dot(r, r, lead).sqrt() / norm).max()) <= tol:
            break
        ap = apply(p)
        pap = _batch_dot(p, ap, lead)
        alpha = torch.where(pap > 0, rz / torch.where(pap > 0, pap, 1.0), 0.0)
        x = x + alpha[expand] * p
        r = r - alpha[expand] * ap
        z = precond(r)
        rz_new = _batch_dot(r, z, lead)
        beta = torch.where(rz > 0, rz_new / torch.where(rz > 0, rz, 1.0), 0.0)
        p = z + beta[expand] * p
        rz = rz_new
    return x


class CoopPairBlock(Block):
    """Two output groups ``u``, ``v`` writing separate outputs (eq. 11, 14, 15, 27).

    Solves the block-Kronecker matrix ``[[P_uu, A_uv ⊗ B_uv], [·ᵀ, P_vv]]`` (damping on the
    diagonal blocks) exactly, up to the conjugate-gradient tolerance; see the module
    docstring. ``A_uv = mean_rows a_u a_vᵀ``, ``B_uv = Σ_rows g_u g_vᵀ``; ``zero_cross``
    zeroes them (then the solve is the block-diagonal one, Theorem 6).
    """

    def __init__(self, u: KronBlock, v: KronBlock, iters: int, tol: float,
                 zero_cross: bool = False) -> None:
        super().__init__(u.members + v.members, u.views + v.views)
        self.u, self.v = u, v
        self.iters, self.tol = iters, tol
        self.zero_cross = zero_cross
        self.a_uv: Tensor | None = None
        self.b_uv: Tensor | None = None
        self.pre = KroneckerFactor("kfac")
        self.needs_psi = u.needs_psi or v.needs_psi
        self.last_cross_ratio: Tensor | None = None

    def batch_stats(self, batch: StageBatch, update_factors: bool) -> dict[str, Stat]:
        """Both groups' ``A``, ``G`` (prefixed ``u.`` / ``v.``) and the cross factors
        ``A_uv`` (mean over rows) and ``B_uv`` (sum over rows) of this step, when due."""
        out = {f"u.{k}": s for k, s in self.u.batch_stats(batch, update_factors).items()}
        out.update({f"v.{k}": s for k, s in self.v.batch_stats(batch, update_factors).items()})
        if update_factors or self.a_uv is None:
            a_u, g_u = self.u.rows(batch)
            a_v, g_v = self.v.rows(batch)
            if a_u.shape[0] != a_v.shape[0] or g_u.shape[0] != g_v.shape[0]:
                names = ", ".join(v.name for v in self.views)
                raise ValueError(f"players {names}: the two output groups have different "
                                 f"numbers of rows ({a_u.shape[0]} vs {a_v.shape[0]}); the "
                                 "cooperative factors need aligned output positions")
            dt = stat_dtype(a_u.dtype)
            a_uv = a_u.to(dt).T @ a_v.to(dt) / a_u.shape[0]
            b_uv = g_u.to(dt).T @ g_v.to(dt)
            if self.zero_cross:
                a_uv, b_uv = torch.zeros_like(a_uv), torch.zeros_like(b_uv)
            out["a_uv"] = Stat(a_uv, mean=True, category="cross")
            out["b_uv"] = Stat(b_uv, mean=False, category="cross")
        return out

    def factors(self) -> list[KroneckerFactor]:
        return [self.u.factor, self.v.factor, self.pre]

    def psi_accumulators(self) -> list[Tensor]:
        return self.u.psi_accumulators() + self.v.psi_accumulators()

    def update(self, batch: StageBatch, decay: float, update_factors: bool,
               refresh: bool, stats: dict[str, Tensor] | None = None) -> None:
        """Fold ``stats`` (default: this replica's :meth:`batch_stats`) in and refresh."""
        if stats is None:
            stats = {k: s.value for k, s in self.batch_stats(batch, update_factors).items()}
        self.u.damping = self.v.damping = self.damping
        for name, blk in (("u", self.u), ("v", self.v)):
            blk.update(batch, decay, update_factors, refresh,
                       stats={k[2:]: v for k, v in stats.items() if k.startswith(f"{name}.")})
        self.needs_psi = self.u.needs_psi or self.v.needs_psi
        if "a_uv" in stats:
            self.a_uv = _ema(self.a_uv, stats["a_uv"], decay)
            self.b_uv = _ema(self.b_uv, stats["b_uv"], decay)
        if refresh or not self.pre.has_eigenbasis:
            self._refresh_preconditioner()

    def _refresh_preconditioner(self) -> None:
        """Prop. 5: ``Ã = A_uu − A_uv A_vv⁻¹ A_vu``, ``B̃`` likewise (``√λ``-regularised)."""
        fu, fv = self.u.factor, self.v.factor
        assert fu.A is not None and fu.G is not None and fv.A is not None and fv.G is not None
        assert self.a_uv is not None and self.b_uv is not None
        eps = max(self.damping, 1e-12) ** 0.5
        eye_a = torch.eye(fv.A.shape[0], dtype=fv.A.dtype, device=fv.A.device)
        eye_g = torch.eye(fv.G.shape[0], dtype=fv.G.dtype, device=fv.G.device)
        a_t = fu.A - self.a_uv @ torch.linalg.solve(fv.A + eps * eye_a, self.a_uv.T)
        b_t = fu.G - self.b_uv @ torch.linalg.solve(fv.G + eps * eye_g, self.b_uv.T)
        self.pre.update_stats((a_t + a_t.T) / 2, (b_t + b_t.T) / 2, 0.0)
        self.pre.refresh_eigenbasis()

    def psi_stats(self, psis: PsiRows) -> None:
        for blk in (self.u, self.v):
            if blk.needs_psi:
                blk.psi_stats(psis)

    def end_psi_stats(self, decay: float) -> None:
        self.u.end_psi_stats(decay)
        self.v.end_psi_stats(decay)

    def reset_psi_stats(self) -> None:
        self.u.reset_psi_stats()
        self.v.reset_psi_stats()

    def cross_uv(self, m_v: Tensor) -> Tensor:
        """``P_uv vec(M_v) = vec(B_uv M_v A_uvᵀ)``."""
        assert self.a_uv is not None and self.b_uv is not None
        return (self.b_uv @ m_v.to(self.b_uv.dtype) @ self.a_uv.T).to(m_v.dtype)

    def cross_vu(self, m_u: Tensor) -> Tensor:
        """``P_vu vec(M_u) = vec(B_uvᵀ M_u A_uv)``."""
        assert self.a_uv is not None and self.b_uv is not None
        return (self.b_uv.T @ m_u.to(self.b_uv.dtype) @ self.a_uv).to(m_u.dtype)

    def solve(self, rhs: Native) -> Native:
        r_u, r_v = self.u.joint(rhs), self.v.joint(rhs)
        l_gain = self.v.solve_joint(r_v)  # non-cooperative gain of v (footnote 2)
        cross = self.cross_uv(l_gain)
        target = r_u - cross  # eq. 11: P_u − P_uv l

        def schur(x: Tensor) -> Tensor:
            return self.u.apply_joint(x) - self.cross_uv(self.v.solve_joint(self.cross_vu(x)))

        def precond(x: Tensor) -> Tensor:
            return self.pre.precondition(x, self.damping)

        k_u = pcg(schur, precond, target, self.iters, self.tol)
        k_v = self.v.solve_joint(r_v - self.cross_vu(k_u))
        if r_u.dim() == 2:
            self.last_cross_ratio = cross.norm() / r_u.norm().clamp_min(1e-30)
        out = self.u.split(k_u)
        out.update(self.v.split(k_v))
        return out

    def state(self) -> dict[str, Tensor]:
        out = {f"u.{k}": v for k, v in self.u.state().items()}
        out.update({f"v.{k}": v for k, v in self.v.state().items()})
        for key, val in (("a_uv", self.a_uv), ("b_uv", self.b_uv)):
            if val is not None:
                out[key] = val
        out.update({f"pre.{k}": v for k, v in self.pre.state_dict().items()
                    if isinstance(v, Tensor)})
        return out

    def load_state(self, state: dict[str, Tensor]) -> None:
        self.u.load_state({k[2:]: v for k, v in state.items() if k.startswith("u.")})
        self.v.load_state({k[2:]: v for k, v in state.items() if k.startswith("v.")})
        self.a_uv, self.b_uv = state.get("a_uv"), state.get("b_uv")
        pre: dict[str, Tensor | str | None] = {"mode": "kfac"}
        for name in KroneckerFactor._FIELDS:
            pre[name] = state.get(f"pre.{name}")
        self.pre.load_state_dict(pre)

    def player_stats(self) -> dict[str, dict[str, float]]:
        return {**self.u.player_stats(), **self.v.player_stats()}
