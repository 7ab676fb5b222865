"""Dense float64 oracle of DGNOpt: DESIGN.md section 2 literally, for tiny games.

API (stable; import from tests as ``from oracle import ...``)::

    solve_game(game, x, y, *, info="fne", lr=1.0, damping=0.0, weight_decay=0.0,
               feedback_scale=1.0, terminal_factors=None, curvature="gn",
               curvature_override=None, zero_cross=False, zero_feedback=False) -> OracleResult
        info: "olne" (each player's own block, K = 0, V_x = Q_x, V_xx = Q_xx: back-prop),
        "fne" (each player's own block) | "gr" (joint block matrix).
        terminal_factors: None -> exact CE Hessian (block-diagonal over samples), else
        u [B, r, C] with V_xx,b = sum_i u_bi u_biᵀ.  curvature: "gn" (ℓ_θθ + F_θᵀV_xxF_θ + λI)
        or "identity" (I).  curvature_override(t, Q_thth) -> matrix used instead (no damping
        added).  zero_cross: zero the cross-player blocks (gr).  zero_feedback: Q_θx := 0.
        The game is deep-copied and run in float64; the input game is never modified.
    OracleResult: stages[t] (StageResult), V_x[t] / V_xx[t] for t = 0..T (index T is the
        terminal), states[t] / new_states[t] (state tuples X_t, X'_t), dX[t] (flat δX_t),
        deltas / new_params (dict keyed by the model's parameter names, param-shaped),
        loss (float).
    StageResult (all dense, float64): names (player names), slices (player n's rows of the
        stacked θ), param_names, F_x [d_out, d_in], F_theta [d_out, p], Q_x [d_in],
        Q_theta [p], Q_xx [d_in, d_in], Q_thetax [p, d_in] (after zero_feedback),
        Q_thetatheta [p, p] = ℓ_θθ + F_θᵀ V_xx F_θ + λI (the Gauss-Newton definition, joint
        with cross blocks), solve_matrix [p, p] (what the solve actually inverted: block
        diagonal for olne/fne, joint for gr), k [p], K [p, d_in] (stacked over players,
        K = 0 for olne), V_x [d_in], V_xx [d_in, d_in] (value derivatives at the stage input).
        k_of(n), K_of(n): player n's rows.
    flatten_state(state) / unflatten_state(vec, like): the state-vector layout: tuple entries
        concatenated, each entry ``reshape(-1)`` (so sample-major within an entry).
    θ layout of a stage: players in ``stage.players`` order, each player's parameters in
        ``Player.parameters()`` (= ``module.parameters()``) order, each ``reshape(-1)``.
    ce_hessian(logits), exact_terminal_factors(logits) -> u [B, C, C],
    factors_to_dense(u [B, r, *shape]) -> block-diagonal [B·D, B·D],
    solve_gains(solve_matrix, Q_theta, Q_thetax) -> (k, K) (pseudo-inverse when singular),
    fictitious_total_update(g, F, N) = N (I + (N−1) F)⁻¹ g (eq. 16).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.autograd.functional import jacobian
from torch.func import functional_call
from torch.nn import functional as tnf

from dgn_dist.game.core import Game, Stage, State

Info = Literal["olne", "fne", "gr"]
CurvatureOverride = Callable[[int, Tensor], Tensor]


def flatten_state(state: Sequence[Tensor]) -> Tensor:
    """Concatenate the state tuple's entries, each flattened (sample-major)."""
    return torch.cat([s.reshape(-1) for s in state])


def unflatten_state(vec: Tensor, like: Sequence[Tensor]) -> State:
    """Inverse of :func:`flatten_state` for entries shaped like ``like``."""
    out, offset = [], 0
    for s in like:
        out.append(vec[offset:offset + s.numel()].reshape(s.shape))
        offset += s.numel()
    return tuple(out)


def ce_hessian(logits: Tensor) -> Tensor:
    """Exact Hessian of ``mean_b CE`` w.r.t. flat logits: blocks ``(diag p_b − p_b p_bᵀ)/B``."""
    b = logits.shape[0]
    p = torch.softmax(logits, dim=1)
    blocks = [(torch.diag(p[i]) - torch.outer(p[i], p[i])) / b for i in range(b)]
    return torch.block_diag(*blocks)


def exact_terminal_factors(logits: Tensor) -> Tensor:
    """``u[b, c] = sqrt(p_bc / B) (e_c − p_b)``, shape ``[B, C, C]`` (DESIGN.md section 3)."""
    b, c = logits.shape
    p = torch.softmax(logits, dim=1)
    eye = torch.eye(c, dtype=logits.dtype)
    return (p / b).sqrt()[:, :, None] * (eye[None] - p[:, None, :])


def factors_to_dense(u: Tensor) -> Tensor:
    """Block-diagonal ``V_xx`` from per-sample factors ``u [B, r, *shape]``."""
    flat = u.reshape(u.shape[0], u.shape[1], -1)
    return torch.block_diag(*[f.T @ f for f in flat])


def solve_gains(matrix: Tensor, q_theta: Tensor, q_thetax: Tensor) -> tuple[Tensor, Tensor]:
    """``k = M⁻¹ Q_θ``, ``K = M⁻¹ Q_θx``; the pseudo-inverse when ``M`` is not PD (eq. 9)."""
    if matrix.numel() == 0:
        return q_theta.clone(), q_thetax.clone()
    chol, info = torch.linalg.cholesky_ex(matrix)
    rhs = torch.cat([q_theta[:, None], q_thetax], dim=1)
    if int(info) == 0:
        sol = torch.cholesky_solve(rhs, chol)
    else:
        sol = torch.linalg.pinv(matrix, hermitian=True) @ rhs
    return sol[:, 0], sol[:, 1:]


def fictitious_total_update(g: Tensor, cross: Tensor, n: int) -> Tensor:
    """Total update of ``n`` fictitious players with own curvature I, cross ``F`` (eq. 16)."""
    eye = torch.eye(g.numel(), dtype=g.dtype)
    return n * torch.linalg.solve(eye + (n - 1) * cross, g)


@dataclass
class StageResult:
    """Dense quantities of one stage of the backward sweep (see the module docstring)."""

    name: str
    names: list[str]
    slices: list[slice]
    param_names: list[str]
    F_x: Tensor
    F_theta: Tensor
    Q_x: Tensor
    Q_theta: Tensor
    Q_xx: Tensor
    Q_thetax: Tensor
    Q_thetatheta: Tensor
    solve_matrix: Tensor
    k: Tensor
    K: Tensor
    V_x: Tensor
    V_xx: Tensor

    def k_of(self, n: int) -> Tensor:
        return self.k[self.slices[n]]

    def K_of(self, n: int) -> Tensor:
        return self.K[self.slices[n]]


@dataclass
class OracleResult:
    """Backward sweep per stage plus the update pass (see the module docstring)."""

    stages: list[StageResult]
    V_x: list[Tensor]
    V_xx: list[Tensor]
    states: list[State]
    new_states: list[State]
    dX: list[Tensor]
    deltas: dict[str, Tensor]
    new_params: dict[str, Tensor]
    loss: float


class _StageFn:
    """``F_t`` as a function of (flat state, flat θ) through ``functional_call``."""

    def __init__(self, stage: Stage, like: State) -> None:
        self.stage = stage
        self.like = like
        ids = {id(p): n for n, p in stage.named_parameters(remove_duplicate=False)}
        self.params = [p for pl in stage.players for p in pl.parameters()]
        self.keys = [ids[id(p)] for p in self.params]
        self.param_names = [n for pl in stage.players for n, _ in pl.named_parameters()]
        sizes = [pl.numel() for pl in stage.players]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.slices = [slice(s, s + n) for s, n in zip(starts, sizes, strict=True)]

    def theta(self) -> Tensor:
        if not self.params:
            return torch.zeros(0, dtype=torch.float64)
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def split_theta(self, theta: Tensor) -> list[Tensor]:
        out, offset = [], 0
        for p in self.params:
            out.append(theta[offset:offset + p.numel()].reshape(p.shape))
            offset += p.numel()
        return out

    def __call__(self, x_flat: Tensor, theta: Tensor) -> Tensor:
        state = unflatten_state(x_flat, self.like)
        params = dict(zip(self.keys, self.split_theta(theta), strict=True))
        return flatten_state(functional_call(self.stage, params, (state,)))


def _block_diagonal(matrix: Tensor, slices: Sequence[slice]) -> Tensor:
    out = torch.zeros_like(matrix)
    for s in slices:
        out[s, s] = matrix[s, s]
    return out


def _backward_stage(t: int, fn: _StageFn, x_t: State, v_x: Tensor, v_xx: Tensor, *,
                    info: Info, damping: float, weight_decay: float, curvature: str,
                    curvature_override: CurvatureOverride | None, zero_cross: bool,
                    zero_feedback: bool) -> StageResult:
    """One step of Alg. 1 lines 4-7 with dense Jacobians (DESIGN.md section 2.1)."""
    theta = fn.theta()
    f_x, f_th = jacobian(fn, (flatten_state(x_t).detach(), theta))
    p = theta.numel()
    eye = torch.eye(p, dtype=torch.float64)
    q_th = weight_decay * theta + f_th.T @ v_x
    q_x = f_x.T @ v_x
    q_thth = weight_decay * eye + f_th.T @ v_xx @ f_th + damping * eye
    q_thx = f_th.T @ v_xx @ f_x
    q_xx = f_x.T @ v_xx @ f_x
    if zero_feedback:
        q_thx = torch.zeros_like(q_thx)
    if curvature_override is not None:
        matrix = curvature_override(t, q_thth)
    elif curvature == "identity":
        matrix = eye
    else:
        matrix = q_thth
    if info != "gr" or zero_cross:
        matrix = _block_diagonal(matrix, fn.slices)  # each player its own block (eq. 9)
    k, gain = solve_gains(matrix, q_th, q_thx)
    if info == "olne":
        gain = torch.zeros_like(gain)
        v_x_t, v_xx_t = q_x, q_xx  # plain back-propagation (Prop. 2)
    else:
        v_x_t, v_xx_t = q_x - q_thx.T @ k, q_xx - q_thx.T @ gain  # eq. 10, one co-state
    return StageResult(
        name=fn.stage.name, names=[pl.name for pl in fn.stage.players], slices=fn.slices,
        param_names=fn.param_names, F_x=f_x, F_theta=f_th, Q_x=q_x, Q_theta=q_th, Q_xx=q_xx,
        Q_thetax=q_thx, Q_thetatheta=q_thth, solve_matrix=matrix, k=k, K=gain, V_x=v_x_t,
        V_xx=v_xx_t)


def solve_game(game: Game, x: Tensor, y: Tensor, *, info: Info = "fne", lr: float = 1.0,
               damping: float = 0.0, weight_decay: float = 0.0, feedback_scale: float = 1.0,
               terminal_factors: Tensor | None = None, curvature: str = "gn",
               curvature_override: CurvatureOverride | None = None, zero_cross: bool = False,
               zero_feedback: bool = False) -> OracleResult:
    """One DGNOpt iteration (Alg. 1) computed densely in float64; see the module docstring."""
    if info not in ("olne", "fne", "gr"):
        raise ValueError(f"info must be olne, fne or gr; got {info!r}")
    if curvature not in ("gn", "identity"):
        raise ValueError(f"curvature must be gn or identity; got {curvature!r}")
    g = copy.deepcopy(game).double()
    x = x.detach().double()
    with torch.no_grad():
        states = g.trajectory(x)
    fns = [_StageFn(stage, states[t]) for t, stage in enumerate(g.stage_list())]
    logits = states[-1][0].detach().requires_grad_(True)
    loss = tnf.cross_entropy(logits, y)
    (v_x,) = torch.autograd.grad(loss, logits)
    v_x = v_x.reshape(-1)
    logits = logits.detach()
    if terminal_factors is None:
        v_xx = ce_hessian(logits)
    else:
        v_xx = factors_to_dense(terminal_factors.detach().double())
    n_stages = len(fns)
    v_xs: list[Tensor] = [v_x] * (n_stages + 1)
    v_xxs: list[Tensor] = [v_xx] * (n_stages + 1)
    results: list[StageResult] = [None] * n_stages  # type: ignore[list-item]
    for t in reversed(range(n_stages)):
        res = _backward_stage(t, fns[t], states[t], v_xs[t + 1], v_xxs[t + 1], info=info,
                              damping=damping, weight_decay=weight_decay, curvature=curvature,
                              curvature_override=curvature_override, zero_cross=zero_cross,
                              zero_feedback=zero_feedback)
        results[t], v_xs[t], v_xxs[t] = res, res.V_x, res.V_xx
    # Update pass (Alg. 1 lines 8-12, DESIGN.md section 2.2).
    new_states = [states[0]]
    d_xs = [torch.zeros_like(flatten_state(states[0]))]
    deltas: dict[str, Tensor] = {}
    new_params: dict[str, Tensor] = {}
    with torch.no_grad():
        for t, (fn, res) in enumerate(zip(fns, results, strict=True)):
            d_x = flatten_state(new_states[t]) - flatten_state(states[t])
            d_xs[t] = d_x
            d_theta = lr * (res.k + feedback_scale * (res.K @ d_x))
            theta_new = fn.theta() - d_theta
            for name, d, p_new in zip(fn.param_names, fn.split_theta(d_theta),
                                      fn.split_theta(theta_new), strict=True):
                deltas[name], new_params[name] = d, p_new
            out = fn(flatten_state(new_states[t]), theta_new)
            new_states.append(unflatten_state(out, states[t + 1]))
            d_xs.append(out - flatten_state(states[t + 1]))
    return OracleResult(stages=results, V_x=v_xs, V_xx=v_xxs, states=states,
                        new_states=new_states, dX=d_xs, deltas=deltas, new_params=new_params,
                        loss=float(loss.detach()))
