"""The built-in `reward_model` scorer: a sequence-classification model's first logit for
prompt + completion, batched and right-padded, equal to one unpadded forward per text; its
running normalisation by hand; placed like a frozen peer; trained with from a recipe."""

from __future__ import annotations

import statistics

import pytest
import torch
from helpers import save_reward_model
from transformers import LlamaForSequenceClassification

from grpo_ensemble import Candidate, Prompt, RecipeError, Sample, UserError, train
from grpo_ensemble.models.tiny import build_tokenizer
from grpo_ensemble.plugins.builtin.reward_model import RewardModel
from grpo_ensemble.trainer.build import build_scorers
from grpo_ensemble.trainer.setup import build_run


def _save(path, num_labels=1):
    return save_reward_model(path, num_labels)


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


# user turns and the assistant's reply, each ended by "=" or ";" (characters the tokenizer has)
RM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['content'] }}"
    "{% if m['role'] == 'user' %}={% else %};{% endif %}{% endfor %}"
)
TALK = (
    {"role": "system", "content": "9"},
    {"role": "user", "content": "1+1"},
)


def test_a_conversation_is_scored_through_the_reward_models_chat_template(rm_dir, tmp_path):
    # the conversation and the completion as the assistant's reply, rendered by the reward
    # model's own template (its BOS from the template, none added), as TRL renders it
    samples = [
        Sample(Prompt('[{"content": "9"}]', messages=TALK), Candidate("2", [5], "policy")),
        Sample(Prompt("37+45="), Candidate("82", [5, 5], "policy")),  # plain text beside it
    ]
    model = LlamaForSequenceClassification.from_pretrained(rm_dir).eval()
    tok = build_tokenizer()
    texts = ["9;1+1=2;", "37+45=82"]  # by hand: the template's output; the text as it is
    ids = [[tok.bos_token_id, *tok(texts[0], add_special_tokens=False)["input_ids"]]]
    ids.append(tok(texts[1])["input_ids"])  # plain text: BOS added by the tokenizer
    with torch.no_grad():
        want = [float(model(input_ids=torch.tensor([i])).logits[0, 0]) for i in ids]
    (tmp_path / "rm.jinja").write_text(RM_TEMPLATE)
    for template in (RM_TEMPLATE, str(tmp_path / "rm.jinja")):  # inline or a file
        scorer = RewardModel(str(rm_dir), batch_size=2, chat_template=template)
        assert [scorer.token_ids(s) for s in samples] == ids
        assert scorer.score(samples) == pytest.approx(want, abs=1e-5)
    with pytest.raises(UserError, match=r"conversations .* no chat template: give params\."):
        RewardModel(str(rm_dir)).score(samples)


def test_conversations_need_the_reward_models_template_before_training(rm_dir, small_recipe):
    from grpo_ensemble.trainer.build import check_recipe

    rewards = [{"name": "reward_model", "params": {"model": str(rm_dir)}}]
    chat = {"data__train": "builtin:arithmetic-chat/train", "data__eval": None}
    with pytest.raises(RecipeError, match=r"^rewards\.0\.params\.chat_template: the prompts are"):
        check_recipe(small_recipe(rewards=rewards, **chat))
    rewards[0]["params"]["chat_template"] = "/nonexistent/rm.jinja"
    with pytest.raises(RecipeError, match=r"chat_template: neither Jinja nor a readable file"):
        check_recipe(small_recipe(rewards=rewards, **chat))
    rewards[0]["params"]["chat_template"] = RM_TEMPLATE
    check_recipe(small_recipe(rewards=rewards, **chat))
