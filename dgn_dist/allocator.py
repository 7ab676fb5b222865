"""The CPU memory allocator setting of a training or benchmark process (``run.cpu_allocator``).

glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and unmaps it on ``free``; it also returns freed memory at the top of the heap to the
system. A step of DGNOpt on a CPU allocates many such blocks and frees them again: on ResNet-18
a chunk of per-sample projections is up to 64 MiB, a Kronecker factor of layer4 85 MB. Each one is
then page-faulted in and zero-filled by the kernel again, step after step. Measured on this
CPU: the per-sample product ``gᵀ a`` of a layer4 chunk, ``[14, 512, 2304]`` (66 MB), takes 30 ms
with a fresh block and 12 ms in reused memory.

``retain`` makes the process keep what it frees for reuse, like the caching allocators that
PyTorch's CPU tuning guides recommend (jemalloc, tcmalloc), through two ``mallopt`` settings:
no ``mmap`` for large blocks (``M_MMAP_MAX = 0``: they come from the heap, where freed ones
are reused) and no trimming of the heap top (``M_TRIM_THRESHOLD``). The process then holds
on to its peak (its resident memory no longer shrinks after a large step).

One more setting needs the environment of a process at its start, so the processes that
``dgn_dist`` starts itself (the benchmarks' workers) get it through :func:`child_env`:
``GLIBC_TUNABLES=glibc.malloc.tcache_count=0``. PyTorch allocates with 64-byte alignment, and
glibc parks the few bytes that alignment leaves over in its per-thread cache, where they keep
a freed block from merging with its neighbours; the next request of the same size then no
longer fits in it and grows the heap instead, up to several copies of a block. Measured on
ResNet-18 at batch 128 (``dgn-bench --models resnet18 --optimizers ekfac,dgnopt
--cpu-allocator ...``): ``retain`` alone adds 9-19 % to the peak RSS, with the cache off 2-7 %.
A process started otherwise (``dgn-train`` under a launcher) gets it by exporting that
variable (the launch scripts do).

``system`` leaves glibc's defaults. Elsewhere than glibc (macOS, musl) ``retain`` does
nothing.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Mapping
from typing import Literal, get_args

CpuAllocator = Literal["retain", "system"]  # as RunConfig.cpu_allocator
CHOICES: tuple[str, ...] = get_args(CpuAllocator)
DEFAULT_CPU_ALLOCATOR: CpuAllocator = "retain"

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int: trim only above 2 GiB of free heap top
#: The glibc tunable of :func:`child_env` (per-thread cache off).
TCACHE_OFF = "glibc.malloc.tcache_count=0"


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # only glibc has it
    except (OSError, AttributeError):
        return None
    return libc


def configure_cpu_allocator(mode: str) -> bool:
    """Apply ``mode`` (:data:`CHOICES`) to this process; True where ``retain`` took effect.

    Call it once at the start of a process (it acts on the allocations that follow).

    Raises:
        ValueError: ``mode`` is not one of :data:`CHOICES`.
    """
    if mode not in CHOICES:
        raise ValueError(f"cpu_allocator must be one of {', '.join(CHOICES)}, got {mode!r}")
    if mode == "system":
        return False
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD,
                                                                      _NEVER_TRIM))


def child_env(mode: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``GLIBC_TUNABLES`` entry for a child process started under ``mode``: ``retain``
    adds :data:`TCACHE_OFF` to the variable (module docstring), ``system`` takes it out;
    other tunables are kept."""
    current = (os.environ if environ is None else environ).get("GLIBC_TUNABLES", "")
    parts = [p for p in current.split(":") if p and p != TCACHE_OFF]
    if mode == "retain":
        parts.append(TCACHE_OFF)
    return {"GLIBC_TUNABLES": ":".join(parts)}


def add_allocator_argument(parser: argparse.ArgumentParser) -> None:
    """The benchmarks' ``--cpu-allocator`` flag (every process of a run applies it)."""
    parser.add_argument("--cpu-allocator", default=DEFAULT_CPU_ALLOCATOR, choices=CHOICES,
                        help="CPU memory of the measured processes, as run.cpu_allocator "
                        "(default: %(default)s)")
