"""Shared fixtures. Installed third-party plugins never load unless a test asks for them."""

from __future__ import annotations

import os

os.environ["GRPO_ENSEMBLE_LOAD_PLUGINS"] = ""  # before any plugin manager is built
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from grpo_ensemble import plugins  # noqa: E402
from grpo_ensemble.recipe import recipe_from_dict  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _builtin_models():
    """The built-in tiny models, built once before any test runs: a test that launches a run
    in a subprocess would otherwise build them from an empty cache inside its own time limit
    (a minute or more on a loaded machine)."""
    from grpo_ensemble.models.tiny import BUILTIN_MODELS, ensure_builtin_model

    for name in BUILTIN_MODELS:
        ensure_builtin_model(name)


@pytest.fixture(autouse=True)
def _fresh_plugin_manager():
    plugins.reset_plugin_manager()
    yield
    plugins.reset_plugin_manager()


def small_recipe_dict(tmp_path, **changes) -> dict:
    """A recipe that trains in seconds: tiny policy and peer, 4 prompts × (2 + 2) candidates."""
    data = {
        "seed": 0,
        "output_dir": str(tmp_path / "run"),
        "policy": {
            "model": "builtin:tiny-arith-small",
            "n": 2,
            "sampling": {"max_new_tokens": 5},
        },
        "peers": [
            {
                "name": "strong",
                "model": "builtin:tiny-arith-base",
                "n": 2,
                "sampling": {"max_new_tokens": 5},
            },
        ],
        "train": {"steps": 2, "prompts_per_step": 4, "micro_batch_size": 8, "lr": 1e-4},
        "eval": {"max_prompts": 16},
        "log": {"progress": False},
    }
    for dotted, value in changes.items():
        cur = data
        keys = dotted.split("__")
        for k in keys[:-1]:
            cur = cur[int(k)] if isinstance(cur, list) else cur.setdefault(k, {})
        cur[int(keys[-1]) if isinstance(cur, list) else keys[-1]] = value
    return data


@pytest.fixture
def small_recipe(tmp_path):
    def make(**changes):
        return recipe_from_dict(small_recipe_dict(tmp_path, **changes))

    return make
