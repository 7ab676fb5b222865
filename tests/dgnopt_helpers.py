"""Shared helpers of the DGNOpt tests: tiny float64 games and dense views of the fast path."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgn_dist.dgnopt import DGNOpt
from dgn_dist.dgnopt.gains import StageSolver
from dgn_dist.game import BranchStage, ChainStage, Game, MergeStage, Player, build_game


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(),
                         nn.Linear(4, 3)).double()


def linear_residual(alignment: str) -> Game:
    """stem Linear -> residual block of Linear layers with a Linear shortcut -> head."""
    stem, lin1, lin2 = nn.Linear(4, 5), nn.Linear(5, 4), nn.Linear(4, 4)
    short, head, a0, a1, a2 = nn.Linear(5, 4), nn.Linear(4, 3), nn.Tanh(), nn.Tanh(), nn.Tanh()
    first = alignment == "first"
    stages = [
        ChainStage("stem", [("stem", stem), ("a0", a0)], [Player("stem", stem, "kron")]),
        BranchStage("b:1", [], [("lin1", lin1), ("a1", a1)],
                    [("short", short)] if first else [],
                    [Player("lin1", lin1, "kron", 0)]
                    + ([Player("short", short, "kron", 1)] if first else [])),
        MergeStage("b:2", [("lin2", lin2)], [] if first else [("short", short)], [("a2", a2)],
                   [Player("lin2", lin2, "kron", 0)]
                   + ([] if first else [Player("short", short, "kron", 0)])),
        ChainStage("head", [("head", head)], [Player("head", head, "kron")]),
    ]
    return Game(stages).double()


def conv_residual() -> nn.Module:
    """A tiny DIGITS-like conv net with one residual block (identity shortcut)."""
    from dgn_dist.models.blocks import ResidualBlock
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(),
                         ResidualBlock(2, 2, nn.Tanh), nn.Flatten(),
                         nn.Linear(2 * 4 * 4, 3)).double()


def conv_projection() -> nn.Module:
    """Conv net whose residual block has a 1x1-conv projection shortcut."""
    from dgn_dist.models.blocks import ResidualBlock
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(),
                         ResidualBlock(2, 3, nn.Tanh, stride=2), nn.Flatten(),
                         nn.Linear(3 * 2 * 2, 3)).double()


def game_of(model: nn.Module, alignment: str = "second") -> Game:
    return model if isinstance(model, Game) else build_game(model, alignment)  # type: ignore


def fast_step(model: nn.Module, game: Game, x: Tensor, y: Tensor, **kw: object) -> DGNOpt:
    """One DGNOpt step through the ordinary loop; the sweep is kept in ``last_sweep``."""
    opt = DGNOpt(model, game=game, **kw)  # type: ignore[arg-type]
    opt.keep_sweep = True
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return opt


def stage_param_names(game: Game, model: nn.Module) -> list[list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for pl in st.players for p in pl.parameters()] for st in game.stages]


def dense_inverse(solver: StageSolver) -> Tensor:
    """``Q_θθ⁻¹`` of the fast solver as a dense matrix in the oracle's θ layout."""
    views = solver.views
    sizes = [sum(p.numel() for p in v.params) for v in views]
    total = sum(sizes)
    cols = []
    for j in range(total):
        e = torch.zeros(total, dtype=torch.float64)
        e[j] = 1.0
        rhs, off = [], 0
        for v, n in zip(views, sizes, strict=False):
            chunk, parts, o2 = e[off:off + n], [], 0
            for p in v.params:
                parts.append(chunk[o2:o2 + p.numel()].reshape(p.shape))
                o2 += p.numel()
            rhs.append(v.to_native(parts))
            off += n
        sol = solver.solve(rhs)
        cols.append(torch.cat([t.reshape(-1) for v, s in zip(views, sol, strict=False)
                               for t in v.from_native(s)]))
    return torch.stack(cols, dim=1)


def flat(state: tuple[Tensor, ...]) -> Tensor:
    return torch.cat([s.reshape(-1) for s in state])


def factors_dense(u: tuple[Tensor, ...]) -> Tensor:
    """Block-diagonal dense ``V_xx`` from a factor tuple ``[B, r, *s]`` in the oracle layout
    (tuple entries concatenated, each sample-major)."""
    b, r = u[0].shape[:2]
    sizes = [x[0, 0].numel() for x in u]
    dim = b * sum(sizes)
    out = torch.zeros(dim, dim, dtype=torch.float64)
    for i in range(r):
        vec = torch.zeros(b, dim, dtype=torch.float64)
        off = 0
        for x, s in zip(u, sizes, strict=False):
            for bb in range(b):
                vec[bb, off + bb * s: off + (bb + 1) * s] = x[bb, i].reshape(-1)
            off += b * s
        out += vec.T @ vec
    return out


def copy_model(model: nn.Module, game: Game) -> tuple[nn.Module, Game]:
    """Deep copies of a model and its game that share modules with each other."""
    if isinstance(model, Game):
        g = copy.deepcopy(game)
        return g, g
    pair = copy.deepcopy((model, game))
    return pair[0], pair[1]
