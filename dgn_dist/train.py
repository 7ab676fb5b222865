"""``dgn-train --config FILE [section.key=value ...]`` (also ``python -m dgn_dist.train``).

Arguments and the configuration are checked before torch or anything heavy is imported, so a
typo costs a fraction of a second. Exit status:

* 0 -- finished (or ``--print-config`` / ``--print-game`` printed what was asked);
* 2 -- user-fixable input: bad config key, type or value, missing config file, missing data
  set files, a missing or mismatching checkpoint, ``run.device=cuda`` without a GPU
  (the message starts with ``error:`` and says what to change);
* 130 -- interrupted by Ctrl-C, after writing a checkpoint of the last completed step;
* 1 -- anything else (a bug; Python prints the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from dgn_dist.config import Config, ConfigError, dump_toml, load_config


def build_parser() -> argparse.ArgumentParser:
    """The whole flag surface (frozen by tests/test_cli.py; keep it small)."""
    parser = argparse.ArgumentParser(
        prog="dgn-train",
        description="Train a model with DGNOpt or a baseline optimizer; writes a run "
                    "directory with config.toml, TensorBoard events, checkpoints and "
                    "summary.json.")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="TOML config whose tables mirror the config dataclasses "
                             "(defaults when omitted).")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override one config value, e.g. optim.lr=0.05 run.epochs=3")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as TOML and exit")
    parser.add_argument("--print-game", action="store_true",
                        help="print the game (stages, players, state shapes) built from the "
                             "model and exit")
    return parser


def resolve_run_dir(cfg: Config) -> None:
    """Fill in the default ``runs/<name>-<YYYYmmdd-HHMMSS>`` run directory."""
    if cfg.run.dir:
        return
    if cfg.run.resume == "latest":
        raise ConfigError("run.resume='latest' needs run.dir: the run directory to continue "
                          "(or give run.resume=<checkpoint file or run directory>)")
    cfg.run.dir = f"runs/{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _print_game(cfg: Config) -> None:
    from dgn_dist.data import build_data
    from dgn_dist.device import seed_everything
    from dgn_dist.game.builder import build_game
    from dgn_dist.game.training import prepare_model
    from dgn_dist.models import build_model

    seed_everything(cfg.run.seed)
    data = build_data(cfg.data, cfg.run.seed)
    try:
        model = build_model(cfg.model, data.input_shape, data.num_classes)
        # the game training sees: game.players_per_layer fictitious players (eq. 16)
        model = prepare_model(cfg, model)
    except ValueError as err:  # settings the config types cannot rule out
        raise ConfigError(str(err)) from err
    game = build_game(model, alignment=cfg.game.alignment)
    example = data.train[0][0].unsqueeze(0)
    print(game.describe(example))


def _run(cfg: Config, print_game: bool) -> int:
    from dgn_dist.checkpoint import CheckpointError
    from dgn_dist.data import DataError
    from dgn_dist.device import DeviceError
    from dgn_dist.dgnopt.skips import TrainingDiverged

    try:
        if print_game:
            _print_game(cfg)
            return 0
        from dgn_dist.trainer import train

        _print_tensorboard(cfg)
        summary = train(cfg)
    except (DataError, CheckpointError, ConfigError, DeviceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:  # the checkpoints written so far are kept
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        from dgn_dist.device import is_main_process
        from dgn_dist.distributed.env import shutdown

        main_rank = is_main_process()
        shutdown()  # leave the launcher's process group cleanly
    if not main_rank:
        return 0
    val = summary["val_acc"]
    print(f"done: test acc {summary['test_acc']:.2f}% (best {summary['best_test_acc']:.2f}%)"
          + (f", val acc {val:.2f}%" if val is not None else "")
          + f", {summary['steps']} steps in {summary['wall_time_s']:.1f}s; "
          f"run dir {summary['run_dir']}", flush=True)
    _print_tensorboard(cfg)
    return 0


def _print_tensorboard(cfg: Config) -> None:
    """The line that opens the run's TensorBoard dashboard (rank 0, TensorBoard on)."""
    if cfg.logging.tensorboard and os.environ.get("RANK", "0") == "0":
        from dgn_dist.dashboard import tensorboard_command

        print(f"tensorboard: {tensorboard_command(cfg.run.dir)}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dgn-train``; returns the exit status (see the module docstring)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        return int(exit_.code or 0)
    try:
        cfg = load_config(args.config, args.overrides)
        resolve_run_dir(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_toml(cfg), end="")
        return 0
    return _run(cfg, args.print_game)


if __name__ == "__main__":
    sys.exit(main())
