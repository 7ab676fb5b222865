"""A dgn-train worker that kills itself once (for the torchrun fault test).

    torchrun --max-restarts 1 --nproc_per_node 2 tests/scripts/fault_worker.py KILL_RANK KILL_STEP \
        --config FILE [key=value ...]

On the first attempt (``TORCHELASTIC_RESTART_COUNT=0``) rank ``KILL_RANK`` sends itself
SIGKILL right after optimizer step ``KILL_STEP``; torchrun then stops the other rank and
restarts both, and the trainer resumes from the latest checkpoint in ``run.dir``.
"""

from __future__ import annotations

import os
import signal
import sys

from dgn_dist.config import load_config
from dgn_dist.trainer import train


def main(argv: list[str]) -> int:
    kill_rank, kill_step = int(argv[0]), int(argv[1])
    if argv[2] != "--config":
        raise SystemExit("usage: fault_worker.py KILL_RANK KILL_STEP --config FILE [k=v ...]")
    cfg = load_config(argv[3], argv[4:])
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    rank = int(os.environ["RANK"])

    def on_step(step: int, loss: float) -> None:
        del loss
        if first_attempt and rank == kill_rank and step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)

    train(cfg, on_step=on_step)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
