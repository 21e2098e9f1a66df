"""Typed run configuration: YAML file + ``section.key=value`` overrides, validated before anything starts.

A config has one section per concern (data, model, method, augment, optim, train, eval, storage, tracking). Every
key has a default (:mod:`excb.config.sections`), so a YAML file only lists what it changes. Unknown sections or keys and
invalid values (:mod:`excb.config.validation`) raise :class:`ConfigError` naming the offending key.
"""

from excb.config.loading import (
    dump_yaml,
    from_dict,
    load_config,
    parse_override,
    redacted_dict,
)
from excb.config.sections import (
    BACKBONES,
    BALANCERS,
    DATA_FORMATS,
    RELEASED_BLUR_P,
    SECRET_KEYS,
    TRAIN_DECODES,
    WANDB_MODES,
    AugmentConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    ExcbConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    StorageConfig,
    TrackingConfig,
    TrainConfig,
)
from excb.config.validation import validate

__all__ = [
    "BACKBONES", "BALANCERS", "DATA_FORMATS", "RELEASED_BLUR_P", "SECRET_KEYS", "TRAIN_DECODES", "WANDB_MODES",
    "AugmentConfig", "ConfigError", "DataConfig", "EvalConfig", "ExcbConfig", "MethodConfig", "ModelConfig",
    "OptimConfig", "StorageConfig", "TrackingConfig", "TrainConfig", "dump_yaml", "from_dict", "load_config",
    "parse_override", "redacted_dict", "validate",
]
