"""Reward functions written for TRL's GRPOTrainer, `fn(prompts, completions, **kwargs)`, run
unchanged: from a recipe (`python` scorer, `function: "module:name"`) and from the Python API
(a plain function in `reward_scorers`). None means no score for that sample."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from grpo_ensemble import Candidate, Group, PluginError, Prompt, UserError, train
from grpo_ensemble.plugins.builtin.evaluators import DrGRPO
from grpo_ensemble.plugins.builtin.rewards import PythonFunction, TrlFunction, trl_style
from grpo_ensemble.rollout.groups import GroupSettings, evaluate_groups
from grpo_ensemble.rollout.scoring import WeightedScorer, score_groups
from grpo_ensemble.trainer.build import build_scorers

# From TRL's GRPO documentation, as written there (the quickstart's length reward, the
# "standard format" example and a ground-truth reward)
TRL_DOCS = '''
import re


def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


def format_reward_func(completions, **kwargs):
    """Reward function that checks if the completion has a specific format."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    matches = [re.match(pattern, content) for content in completions]
    return [1.0 if match else 0.0 for match in matches]


def reward_func(completions, ground_truth, **kwargs):
    # Regular expression to capture content inside \\\\boxed{}
    matches = [re.search(r"\\\\boxed\\{(.*?)\\}", completion) for completion in completions]
    contents = [match.group(1) if match else "" for match in matches]
    # Reward 1 if the content is the same as the ground truth, 0 otherwise
    return [1.0 if c == gt else 0.0 for c, gt in zip(contents, ground_truth)]
'''


@pytest.fixture
def trl_module(tmp_path, monkeypatch):
    """TRL's documented reward functions as a module `trl_docs` in the current directory."""
    (tmp_path / "trl_docs.py").write_text(textwrap.dedent(TRL_DOCS))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    return importlib.import_module("trl_docs")


def _samples(texts, rows):
    return [
        (Prompt(f"q{i}", row, index=i), Candidate(t, [7] * (i + 1), "policy"))
        for i, (t, row) in enumerate(zip(texts, rows, strict=True))
    ]


def _score(scorer, pairs):
    from grpo_ensemble import Sample

    return scorer.score([Sample(p, c) for p, c in pairs])


def test_trl_documented_functions_score_unchanged(trl_module):
    pairs = _samples(
        ["<think>a</think><answer>b</answer>", "x" * 25, "so \\boxed{42}", "\\boxed{41}"],
        [
            {"ground_truth": "1"},
            {"ground_truth": "2"},
            {"ground_truth": "42"},
            {"ground_truth": "4"},
        ],
    )
    assert trl_style(trl_module.reward_len) and trl_style(trl_module.reward_func)
    # lengths 34, 25, 13, 10
    assert _score(TrlFunction(trl_module.reward_len), pairs) == [-14, -5, -7, -10]
    assert _score(TrlFunction(trl_module.format_reward_func), pairs) == [1.0, 0.0, 0.0, 0.0]
    assert _score(TrlFunction(trl_module.reward_func), pairs) == [0.0, 0.0, 1.0, 0.0]
    # from a recipe entry, by module:name
    assert _score(PythonFunction("trl_docs:reward_func"), pairs) == [0.0, 0.0, 1.0, 0.0]


def test_trl_arguments_are_lists_per_candidate():
    seen = {}

    def spy(prompts, completions, completion_ids, trainer_state, answer, extra, **kwargs):
        seen.update(prompts=prompts, completions=completions, ids=completion_ids)
        seen.update(state=trainer_state, answer=answer, extra=extra, rest=kwargs)
        return [None, 0.5]

    pairs = _samples(["7", "8"], [{"answer": "7", "extra": 1}, {"answer": "9"}])
    assert _score(TrlFunction(spy), pairs) == [None, 0.5]
    assert seen == {
        "prompts": ["q0", "q1"],
        "completions": ["7", "8"],
        "ids": [[7], [7, 7]],
        "state": None,
        "answer": ["7", "9"],
        "extra": [1, None],  # a column a row lacks: None there
        "rest": {"log_metric": seen["rest"]["log_metric"], "log_extra": seen["rest"]["log_extra"]},
    }
    assert all(callable(f) for f in seen["rest"].values())  # TRL's logging callbacks

    def named_only(completions, answer):  # no **kwargs: only what it names
        return [float(c == a) for c, a in zip(completions, answer, strict=True)]

    assert _score(TrlFunction(named_only), pairs) == [1.0, 0.0]


def test_the_projects_own_function_convention_stays():
    def samples_only(samples):
        return [float(len(s.completion)) for s in samples]

    assert not trl_style(samples_only)
    given = build_scorers(None, [(samples_only, 1.0), (lambda completions, **kw: [1.0] * 2, 2.0)])
    assert [(w.name, w.weight) for w in given] == [("samples_only", 1.0), ("<lambda>", 2.0)]
    pairs = _samples(["ab", "c"], [{}, {}])
    assert _score(given[0].scorer, pairs) == [2.0, 1.0]
    assert _score(given[1].scorer, pairs) == [1.0, 1.0]


def _group(texts):
    p = Prompt("1+1=", {"answer": "2"})
    return Group(p, [Candidate(t, [5], "policy") for t in texts])


def test_none_means_no_score_left_out_of_the_group_statistics():
    # rewards by hand: a function scores "2" as 1, "3" as 0, and cannot score "?" (None)
    def judge(completions, **kwargs):
        return [None if c == "?" else float(c == "2") for c in completions]

    def length(completions, **kwargs):  # scores everything: 0.5 per character
        return [0.5 * len(c) for c in completions]

    groups = [_group(["2", "3", "?", "3"]), _group(["?", "?"])]
    how = GroupSettings(modes={"policy": "on_policy"})
    only = [WeightedScorer("judge", TrlFunction(judge), 1.0)]
    scores = score_groups(groups, only)
    ro = evaluate_groups(groups, scores, DrGRPO(), how)
    # group 1: mean over the 3 scored (1, 0, 0) = 1/3; "?" has no advantage and no gradient
    assert ro.advantages.tolist() == pytest.approx([2 / 3, -1 / 3, 0.0, -1 / 3, 0.0, 0.0])
    assert ro.keep.tolist() == [True, True, False, True, False, False]
    assert ro.any_scored.tolist() == [True, True, False, True, False, False]
    assert ro.equal_groups == 0  # group 2 has nothing to compare, it is not "equal"
    # two scorers: a None drops that scorer's weight only (TRL sums what was scored)
    both = [*only, WeightedScorer("length", TrlFunction(length), 2.0)]
    scores = score_groups(groups, both)
    assert scores.combined.tolist() == [2.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert scores.any_scored.all()


def test_a_trl_function_that_misbehaves_is_named():
    def words(completions, **kwargs):
        return ["high" for _ in completions]

    groups = [_group(["2", "3"])]
    with pytest.raises(PluginError, match=r"words.*returned a score that is not a number"):
        score_groups(groups, [WeightedScorer("words", TrlFunction(words), 1.0)])

    def short(completions, **kwargs):
        return [1.0]

    with pytest.raises(PluginError, match=r"short.*returned 1 scores for 2 candidates"):
        score_groups(groups, [WeightedScorer("short", TrlFunction(short), 1.0)])


def test_trains_with_trl_functions_from_a_recipe_and_the_api(trl_module, small_recipe):
    # the recipe names a TRL function by module:name; the Python API passes another as is;
    # each step's reward metric is the mean of what the function returned that step
    returned: list[list[float]] = []

    def correct(prompts, completions, answer, **kwargs):
        out = [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer, strict=True)]
        returned.append(out)
        return out

    recipe = small_recipe(
        rewards=[{"name": "python", "params": {"function": "trl_docs:reward_len"}}],
        eval__before=False,
        eval__after=False,
    )
    lengths = train(recipe).metrics
    assert all(m["reward/python"] <= -15 for m in lengths)  # completions of at most 5 tokens
    result = train(
        small_recipe(
            eval__before=False, eval__after=False, output_dir=str(recipe.output_dir) + "2"
        ),
        reward_scorers=[(correct, 1.0)],
    )
    probe, *steps = returned  # first, one call on the first row before anything trains
    assert probe == [0.0] and len(steps) == 4  # a step: the policy's candidates, the peer's
    for step, m in enumerate(result.metrics):
        values = steps[2 * step] + steps[2 * step + 1]
        assert m["reward/correct"] == pytest.approx(sum(values) / len(values), abs=1e-7)
        assert "unscored_candidates" not in m
    assert torch.tensor([m["reward"] for m in result.metrics]).ge(0).all()


def test_a_step_counts_the_candidates_no_scorer_scored(small_recipe):
    # the peer's candidates get None from the only scorer: they leave the statistics and the
    # loss, the step says how many, and the rewards are the policy's alone
    def policy_only(samples):
        return [
            float(s.completion.strip() == s.row["answer"])
            if s.candidate.source == "policy"
            else None
            for s in samples
        ]

    recipe = small_recipe(eval__before=False, eval__after=False)
    for m in train(recipe, reward_scorers=[(policy_only, 1.0)]).metrics:
        assert m["unscored_candidates"] == 8 and m["candidates"] == 16
        assert "member/strong/reward" not in m and m["member/strong/candidates"] == 8
        assert m["reward"] == m["member/policy/reward"] == m["reward/policy_only"]
        assert m["trained_candidates"] <= 8  # the policy's, less any of equal-reward groups


def test_a_function_that_does_not_fit_is_named_before_training(small_recipe, trl_module):
    # a TRL function asking for a column the data lacks, and one returning words: named when
    # the run is built (and by validate), not at the first step
    def needs_ground_truth(completions, ground_truth, **kwargs):
        return [float(c == g) for c, g in zip(completions, ground_truth, strict=True)]

    with pytest.raises(UserError) as info:
        train(small_recipe(), reward_scorers=[(needs_ground_truth, 1.0)])
    assert str(info.value).startswith(
        "reward_scorers[0]: 'needs_ground_truth' failed on the first training row (line 1): "
        "TypeError:"
    )

    def words(completions, **kwargs):
        return ["high" for _ in completions]

    with pytest.raises(UserError, match=r"^reward_scorers\[0\]: 'words' returned 'high', not a"):
        train(small_recipe(), reward_scorers=[(words, 1.0)])
    from grpo_ensemble.trainer.build import check_recipe

    recipe = small_recipe(
        rewards=[{"name": "python", "params": {"function": "trl_docs:reward_func"}}]
    )
    with pytest.raises(UserError, match=r"^rewards\.0: 'python' failed on the first training row"):
        check_recipe(recipe)


def test_trainer_state_counts_steps_and_epochs_as_trl_does(small_recipe):
    # a curriculum reward reads trainer_state as in TRL: global_step and max_steps count
    # optimizer steps (GRPO steps × mu), epoch the passes over the training prompts; a
    # resumed run continues the count
    seen: list[tuple] = []

    def curriculum(completions, trainer_state, **kwargs):
        s = trainer_state
        seen.append(None if s is None else (s.global_step, s.max_steps, s.epoch))
        return [0.5 if s is None or s.global_step < 2 else 1.0 for _ in completions]

    rows = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(11, 17)]  # 6 rows
    recipe = small_recipe(
        loss__mu=2,
        train__steps=3,
        train__checkpoint_every=2,
        eval__before=False,
        eval__after=False,
    )
    result = train(recipe, reward_scorers=[(curriculum, 1.0)], train_data=rows)
    probe, *calls = seen  # the check before training: no run yet
    assert probe is None
    # each step: the policy's candidates, then the peer's; 4 of 6 prompts drawn per step
    assert calls == [
        (0, 6, 0.0),
        (0, 6, 0.0),
        (2, 6, 4 / 6),
        (2, 6, 4 / 6),
        (4, 6, 8 / 6),
        (4, 6, 8 / 6),
    ]
    assert [m["reward/curriculum"] for m in result.metrics] == [0.5, 1.0, 1.0]
    seen.clear()
    ckpt = Path(recipe.output_dir) / "checkpoints" / "step-00000002"
    train(recipe, reward_scorers=[(curriculum, 1.0)], train_data=rows, resume=str(ckpt))
    assert seen[1:] == [(4, 6, 8 / 6), (4, 6, 8 / 6)]


def test_log_metric_and_log_extra_reach_the_metrics_and_completions(small_recipe):
    # TRL's logging callbacks: log_metric's values of a step averaged into its metrics row
    # (a name the row has already gets the scorer's prefix), log_extra's column beside each
    # candidate in completions.jsonl
    logged: list[list[float]] = []

    def lengths(completions, log_metric, log_extra, **kwargs):
        sizes = [float(len(c)) for c in completions]
        logged.append(sizes)
        log_metric("mean_len", sum(sizes) / len(sizes))
        log_metric("reward", -1.0)  # a built-in name
        log_extra("len", [int(x) for x in sizes])
        return [0.0 if x < 2 else 1.0 for x in sizes]

    recipe = small_recipe(
        eval__before=False, eval__after=False, log__completions={"every": 1, "prompts": 4}
    )
    result = train(recipe, reward_scorers=[(lengths, 1.0)])
    probe, *calls = logged  # the check before training logs nothing of a step
    for step, m in enumerate(result.metrics):
        policy, peer = calls[2 * step], calls[2 * step + 1]  # each call logs its own mean
        want = (sum(policy) / len(policy) + sum(peer) / len(peer)) / 2
        assert m["mean_len"] == pytest.approx(want, abs=1e-12)
        assert m["lengths/reward"] == -1.0 and m["reward"] != -1.0
    rows = [json.loads(x) for x in (Path(recipe.output_dir) / "completions.jsonl").open()]
    assert rows and all(r["extra"] == {"len": len(r["completion"])} for r in rows)


def test_a_call_that_raises_logs_nothing():
    # the whole step's call logs, then raises on the group "bad"; retried group by group,
    # only the calls that returned count
    def picky(prompts, completions, log_metric, **kwargs):
        log_metric("calls", float(len(completions)))
        if "bad" in prompts:
            raise ValueError("cannot parse")
        return [1.0] * len(completions)

    scorer = TrlFunction(picky)
    groups = [
        Group(Prompt("1+1="), [Candidate("2", [1], "policy")] * 2),
        Group(Prompt("bad"), [Candidate("0", [1], "policy")] * 2),
        Group(Prompt("2+2="), [Candidate("4", [1], "policy")] * 2),
    ]
    scores = score_groups(groups, [WeightedScorer("picky", scorer, 1.0, "zero")])
    assert scores.faults == {"picky": 1}
    assert scorer.take_metrics() == {"calls": [2.0, 2.0]}  # the two good groups' retries
    assert scorer.take_metrics() == {}
