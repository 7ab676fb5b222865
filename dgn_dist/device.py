"""Device choice, seeding, determinism and the "am I rank 0" test."""

from __future__ import annotations

import random

import numpy as np
import torch


class DeviceError(RuntimeError):
    """The configured device is not available on this machine."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` fails clearly without a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("run.device='cuda' but no CUDA device is available; "
                           "use run.device=cpu or run.device=auto")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_determinism(device: torch.device, deterministic: bool) -> None:
    """Bit-exact reruns on CPU; on CUDA, deterministic cuDNN kernels (best effort)."""
    if not deterministic:
        return
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def is_main_process() -> bool:
    """True on rank 0 of an initialised process group, and always in a single process."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return True
