"""Shared by the tests: recipes for subprocess runs (several ranks, kill and resume), and the
step's phases run one by one on a built run, as `grpo_step` runs them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from grpo_ensemble.rollout.groups import Rollout, evaluate_groups
from grpo_ensemble.rollout.injection import peers_wanted
from grpo_ensemble.rollout.scoring import Known, Scores, score_groups
from grpo_ensemble.trainer.batching import MicroBatch, attach_traces, micro_batches
from grpo_ensemble.trainer.update import Update

# policy + a peer injected where the policy failed, beta > 0, μ = 2: every code path a step has
# the smallest recipe `validate` accepts, as YAML text: `{out}` is the output directory
SMALL_RECIPE_TEXT = """\
seed: 0
output_dir: {out}
policy:
  model: builtin:tiny-arith-small
  n: 2
train:
  steps: 1
"""


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


def rollout_of(run, n_prompts: int = 4) -> Rollout:
    """Every member samples for the next `n_prompts` prompts; scored and evaluated as a step
    does (the recipe's injection aside)."""
    groups = run.ensemble.generate(run.sampler.next(n_prompts))
    scores = score_groups(groups, run.scorers)
    return evaluate_groups(groups, scores, run.evaluator, run.settings.group)


def injected_rollout(run, n_prompts: int) -> tuple[Scores, list, Rollout]:
    """The step's first phases for the next `n_prompts` prompts, as `grpo_step` runs them:
    the policy samples, its candidates are scored, the peers sample where the recipe's
    injection asks, their candidates are scored, the groups evaluated. Returns the policy's
    scores, the pooled groups and the rollout."""
    s = run.settings
    own = run.ensemble.sample_policy(run.sampler.next(n_prompts), None)
    own_scores = score_groups(own.groups, run.scorers)
    wanted = peers_wanted(own.groups, own_scores, s.inject, s.success_reward)
    pooled = run.ensemble.sample_peers(own.groups, wanted, None).groups
    known = Known([len(g.candidates) for g in own.groups], own_scores)
    scores = score_groups(pooled, run.scorers, known)
    return own_scores, pooled, evaluate_groups(pooled, scores, run.evaluator, s.group)


def batches_of(run, rollout: Rollout, batching=None) -> list[MicroBatch]:
    """The step's micro-batches of `rollout` on the policy's device (`batching`: other
    settings than the run's), with the policy's traces where it replays."""
    how = batching or run.settings.batching
    batches = micro_batches(rollout, how, run.settings.group.modes, run.prompt_ids)
    if run.replay is not None:
        attach_traces(batches, run.replay.take_traces(rollout.candidates))
    return [b.to(run.engine.device) for b in batches]


def update_inputs(run) -> Update:
    """The update's inputs beyond the micro-batches, as the step hands them on."""
    return Update(run.engine, run.ref_model, run.replay, [m.name for m in run.ensemble.members])


def process_tree(root: int) -> list[int]:
    """`root` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def save_reward_model(path: Path, num_labels: int = 1, intermediate_size: int = 64) -> Path:
    """A tiny Llama sequence-classification model with the built-in tokenizer, saved to
    `path` (random weights from seed 0): a reward model that loads offline. ZeRO-3 keeps
    parameters under 10⁵ values whole on every rank: an `intermediate_size` of 2048 gives the
    MLP weights that it partitions."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from grpo_ensemble.models.tiny import build_tokenizer

    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=intermediate_size,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
        num_labels=num_labels,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path
