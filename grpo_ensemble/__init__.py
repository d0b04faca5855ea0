"""grpo-ensemble: GRPO with groups pooled from an ensemble of language models."""

from .errors import GrpoEnsembleError, InputFileError, PluginError, RecipeError, RunError, UserError
from .models.chat import render_prompt
from .plugins.hookspecs import hookimpl
from .plugins.interfaces import (
    Generator,
    GroupEvaluator,
    RewardScorer,
    RunContext,
    SamplingParams,
    Tracker,
    candidate_seed,
)
from .recipe import Recipe, load_recipe
from .trainer.loop import TrainResult, train
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
    "RunContext",
    "RunError",
    "Sample",
    "SamplingParams",
    "Tracker",
    "TrainResult",
    "UserError",
    "candidate_seed",
    "hookimpl",
    "load_recipe",
    "render_prompt",
    "train",
]
