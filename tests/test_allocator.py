"""``run.cpu_allocator`` (dgn_dist/allocator.py): ``retain`` keeps freed memory for reuse."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dgn_dist.allocator import CHOICES, TCACHE_OFF, child_env, configure_cpu_allocator

# Allocates and frees a 96 MiB tensor (above glibc's largest mmap threshold) ten times and
# prints the minor page faults of the last eight: with glibc's defaults each one maps fresh
# pages (about 24,600 faults of 4 KiB); with ``retain`` (and its child environment, as the
# benchmarks start their workers) they reuse the first one's memory.
PROBE = """
import resource, sys, torch
from dgn_dist.allocator import configure_cpu_allocator
applied = configure_cpu_allocator(sys.argv[1])
for _ in range(2):  # the heap settles (a small block may take the first one's start)
    torch.ones(24 * 2**20).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    torch.ones(24 * 2**20).sum()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         timeout=120, check=True,
                         env={**os.environ, **child_env(mode)}).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_retain_reuses_freed_large_blocks_instead_of_faulting_them_in_again() -> None:
    applied_system, system = _faults("system")
    applied_retain, retain = _faults("retain")
    assert not applied_system and applied_retain
    assert system > 8 * 20_000  # eight fresh 96 MiB blocks
    # reused (the heap may still grow once while it settles)
    assert retain < system / 3, (retain, system)


def test_a_bad_mode_names_the_choices() -> None:
    with pytest.raises(ValueError, match="retain, system"):
        configure_cpu_allocator("fast")
    assert CHOICES == ("retain", "system")


def test_child_env_adds_or_removes_only_its_tunable() -> None:
    other = "glibc.malloc.mxfast=0"
    assert child_env("retain", {}) == {"GLIBC_TUNABLES": TCACHE_OFF}
    assert child_env("retain", {"GLIBC_TUNABLES": other}) == {
        "GLIBC_TUNABLES": f"{other}:{TCACHE_OFF}"}
    assert child_env("retain", {"GLIBC_TUNABLES": TCACHE_OFF}) == {"GLIBC_TUNABLES": TCACHE_OFF}
    assert child_env("system", {"GLIBC_TUNABLES": f"{TCACHE_OFF}:{other}"}) == {
        "GLIBC_TUNABLES": other}
    assert child_env("system", {}) == {"GLIBC_TUNABLES": ""}
