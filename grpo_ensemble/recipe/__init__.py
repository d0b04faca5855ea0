"""The recipe: its schema (`schema`) and how a YAML file and `--set` overrides become one
(`reading`)."""

from .members import MemberConfig, PeerConfig, PolicyConfig, SamplingConfig
from .reading import (
    _line_of,
    apply_overrides,
    dump_recipe,
    load_recipe,
    read_yaml,
    recipe_from_dict,
)
from .schema import (
    DataConfig,
    EvalConfig,
    GroupConfig,
    LimitsConfig,
    LogConfig,
    LossConfig,
    Recipe,
    RewardConfig,
    TrainConfig,
)

__all__ = [
    "DataConfig",
    "EvalConfig",
    "GroupConfig",
    "LimitsConfig",
    "LogConfig",
    "LossConfig",
    "MemberConfig",
    "PeerConfig",
    "PolicyConfig",
    "Recipe",
    "RewardConfig",
    "SamplingConfig",
    "TrainConfig",
    "_line_of",
    "apply_overrides",
    "dump_recipe",
    "load_recipe",
    "read_yaml",
    "recipe_from_dict",
]
