"""Configuration dataclasses, TOML loading and dotted overrides."""

from dgn_dist.config.loader import (
    ConfigError,
    config_from_dict,
    config_to_dict,
    dump_toml,
    load_config,
    parse_override,
)
from dgn_dist.config.schema import (
    CheckpointConfig,
    Config,
    CurvatureConfig,
    DataConfig,
    GameConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
)

__all__ = [
    "CheckpointConfig", "Config", "ConfigError", "CurvatureConfig", "DataConfig", "GameConfig",
    "LoggingConfig", "ModelConfig", "OptimConfig", "ParallelConfig", "RunConfig",
    "config_from_dict", "config_to_dict", "dump_toml", "load_config", "parse_override",
]
