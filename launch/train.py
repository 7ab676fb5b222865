"""Entry script for launchers that need a file rather than ``-m`` (the ``deepspeed`` launcher).

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/train.py --config FILE [key=value ...]

The deepspeed launcher appends ``--local_rank=N`` to every process's arguments (the rank is
also in the ``LOCAL_RANK`` variable); it is dropped here before ``dgn_dist.train.main`` parses
the command line. Everything else is passed through unchanged.
"""

from __future__ import annotations

import sys
from pathlib import Path


def strip_local_rank(argv: list[str]) -> list[str]:
    """``argv`` without ``--local_rank=N`` / ``--local_rank N`` (added by deepspeed)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--local_rank":
            skip = True
        elif not arg.startswith("--local_rank="):
            out.append(arg)
    return out


if __name__ == "__main__":
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:  # run from a checkout without `pip install -e .`
        sys.path.insert(0, root)
    from dgn_dist.train import main

    sys.exit(main(strip_local_rank(sys.argv[1:])))
