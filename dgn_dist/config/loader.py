"""Load a TOML config, apply dotted ``section.key=value`` overrides, validate.

Errors raise :class:`ConfigError`, whose message names the offending key and the valid
choices; the CLI turns it into exit status 2 before anything heavy is imported.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from dgn_dist.config.schema import Config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration problem the user must fix (unknown key, wrong type, bad value)."""


def section_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def field_names(section: str) -> list[str]:
    return [f.name for f in dataclasses.fields(_section_type(section))]


def _section_type(section: str) -> type:
    hints = typing.get_type_hints(Config)
    if section not in hints:
        raise ConfigError(
            f"unknown config section '{section}'; valid sections: {', '.join(section_names())}")
    return hints[section]


def _field_type(section: str, key: str) -> Any:
    cls = _section_type(section)
    hints = typing.get_type_hints(cls)
    if key not in hints:
        raise ConfigError(
            f"unknown config key '{section}.{key}'; valid keys in [{section}]: "
            f"{', '.join(field_names(section))}")
    return hints[key]


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"list of {get_args(tp)[0].__name__}"
    return getattr(tp, "__name__", str(tp))


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` (TOML already gives typed values)."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"invalid value {value!r} for '{name}'; valid choices: "
                f"{', '.join(repr(c) for c in choices)}")
        return value
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"'{name}' must be a {_type_name(tp)}, got {value!r}")
        return [_coerce(f"{name}[{i}]", item_tp, v) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported annotation for {name}: {tp}")  # schema bug, not user's
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{name}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{name}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{name}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{name}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation for {name}: {tp}")


def _parse_override_value(text: str) -> Any:
    """Parse the right-hand side of ``key=value`` as a TOML value; bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_override(item: str) -> tuple[str, str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    dotted, text = item.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(
            f"override key '{dotted}' must be section.key; sections: {', '.join(section_names())}")
    return parts[0], parts[1], _parse_override_value(text.strip())


def _validate_ranges(cfg: Config) -> None:
    """Constraints between values that the types cannot express."""
    checks: list[tuple[bool, str]] = [
        (cfg.run.epochs >= 1, "run.epochs must be >= 1"),
        (cfg.run.max_steps >= 0, "run.max_steps must be >= 0"),
        (cfg.run.eval_every >= 1, "run.eval_every must be >= 1"),
        (cfg.data.batch_size >= 1, "data.batch_size must be >= 1"),
        (cfg.data.eval_batch_size >= 1, "data.eval_batch_size must be >= 1"),
        (0.0 <= cfg.data.val_fraction < 1.0, "data.val_fraction must be in [0, 1)"),
        (0.0 < cfg.data.test_fraction < 1.0, "data.test_fraction must be in (0, 1)"),
        (cfg.data.num_workers >= 0, "data.num_workers must be >= 0"),
        (len(cfg.data.synthetic_shape) == 3 and min(cfg.data.synthetic_shape) >= 1,
         "data.synthetic_shape must be [C, H, W] with positive entries"),
        (cfg.data.synthetic_classes >= 2, "data.synthetic_classes must be >= 2"),
        (cfg.data.synthetic_train_size >= 1 and cfg.data.synthetic_test_size >= 1,
         "data.synthetic_train_size and data.synthetic_test_size must be >= 1"),
        (cfg.model.width >= 0, "model.width must be >= 0 (0 = the paper's value)"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (cfg.optim.momentum >= 0, "optim.momentum must be >= 0"),
        (cfg.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas),
         "optim.betas must be two numbers in [0, 1)"),
        (cfg.optim.eps > 0, "optim.eps must be > 0"),
        (0 <= cfg.optim.alpha < 1, "optim.alpha must be in [0, 1)"),
        (cfg.optim.gamma > 0, "optim.gamma must be > 0"),
        (cfg.optim.emsa_rho >= 0, "optim.emsa_rho must be >= 0"),
        (cfg.optim.emsa_lbfgs_iters >= 1, "optim.emsa_lbfgs_iters must be >= 1"),
        (cfg.optim.ekfac_kl_clip >= 0, "optim.ekfac_kl_clip must be >= 0 (0 = no clipping)"),
        (cfg.optim.dgnopt_kl_clip >= 0, "optim.dgnopt_kl_clip must be >= 0 (0 = no clipping)"),
        (cfg.curvature.damping >= 0, "curvature.damping must be >= 0"),
        (0 < cfg.curvature.damping_decay <= 1, "curvature.damping_decay must be in (0, 1]"),
        (0 <= cfg.curvature.ema_decay < 1, "curvature.ema_decay must be in [0, 1)"),
        (cfg.curvature.factor_interval >= 1, "curvature.factor_interval must be >= 1"),
        (cfg.curvature.inverse_interval >= 1, "curvature.inverse_interval must be >= 1"),
        (cfg.curvature.rank >= 1, "curvature.rank must be >= 1"),
        (cfg.curvature.chunk_mb >= 0, "curvature.chunk_mb must be >= 0 (0 = auto)"),
        (cfg.curvature.vxx != "empirical" or cfg.curvature.rank == 1,
         "curvature.rank must be 1 when curvature.vxx = 'empirical'"),
        (cfg.game.players_per_layer >= 1, "game.players_per_layer must be >= 1"),
        (cfg.game.feedback_scale >= 0, "game.feedback_scale must be >= 0"),
        (cfg.parallel.dp >= 0, "parallel.dp must be >= 0 (0 = world size / pp)"),
        (cfg.parallel.pp >= 1, "parallel.pp must be >= 1"),
        (0 < cfg.parallel.grad_worker_fraction <= 1,
         "parallel.grad_worker_fraction must be in (0, 1]"),
        (cfg.parallel.bucket_mb > 0, "parallel.bucket_mb must be > 0"),
        (cfg.parallel.grad_clip >= 0, "parallel.grad_clip must be >= 0 (0 = off)"),
        (cfg.parallel.timeout_s > 0, "parallel.timeout_s must be > 0"),
        (cfg.logging.log_every >= 1, "logging.log_every must be >= 1"),
        (cfg.logging.curvature_every >= 0, "logging.curvature_every must be >= 0"),
        (cfg.logging.hist_every >= 0, "logging.hist_every must be >= 0 (0 = never)"),
        (cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps must be >= 0"),
        (cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last must be >= 1"),
    ]
    sorted_milestones = sorted(cfg.optim.milestones)
    checks.append((sorted_milestones == cfg.optim.milestones and all(m > 0 for m in
                   sorted_milestones), "optim.milestones must be increasing positive epochs"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


#: Curvature kind of DGNOpt under each ``game.ablation`` (``none``: ``curvature.kind``).
_ABLATION_CURVATURE = {"sgd": "identity", "rmsprop": "diag", "adam": "diag", "ekfac": "ekfac"}
#: DGNOpt curvatures with a cooperative (``game.info = 'gr'``) form.
_COOPERATIVE = ("identity", "kfac", "ekfac")


def check_game_config(cfg: Config) -> None:
    """Combinations of ``[game]`` and ``[optim]`` that cannot train (:class:`ConfigError`, a
    ``ValueError``). Run when a config is loaded and again by
    :func:`dgn_dist.game.training.build_training_optimizer` for configs built in code."""
    o, g = cfg.optim, cfg.game
    if g.ablation != "none" and o.name != "dgnopt":
        raise ConfigError(f"game.ablation='{g.ablation}' runs the {g.ablation} preconditioner "
                          f"inside DGNOpt: set optim.name='dgnopt' (got '{o.name}') and give "
                          "the baseline's lr and settings in [optim]")
    if g.alignment_strategy != "fixed" and o.name != "dgnopt":
        raise ConfigError(f"game.alignment_strategy='{g.alignment_strategy}' needs "
                          f"optim.name='dgnopt'; '{o.name}' does not see alignments (Fig. 8a): "
                          "use game.alignment_strategy='fixed'")
    if g.reward_batch_size < 1:
        raise ConfigError(f"game.reward_batch_size must be >= 1; got {g.reward_batch_size}")
    if g.players_per_layer > 1 and o.name not in ("dgnopt", "sgd"):
        raise ConfigError(f"game.players_per_layer={g.players_per_layer} needs optim.name "
                          f"'sgd' (game-extended SGD) or 'dgnopt'; '{o.name}' has no "
                          "game-extended form: use game.players_per_layer=1")
    if g.players_per_layer > 1 and o.name == "sgd" and o.momentum != 0:
        raise ConfigError("game-extended SGD (optim.name='sgd', game.players_per_layer > 1) "
                          f"has no momentum; set optim.momentum=0 (got {o.momentum})")


def _validate_combinations(cfg: Config) -> None:
    """Settings that are valid one by one but cannot train together (the optimizer and
    game builders would reject them after data and model are built)."""
    check_game_config(cfg)
    o, c, g = cfg.optim, cfg.curvature, cfg.game
    if o.name == "ekfac":
        if c.kind not in ("kfac", "ekfac"):
            raise ConfigError(f"optim.name='ekfac' needs curvature.kind 'kfac' or 'ekfac'; got "
                              f"'{c.kind}'")
        if c.damping <= 0:
            raise ConfigError(f"curvature.damping must be > 0 for optim.name='ekfac' (got "
                              f"{c.damping})")
    if o.name != "dgnopt":
        return
    kind = _ABLATION_CURVATURE.get(g.ablation, c.kind)
    source = f"game.ablation='{g.ablation}'" if g.ablation != "none" \
        else f"curvature.kind='{c.kind}'"
    if g.info == "gr" and kind not in _COOPERATIVE:
        raise ConfigError(
            f"game.info='gr' needs a curvature with a cooperative form: {source} gives the "
            f"'{kind}' curvature, which has none. Valid: curvature.kind one of "
            f"{', '.join(_COOPERATIVE)} (game.ablation 'none', 'sgd' or 'ekfac') with "
            "game.info='gr', or game.info 'fne' or 'olne'")
    if kind != "identity" and c.damping <= 0:
        raise ConfigError(f"curvature.damping must be > 0 for optim.name='dgnopt' with the "
                          f"'{kind}' curvature ({source}; it can be singular); got "
                          f"{c.damping}. Valid: curvature.damping > 0, or curvature.kind="
                          "'identity'")


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build a validated :class:`Config` from nested plain values (a parsed TOML file)."""
    cfg = Config()
    for section, values in raw.items():
        section_type = _section_type(section)
        if not isinstance(values, dict):
            raise ConfigError(f"'{section}' must be a table [{section}] of keys")
        target = getattr(cfg, section)
        assert isinstance(target, section_type)
        for key, value in values.items():
            setattr(target, key, _coerce(f"{section}.{key}", _field_type(section, key), value))
    _validate_ranges(cfg)
    _validate_combinations(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read ``path`` (TOML; None = defaults), apply ``section.key=value`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file '{path}' is not valid TOML: {err}") from err
    for item in overrides:
        section, key, value = parse_override(item)
        _field_type(section, key)  # names the key and the valid keys when unknown
        raw.setdefault(section, {})[key] = value
    return config_from_dict(raw)


def dump_toml(cfg: Config) -> str:
    """Serialise the resolved config as TOML (written into every run directory)."""
    lines: list[str] = []
    for section, values in config_to_dict(cfg).items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)
