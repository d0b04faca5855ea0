"""The built-in `reward_model` scorer: a sequence-classification model's first logit for
prompt + completion, batched and right-padded, equal to one unpadded forward per text; its
running normalisation by hand; placed like a frozen peer; trained with from a recipe."""

from __future__ import annotations

import statistics

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from grpo_ensemble import Candidate, Prompt, RecipeError, Sample, UserError, train
from grpo_ensemble.models.tiny import build_tokenizer
from grpo_ensemble.plugins.builtin.reward_model import RewardModel
from grpo_ensemble.trainer.build import build_scorers
from grpo_ensemble.trainer.setup import build_run


def _save(path, num_labels=1):
    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, num_labels=num_labels,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("rm") / "rm")


SAMPLES = [
    Sample(Prompt("1+1="), Candidate("2", [5], "policy")),
    Sample(Prompt("37+45="), Candidate("82", [5, 5], "policy")),
    Sample(Prompt("9+9="), Candidate("181", [5, 5, 5], "strong")),
]


@torch.no_grad()
def _one_by_one(path) -> list[float]:
    """Each text alone through the model, no padding: the reference."""
    model = LlamaForSequenceClassification.from_pretrained(path).eval()
    tok = build_tokenizer()
    ids = [tok(s.prompt.text + s.completion, return_tensors="pt")["input_ids"] for s in SAMPLES]
    return [float(model(input_ids=i).logits[0, 0]) for i in ids]


def test_scores_equal_one_unpadded_forward_per_text(rm_dir):
    want = _one_by_one(rm_dir)
    assert len(set(want)) == 3  # texts of different lengths, scores that differ
    for batch_size in (1, 2, 8):
        got = RewardModel(str(rm_dir), batch_size=batch_size).score(SAMPLES)
        assert got == pytest.approx(want, abs=1e-5)
    assert not any(p.requires_grad for p in RewardModel(str(rm_dir)).model.parameters())


def test_running_normalisation_by_hand(rm_dir):
    raw = _one_by_one(rm_dir)
    scorer = RewardModel(str(rm_dir), normalize=True)
    first = scorer.score(SAMPLES)
    mean, std = statistics.mean(raw), statistics.stdev(raw)
    assert first == pytest.approx([(x - mean) / (std + 1e-6) for x in raw], abs=1e-5)
    second = scorer.score(SAMPLES[:1])  # the statistics now over four scores
    four = [*raw, raw[0]]
    mean, std = statistics.mean(four), statistics.stdev(four)
    assert second == pytest.approx([(raw[0] - mean) / (std + 1e-6)], abs=1e-5)


def test_a_reward_model_that_cannot_serve_is_refused(tmp_path):
    two = _save(tmp_path / "two", num_labels=2)
    with pytest.raises(UserError, match=r"has 2 labels, not 1"):
        RewardModel(str(two))
    recipe_rewards = [{"name": "reward_model", "params": {"model": str(tmp_path / "none")}}]
    from grpo_ensemble.recipe import recipe_from_dict

    r = recipe_from_dict(
        {"policy": {"model": "builtin:tiny-arith-small"}, "rewards": recipe_rewards}
    )
    with pytest.raises(RecipeError, match=r"^rewards\.0\.params: .* does not exist"):
        build_scorers(r)


def test_placed_like_a_frozen_peer_and_trained_with(rm_dir, small_recipe, tmp_path):
    rewards = [{"name": "reward_model", "params": {"model": str(rm_dir), "batch_size": 4}}]
    run = build_run(small_recipe(rewards=rewards, train__precision="bf16"), tmp_path / "b")
    (ws,) = run.scorers
    assert next(ws.scorer.model.parameters()).dtype == torch.bfloat16  # the run's precision
    assert next(ws.scorer.model.parameters()).device == run.engine.device
    result = train(small_recipe(rewards=rewards, train__lr=1e-2))
    for m in result.metrics:
        assert m["reward"] == m["reward/reward_model"] and m["advantage_abs_mean"] > 0
