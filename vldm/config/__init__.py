from vldm.config.core import ConfigError, build_config, dump_yaml, from_dict, load_yaml, reference, to_dict
from vldm.config.data import DataConfig
from vldm.config.model import ModelConfig, TemporalOptions, UNetSpec
from vldm.config.schema import Config
from vldm.config.train import CheckpointConfig, DeepSpeedConfig, DiffusionConfig, OptimConfig, TrainConfig, WandbConfig

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "DiffusionConfig",
    "ModelConfig",
    "OptimConfig",
    "TemporalOptions",
    "TrainConfig",
    "UNetSpec",
    "WandbConfig",
    "build_config",
    "dump_yaml",
    "from_dict",
    "load_yaml",
    "reference",
    "to_dict",
]
