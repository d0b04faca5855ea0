"""grpo-ensemble: GRPO with groups pooled from an ensemble of language models."""

from .components import Generator, GroupEvaluator, RewardScorer, SamplingParams
from .errors import GrpoEnsembleError, InputFileError, PluginError, RecipeError, RunError, UserError
from .hookspecs import hookimpl
from .recipe import Recipe, load_recipe
from .train import TrainResult, train
from .types import Candidate, Group, GroupLayout, Prompt, Sample

__all__ = [
    "Candidate",
    "Generator",
    "Group",
    "GroupEvaluator",
    "GroupLayout",
    "GrpoEnsembleError",
    "InputFileError",
    "PluginError",
    "Prompt",
    "Recipe",
    "RecipeError",
    "RewardScorer",
    "RunError",
    "Sample",
    "SamplingParams",
    "TrainResult",
    "UserError",
    "hookimpl",
    "load_recipe",
    "train",
]
