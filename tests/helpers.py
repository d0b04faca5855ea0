"""Shared by the tests that launch training in subprocesses (several ranks, kill and resume)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

# policy + a peer injected where the policy failed, beta > 0, μ = 2: every code path a step has
ENSEMBLE_RECIPE = {
    "policy": {"model": "builtin:tiny-arith-small", "n": 3, "sampling": {"max_new_tokens": 5}},
    "peers": [
        {
            "name": "strong",
            "model": "builtin:tiny-arith-base",
            "n": 2,
            "sampling": {"max_new_tokens": 5, "temperature": 0.7},
        }
    ],
    "group": {"inject": "on_failure"},
    "loss": {"beta": 0.05, "mu": 2},
    "log": {"progress": False},
}


def write_recipe(path: Path, **sections) -> Path:
    """ENSEMBLE_RECIPE with `sections` (top-level keys; `train` is merged) as a YAML file."""
    data = json.loads(json.dumps(ENSEMBLE_RECIPE))
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(data))
    return path


def subprocess_env(**extra: str) -> dict:
    """This environment without the rank variables of this test process, plugins off."""
    env = {**os.environ, "GRPO_ENSEMBLE_LOAD_PLUGINS": "", **extra}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env
