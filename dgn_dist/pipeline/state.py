"""Checkpoint state of a pipelined run: the whole model and the sharded optimizer state.

Model entries live on the rank that owns their stage (the others hold ``meta`` placeholders);
:func:`gather_model_state` collects them over the pipeline group. The optimizer state is the
hyper-parameters of ``param_groups[0]`` (the same on every rank) plus, per global stage
index, its curvature solver's tensors and (``stale_k``) the previous open gain; dp replicas
hold identical copies, so gathering over one pipeline group gives everything.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dgn_dist.pipeline.schedule import Shard

#: Hyper-parameters of ``param_groups[0]`` saved with the optimizer state.
GROUP_KEYS = ("lr", "damping", "weight_decay", "feedback_scale", "dgn_step", "skipped")


def _gather(obj: Any, pp: int, group: Any) -> list[Any]:
    if pp == 1:
        return [obj]
    parts: list[Any] = [None] * pp
    dist.all_gather_object(parts, obj, group=group)
    return parts


def gather_model_state(model: nn.Module, pp: int, group: Any) -> dict[str, Tensor]:
    """The whole ``model.state_dict()`` on CPU, on every rank (collective over ``group``)."""
    full = model.state_dict()
    own = {k: v.detach().cpu() for k, v in full.items() if v.device.type != "meta"}
    for part in _gather(own, pp, group):
        own.update(part)
    missing = [k for k in full if k not in own]
    if missing:
        raise RuntimeError(f"no pipeline rank holds {missing}")
    return {k: own[k] for k in full}


def load_model_state(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy the entries this rank holds from a whole-model ``state``.

    Raises:
        KeyError: ``state`` lacks entries of the model.
    """
    current = model.state_dict()
    missing = [k for k in current if k not in state]
    if missing:
        raise KeyError(f"state dict lacks {missing}; save it with full_state_dict()")
    with torch.no_grad():
        for k, v in current.items():
            if v.device.type != "meta":
                v.copy_(state[k].to(v.device, v.dtype))


def gather_optimizer_state(shard: Shard, group_params: Mapping[str, Any], pp: int,
                           group: Any) -> dict[str, Any]:
    """``{"group": hyper-parameters, "stages": {t: solver state}, "k_prev": {t: [k]},
    "scales": {t: last scales and block damping}}`` of every stage, on every rank (collective over
    ``group``); CPU tensors only."""
    mine: dict[str, dict[int, Any]] = {"stages": {}, "k_prev": {}, "scales": {}}
    for i, solver in enumerate(shard.solvers):
        t = shard.t0 + i
        mine["stages"][t] = {k: v.detach().cpu() for k, v in solver.state().items()}
        mine["scales"][t] = {"scales": [s.detach().cpu() for s in solver.scales],
                             "damping": [float(b.damping) for b in solver.blocks]}
        if shard.k_prev is not None:
            mine["k_prev"][t] = [k.detach().cpu() for k in shard.k_prev[i]]
    out: dict[str, Any] = {"group": {k: group_params[k] for k in GROUP_KEYS},
                           "stages": {}, "k_prev": {}, "scales": {}}
    for part in _gather(mine, pp, group):
        for key in ("stages", "k_prev", "scales"):
            out[key].update(part[key])
    return out


def load_optimizer_state(shard: Shard, group_params: dict[str, Any],
                         state: Mapping[str, Any], device: torch.device) -> None:
    """Load :func:`gather_optimizer_state`'s result into this rank's stages.

    Raises:
        KeyError: ``state`` has no entry for one of this rank's stages.
    """
    group_params.update({k: state["group"][k] for k in GROUP_KEYS})
    k_prev = []
    for i, solver in enumerate(shard.solvers):
        t = shard.t0 + i
        if t not in state["stages"]:
            raise KeyError(f"optimizer state has no stage {t}; save it with "
                           "PipelineRunner.optimizer_state_dict()")
        solver.load_state({k: v.to(device) for k, v in state["stages"][t].items()})
        # The last step's consistency scales and block damping enter stale_k's Gram blocks.
        last = state.get("scales", {}).get(t, {"scales": [], "damping": []})
        solver.set_scales([s.to(device) for s in last["scales"]])
        for blk, damping in zip(solver.blocks, last["damping"], strict=False):
            blk.damping = damping
        k_prev.append([k.to(device) for k in state["k_prev"].get(t, [])])
    has_k = all(state["k_prev"].get(shard.t0 + i) is not None for i in range(len(k_prev)))
    shard.k_prev = k_prev if k_prev and has_k else None
