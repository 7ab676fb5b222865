"""``dgn-repro NAME``: reproduction commands for the paper's experiments."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dgn_dist.repro import fig6, quickstart, table2, table3, table4

COMMANDS = {
    "quickstart": (quickstart, "README main job: DGNOpt and baselines on DIGITS"),
    "table2-digits": (table2, "Table 2, DIGITS row: 7 optimizers x N seeds, tuned lr"),
    "table3-fictitious": (table3, "Table 3 / Fig. 7: game-extended SGD, N = 1, 2, 4, 6"),
    "table4-alignment": (table4, "Table 4 / Fig. 8: EKFAC vs fixed/random/adaptive alignment"),
    "fig6-ablation": (fig6, "Fig. 6: accuracy change of each baseline lifted to the closed loop"),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dgn-repro", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="NAME")
    for name, (module, help_text) in COMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=help_text, description=module.__doc__))
    args = parser.parse_args(argv)
    module, _ = COMMANDS[args.command]
    return int(module.run(args))


if __name__ == "__main__":
    sys.exit(main())
