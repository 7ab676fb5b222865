"""Fictitious players (paper §5.2, eq. 16): one layer's weight split among ``N`` players.

Eq. 16 rewrites a layer ``f_t(z, θ_t)`` as a stage with ``N`` players whose actions sum to
the layer's weight, ``F_t(z, θ_{t,1}, …, θ_{t,N}) := f_t(z, Σ_n θ_{t,n})``. For Linear and
Conv2d layers (linear in their parameters) this is ``Σ_n f_t(z, θ_{t,n})``: ``N`` copies of
the layer that share the input and add their outputs, i.e. a cooperative block with one
shared output (Fig. 3a). :class:`FictitiousLayer` is that module; the game builder places its
``N`` copies as ``N`` Kronecker players of one stage in one output group, so every
information structure (``fne``/``gr``) and every curvature applies unchanged.

Split choice: every player starts at ``θ_t / N`` (weight and bias alike), the only split that
treats the players symmetrically. Since ``∂F_t/∂θ_{t,n} = ∂f_t/∂θ_t`` for every ``n``, all
players see the same gradient and the same Gauss-Newton blocks (own and cross); the game
solve then gives (DESIGN.md §3, tests/test_fictitious.py):

* ``fne`` with own curvature ``I``: every player takes the full SGD step, so the layer moves
  by ``N`` SGD steps (split evenly, ``1/N`` of the total per player).
* ``gr`` with own curvature ``I`` and cross curvature ``F`` (game-extended SGD):
  ``Σ_n k_n = N (I + (N−1) F)⁻¹ g``; SGD at ``N = 1``.
* ``gr`` with the Gauss-Newton matrix ``Q`` for every block and damping ``λ``:
  ``Σ_n k_n = (Q + (λ/N) I)⁻¹ g`` (the block matrix is ``11ᵀ ⊗ Q + λI``).

The stage cost ``ℓ = (wd/2) Σ_n ‖θ_{t,n}‖²`` is per player, so with the even split weight
decay pulls the layer with ``wd θ_t`` while the loss gradient acts ``N`` times.

At evaluation and export the players collapse back to the layer by the sum of eq. 16:
:func:`collapse_players` returns the plain model, :func:`collapsed_state_dict` its state dict
(loadable into the model that :func:`dgn_dist.models.build_model` builds).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

SPLITTABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)


class FictitiousLayer(nn.Module):
    """``N`` copies of one Linear/Conv2d layer applied to the same input, outputs summed.

    The copies are registered as ``players.0 … players.{N-1}`` and each is called exactly
    once per forward (module hooks see one input and one output per player).

    Args:
        players: the player layers: all ``nn.Linear`` or all ``nn.Conv2d`` of one type, with
            identical parameter shapes (and conv geometry).

    Raises:
        ValueError: no players, or players of different types / shapes.
    """

    def __init__(self, players: list[nn.Module]) -> None:
        super().__init__()
        if not players:
            raise ValueError("FictitiousLayer needs at least one player layer; got none")
        first = players[0]
        if not isinstance(first, SPLITTABLE):
            raise ValueError(f"FictitiousLayer players must be nn.Linear or nn.Conv2d; got "
                             f"{type(first).__name__}")
        for layer in players[1:]:
            if type(layer) is not type(first) or _signature(layer) != _signature(first):
                raise ValueError(
                    "FictitiousLayer players must be copies of one layer (same type, shapes "
                    f"and geometry); got {_describe(first)} and {_describe(layer)}")
        self.players = nn.ModuleList(players)

    @property
    def num_players(self) -> int:
        """``N``, the number of fictitious players."""
        return len(self.players)

    def forward(self, x: Tensor) -> Tensor:
        # Eq. 16 for a layer linear in θ: f(z, Σ_n θ_n) = Σ_n f(z, θ_n), summed left to right.
        out = self.players[0](x)
        for player in self.players[1:]:
            out = out + player(x)
        return out

    def collapse(self) -> nn.Module:
        """A new ordinary layer whose parameters are the players' sums (eq. 16)."""
        layer = copy.deepcopy(self.players[0])
        with torch.no_grad():
            for name, param in layer.named_parameters(recurse=False):
                param.copy_(_tree_sum([getattr(p, name).detach() for p in self.players]))
        return layer

    def extra_repr(self) -> str:
        return f"num_players={self.num_players}"


def _signature(layer: nn.Module) -> tuple[object, ...]:
    shapes = tuple((n, tuple(p.shape)) for n, p in layer.named_parameters(recurse=False))
    geometry = tuple(getattr(layer, g, None) for g in (
        "stride", "padding", "dilation", "groups", "padding_mode"))
    return shapes, geometry


def _describe(layer: nn.Module) -> str:
    return f"{type(layer).__name__}{_signature(layer)}"


def _tree_sum(parts: list[Tensor]) -> Tensor:
    """Pairwise sum; exact for ``2^j`` equal parts (so split then collapse is bit-exact)."""
    while len(parts) > 1:
        pairs = [parts[i] + parts[i + 1] for i in range(0, len(parts) - 1, 2)]
        parts = pairs + ([parts[-1]] if len(parts) % 2 else [])
    return parts[0]


def _split_layer(layer: nn.Module, n: int) -> FictitiousLayer:
    players = []
    for _ in range(n):
        player = copy.deepcopy(layer)
        with torch.no_grad():
            for param in player.parameters(recurse=False):
                param.div_(n)  # the even split θ_n = θ / N (module docstring)
        players.append(player)
    return FictitiousLayer(players)


def _replace(module: nn.Module, fn: Callable[[nn.Module], nn.Module | None],
             memo: dict[int, nn.Module]) -> nn.Module:
    """Rebuild ``module``'s tree bottom-up: ``fn(child)`` replaces a module, ``None`` recurses.

    ``memo`` keeps a module listed twice (shared weights) shared after the rewrite.
    """
    if id(module) in memo:
        return memo[id(module)]
    new = fn(module)
    if new is None:
        new = module
        for name, child in list(module._modules.items()):
            if child is not None:
                new._modules[name] = _replace(child, fn, memo)
    memo[id(module)] = new
    return new


def has_fictitious_players(model: nn.Module) -> bool:
    """Whether ``model`` holds any :class:`FictitiousLayer`."""
    return any(isinstance(m, FictitiousLayer) for m in model.modules())


def split_players(model: nn.Module, n: int) -> nn.Module:
    """A copy of ``model`` with every Linear/Conv2d layer split into ``n`` fictitious players.

    Each layer becomes a :class:`FictitiousLayer` of ``n`` copies holding ``θ/n`` (weight and
    bias), so the network function is unchanged up to float rounding of the output sum.
    ``n = 1`` returns an unsplit copy (the original method). ``model`` itself is not modified.

    Args:
        model: any model; its Linear/Conv2d layers (at any depth, the model itself included)
            are split, everything else is kept.
        n: players per layer (``game.players_per_layer``), at least 1.

    Returns:
        The split model (same dtype and device as ``model``).

    Raises:
        ValueError: ``n`` is not an integer >= 1, or ``model`` is already split.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (players per layer) must be an integer >= 1; got {n!r}")
    if has_fictitious_players(model):
        raise ValueError("model already holds fictitious players; call collapse_players(model) "
                         "before splitting it again")
    out = copy.deepcopy(model)
    if n == 1:
        return out

    def split(module: nn.Module) -> nn.Module | None:
        return _split_layer(module, n) if isinstance(module, SPLITTABLE) else None

    return _replace(out, split, {})


def collapse_players(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every :class:`FictitiousLayer` summed back into its layer.

    The result has the module tree (and state-dict keys) of the unsplit model; ``model``
    itself is not modified. A model without fictitious players is returned as a plain copy.
    """
    def collapse(module: nn.Module) -> nn.Module | None:
        return module.collapse() if isinstance(module, FictitiousLayer) else None

    return _replace(copy.deepcopy(model), collapse, {})


def collapsed_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict of :func:`collapse_players` ``(model)`` without copying the model.

    Keys ``<layer>.players.<i>.<param>`` become ``<layer>.<param>`` (the players' sum, in
    the place of player 0's entry); every other entry is kept, in order. Values are detached
    tensors (fresh ones for summed parameters), ready for ``torch.save`` and a
    ``torch.load(weights_only=True)`` into the plain model.
    """
    renamed: dict[str, tuple[str, Tensor]] = {}  # player-0 key -> (collapsed key, sum)
    dropped: set[str] = set()
    for name, layer in model.named_modules():
        if not isinstance(layer, FictitiousLayer):
            continue
        prefix = f"{name}." if name else ""
        for pname, _ in layer.players[0].named_parameters(recurse=False):
            total = _tree_sum([getattr(p, pname).detach() for p in layer.players]).clone()
            renamed[f"{prefix}players.0.{pname}"] = (prefix + pname, total)
        dropped |= {f"{prefix}players.{key}" for key in layer.players.state_dict()}
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if key in renamed:
            new_key, total = renamed[key]
            out[new_key] = total
        elif key not in dropped:
            out[key] = value
    return out
