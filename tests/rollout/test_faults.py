"""Faulty plugins: each reward scorer's, the evaluator's and each peer's error policy."""

from __future__ import annotations

import threading

import pytest
import torch

from grpo_ensemble import Generator, GroupEvaluator, PluginError, RewardScorer, hookimpl
from grpo_ensemble.plugins import get_plugin_manager
from grpo_ensemble.plugins.builtin.evaluators import grpo_advantages
from grpo_ensemble.rollout.groups import evaluate_groups
from grpo_ensemble.rollout.scoring import WeightedScorer, score_groups
from grpo_ensemble.trainer.loop import train
from grpo_ensemble.trainer.setup import build_run
from grpo_ensemble.types import Candidate, Group, Prompt

GROUPS = [
    Group(
        Prompt("1+1=", {"answer": "2"}),
        [Candidate("2", [1], "policy"), Candidate("3", [1], "policy")],
    ),
    Group(
        Prompt("bad", {"answer": "0"}),
        [Candidate("0", [1], "policy"), Candidate("1", [1], "policy")],
    ),
    Group(
        Prompt("2+2=", {"answer": "4"}),
        [Candidate("4", [1], "policy"), Candidate("5", [1], "policy")],
    ),
]


class FailsOnBad(RewardScorer):
    """Exact match, except that any call holding the prompt "bad" raises."""

    name = "fails_on_bad"

    def score(self, samples):
        if any(s.prompt.text == "bad" for s in samples):
            raise ValueError("cannot parse")
        return [float(s.completion == s.row["answer"]) for s in samples]


class NanOnBad(RewardScorer):
    name = "nan_on_bad"

    def score(self, samples):
        return [
            float("nan") if s.prompt.text == "bad" and s.completion == "1" else 1.0 for s in samples
        ]


def _ws(scorer, on_error, timeout_s=None):
    return WeightedScorer(scorer.name, scorer, 2.0, on_error, timeout_s)


def test_fail_names_the_scorer_and_the_prompt():
    with pytest.raises(PluginError) as info:
        score_groups(GROUPS, [_ws(FailsOnBad(), "fail")])
    assert str(info.value) == (
        "plugin 'fails_on_bad': reward scorer raised ValueError: cannot parse for prompt 'bad'"
    )


def test_skip_group_drops_only_the_groups_it_fails_on():
    s = score_groups(GROUPS, [_ws(FailsOnBad(), "skip_group")])
    assert s.skip == [False, True, False]
    assert s.faults == {"fails_on_bad": 1}
    # the other groups were scored one by one: weight 2 × exact match
    assert s.combined.tolist() == [2.0, 0.0, 0.0, 0.0, 2.0, 0.0]


def test_zero_scores_the_failed_group_0_and_keeps_it():
    s = score_groups(GROUPS, [_ws(FailsOnBad(), "zero")])
    assert s.skip == [False, False, False]
    assert s.faults == {"fails_on_bad": 1}
    assert s.per_scorer["fails_on_bad"].tolist() == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_a_nan_score_is_zeroed_alone_or_skips_its_group():
    zero = score_groups(GROUPS, [_ws(NanOnBad(), "zero")])
    assert zero.per_scorer["nan_on_bad"].tolist() == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    skip = score_groups(GROUPS, [_ws(NanOnBad(), "skip_group")])
    assert skip.skip == [False, True, False]
    with pytest.raises(PluginError, match="returned nan for prompt 'bad'"):
        score_groups(GROUPS, [_ws(NanOnBad(), "fail")])


class Hangs(RewardScorer):
    name = "hangs"

    def __init__(self):
        self.release = threading.Event()

    def score(self, samples):
        self.release.wait()  # until the test lets it go
        return [0.0] * len(samples)


def test_a_hung_scorer_times_out_and_never_hangs_the_run():
    hangs = Hangs()
    try:
        s = score_groups(GROUPS, [_ws(hangs, "skip_group", timeout_s=0.2)])
        assert s.skip == [True, True, True]
        assert s.faults == {"hangs": 3}
        with pytest.raises(PluginError, match="timed out after 0.2 s for prompt '1\\+1='"):
            score_groups(GROUPS, [_ws(hangs, "fail", timeout_s=0.2)])
    finally:
        hangs.release.set()


class WrongCount(RewardScorer):
    name = "wrong_count"

    def score(self, samples):
        return [0.0] * (len(samples) + 1)


def test_a_wrong_count_fails_every_group():
    s = score_groups(GROUPS, [_ws(WrongCount(), "skip_group")])
    assert s.skip == [True, True, True]
    with pytest.raises(PluginError, match="returned 3 scores for 2 candidates"):
        score_groups(GROUPS, [_ws(WrongCount(), "fail")])


class ReturnsText(RewardScorer):
    """Returns its scores as one string of digits, one per candidate: it must not be read as
    a list of its characters."""

    name = "returns_text"

    def __init__(self, kind=str):
        self.kind = kind

    def score(self, samples):
        text = "1" * len(samples)
        return {str: text, bytes: text.encode(), dict: dict.fromkeys(text)}[self.kind]


@pytest.mark.parametrize("kind", [str, bytes, dict])
def test_scores_given_as_a_string_are_a_fault_not_one_score_per_character(kind):
    with pytest.raises(PluginError) as info:
        score_groups(GROUPS, [_ws(ReturnsText(kind), "fail")])
    assert str(info.value) == (
        f"plugin 'returns_text': returned a {kind.__name__}, not a list of scores for prompt '1+1='"
    )
    s = score_groups(GROUPS, [_ws(ReturnsText(kind), "zero")])
    assert s.combined.tolist() == [0.0] * 6


class NanForBadGroup(GroupEvaluator):
    """GRPO advantages, except NaN for the group whose prompt is "bad" (row 1 here)."""

    name = "nan_for_bad"

    def advantages(self, rewards, valid, stats):
        adv = grpo_advantages(rewards, valid, stats)
        if rewards.shape[0] == 3:
            adv[1] = float("nan")
        return adv


def test_evaluator_skip_group_drops_the_group_and_evaluates_the_rest(small_recipe, tmp_path):
    run = build_run(small_recipe(group__on_error="skip_group"), tmp_path)
    run.evaluator = NanForBadGroup()
    ro = _evaluate(run, [Group(g.prompt, list(g.candidates)) for g in GROUPS])
    assert ro.skipped_groups == 1
    assert [g.prompt.text for g in ro.groups] == ["1+1=", "2+2="]
    # two candidates, rewards 1 and 0: mean 0.5, unbiased std √0.5, eps 1e-4
    a = 0.5 / (0.5**0.5 + 1e-4)
    assert ro.advantages.tolist() == pytest.approx([a, -a, a, -a], rel=1e-6)
    run_fail = build_run(small_recipe(), tmp_path)
    run_fail.evaluator = NanForBadGroup()
    with pytest.raises(PluginError, match="advantages are not finite for prompt 'bad'"):
        _evaluate(run_fail, [Group(g.prompt, list(g.candidates)) for g in GROUPS])


def _evaluate(run, groups):
    """The groups scored and evaluated with the run's components and settings."""
    return evaluate_groups(
        groups, score_groups(groups, run.scorers), run.evaluator, run.settings.group
    )


class RaisesOrNan(GroupEvaluator):
    """GRPO advantages; raises for any call holding a group whose rewards are all 1, and gives
    NaN to a group whose rewards are all 0."""

    name = "raises_or_nan"

    def advantages(self, rewards, valid, stats):
        if (rewards == 1.0).all(dim=1).any():
            raise ValueError("cannot handle a group of 1s")
        adv = grpo_advantages(rewards, valid, stats)
        return torch.where((rewards == 0.0).all(dim=1, keepdim=True), float("nan"), adv)


def test_evaluator_skip_group_drops_a_nan_group_beside_a_group_it_raises_on(small_recipe, tmp_path):
    # the whole call raises, so each group is evaluated alone: the one it raises on (rewards
    # 1, 1) leaves, and so does the one it gives NaN (0, 0; before, only a raising group was
    # looked for there, and the NaN group stayed with advantages 0)
    run = build_run(small_recipe(group__on_error="skip_group"), tmp_path)
    run.evaluator = RaisesOrNan()
    groups = [
        Group(GROUPS[0].prompt, [Candidate("2", [1], "policy"), Candidate("2", [1], "policy")]),
        Group(GROUPS[1].prompt, [Candidate("1", [1], "policy"), Candidate("3", [1], "policy")]),
        Group(GROUPS[2].prompt, [Candidate("4", [1], "policy"), Candidate("5", [1], "policy")]),
    ]
    ro = _evaluate(run, groups)
    assert ro.skipped_groups == 2
    assert [g.prompt.text for g in ro.groups] == ["2+2="]
    a = 0.5 / (0.5**0.5 + 1e-4)
    assert ro.advantages.tolist() == pytest.approx([a, -a], rel=1e-6)


class SlowScorer(RewardScorer):
    name = "slow"

    def __init__(self):
        self.release = threading.Event()

    def score(self, samples):
        self.release.wait()
        return [1.0] * len(samples)


def test_a_step_whose_groups_all_leave_takes_no_update(small_recipe, tmp_path):
    # a skip_group scorer whose call times out fails every group of the step: the step is
    # reported, counted, and the weights stay (it used to crash on the empty group grid)
    from grpo_ensemble.trainer.step import grpo_step

    slow = SlowScorer()
    given = [(slow, 1.0, {"on_error": "skip_group", "timeout_s": 0.1})]
    run = build_run(small_recipe(), tmp_path, reward_scorers=given)
    before = {k: v.clone() for k, v in run.engine.module.state_dict().items()}
    try:
        m = grpo_step(run, 1)
    finally:
        slow.release.set()
    assert m["skipped_groups"] == 4 and m["scorer_faults/slow"] == 4
    assert m["skipped_update"] == 1 and m["candidates"] == 0
    after = run.engine.module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


class BrokenPeer(Generator):
    name = "broken"

    def generate(self, prompts, n, sampling):
        raise ConnectionError("peer API unreachable")


def test_a_peer_that_fails_is_skipped_and_counted(small_recipe):
    r = small_recipe(peers__0__on_error="skip")  # see conftest: a__b__0__c edits lists
    result = train(r, generators={"strong": BrokenPeer()})
    m = result.metrics[-1]
    assert m["member/strong/generator_faults"] == 1
    assert "member/strong/candidates" not in m
    assert m["candidates"] == 4 * 2  # the policy's own: 4 prompts × 2


def test_a_peer_that_fails_stops_the_run_by_default(small_recipe):
    with pytest.raises(PluginError, match="generator of 'strong' failed: peer API unreachable"):
        train(small_recipe(), generators={"strong": BrokenPeer()})


class FlakyPlugin:
    @hookimpl
    def register_reward_scorers(self, register):
        register(FailsOnBadText)


class FailsOnBadText(RewardScorer):
    """Raises on prompts whose first number is 1 (about a tenth of the arithmetic prompts)."""

    name = "fails_on_ones"

    def score(self, samples):
        if any(s.prompt.text.startswith("1") for s in samples):
            raise RuntimeError("flaky")
        return [float(s.completion.strip() == s.row["answer"]) for s in samples]


def test_a_run_goes_on_past_a_flaky_scorer_with_skip_group(small_recipe):
    get_plugin_manager().register(FlakyPlugin(), name="flaky")
    r = small_recipe(
        rewards=[{"name": "fails_on_ones", "on_error": "skip_group"}],
        train__steps=4,
        train__prompts_per_step=8,
    )
    result = train(r)
    skipped = sum(m["skipped_groups"] for m in result.metrics)
    faults = sum(m["scorer_faults/fails_on_ones"] for m in result.metrics)
    assert skipped == faults > 0
    for m in result.metrics:  # the groups left are whole groups of 2 + 2 candidates
        assert m["candidates"] == 4 * (8 - m["skipped_groups"])
    assert (result.run_dir / "final" / "model.safetensors").is_file()
    assert torch.isfinite(torch.tensor([m["loss"] for m in result.metrics])).all()


def _with(groups, extra):
    """`groups` with the candidates `extra[i]` (texts) of a peer appended to group i."""
    return [
        Group(g.prompt, g.candidates + [Candidate(t, [1], "peer") for t in ts])
        for g, ts in zip(groups, extra, strict=True)
    ]


def test_known_scores_are_kept_and_only_the_new_candidates_scored():
    from grpo_ensemble.rollout.scoring import Known

    class Counting(FailsOnBad):
        def __init__(self):
            self.scored = []

        def score(self, samples):
            self.scored += [(s.prompt.text, s.completion, s.candidate.source) for s in samples]
            return super().score(samples)

    scorer = Counting()
    ws = [_ws(scorer, "skip_group")]
    known = Known([2, 2, 2], score_groups(GROUPS, ws))  # the "bad" group fails here
    scorer.scored.clear()
    s = score_groups(_with(GROUPS, [["2"], ["0"], []]), ws, known)
    # only the peer's candidates were scored: in one call, which failed ("bad"), then group by
    # group (group 2 has no new candidate)
    assert scorer.scored == [
        ("1+1=", "2", "peer"),
        ("bad", "0", "peer"),
        ("1+1=", "2", "peer"),
        ("bad", "0", "peer"),
    ]
    # group 0: known 2, 0, then the peer's 2 (weight 2 × exact match); group 2 unchanged
    assert s.combined.tolist() == [2.0, 0.0, 2.0, 0.0, 0.0, 0.0, 2.0, 0.0]
    assert s.skip == [False, True, False]
    assert s.faults == {"fails_on_bad": 1}  # the same group failing twice counts once


def test_a_group_that_fails_only_on_its_new_candidates_is_counted():
    from grpo_ensemble.rollout.scoring import Known

    ws = [_ws(FailsOnBad(), "zero")]
    first = [GROUPS[0], Group(GROUPS[1].prompt, []), GROUPS[2]]  # no candidate of "bad" yet
    known = Known([2, 0, 2], score_groups(first, ws))
    assert known.scores.faults == {"fails_on_bad": 0}
    s = score_groups(_with(first, [[], ["0", "1"], ["4"]]), ws, known)
    assert s.per_scorer["fails_on_bad"].tolist() == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    assert s.failed == {"fails_on_bad": {1}} and s.faults == {"fails_on_bad": 1}
    assert s.skip == [False, False, False]


def test_scorers_given_as_objects_take_the_recipes_error_options():
    from grpo_ensemble.errors import UserError
    from grpo_ensemble.trainer.build import build_scorers

    a, b = FailsOnBad(), NanOnBad()
    got = build_scorers(None, [(a, 2.0), (b, 0.5, {"on_error": "zero", "timeout_s": 3})])
    assert [(w.name, w.scorer, w.weight, w.on_error, w.timeout_s) for w in got] == [
        ("fails_on_bad", a, 2.0, "fail", 600.0),  # the recipe default
        ("nan_on_bad", b, 0.5, "zero", 3.0),
    ]
    bad = {
        "reward_scorers[0]: give (scorer, weight) or (scorer, weight, options)": [a],
        "reward_scorers[0]: options must be a mapping of on_error and timeout_s": [(a, 1.0, 5)],
        "reward_scorers[1]: unknown option 'retries' (on_error, timeout_s)": [
            (a, 1.0),
            (b, 1.0, {"retries": 2}),
        ],
        "reward_scorers[0].on_error: Input should be 'fail', 'skip_group' or 'zero'": [
            (a, 1.0, {"on_error": "ignore"})
        ],
        "reward_scorers[0].timeout_s: Input should be greater than 0": [(a, 1.0, {"timeout_s": 0})],
        "reward_scorers[0].weight: Input should be a valid number, unable to parse string as a "
        "number": [(a, "heavy")],
    }
    for message, given in bad.items():
        with pytest.raises(UserError) as info:
            build_scorers(None, given)
        assert str(info.value) == message


class Collective(RewardScorer):
    """Stands for a scorer sharded across ranks: records each call and the thread it ran
    in, and fails on the group "bad" when asked."""

    name = "collective"
    collective = True

    def __init__(self, fail=False):
        self.calls: list[tuple[int, str]] = []
        self.fail = fail

    def score(self, samples):
        self.calls.append((len(samples), threading.current_thread().name))
        if self.fail and any(s.prompt.text == "bad" for s in samples):
            raise ValueError("cannot parse")
        return [1.0] * len(samples)


def test_a_collective_scorer_is_called_alike_on_every_rank_whatever_fails():
    # a scorer that fails first (fail policy) does not keep the collective one from its call:
    # on several ranks the others would wait in its collectives
    together = Collective()
    with pytest.raises(PluginError, match=r"fails_on_bad"):
        score_groups(GROUPS, [_ws(FailsOnBad(), "fail"), _ws(together, "zero")])
    assert [n for n, _ in together.calls] == [6]
    # called in the scoring thread (no timeout thread that could be abandoned mid-collective)
    assert together.calls[0][1] == threading.current_thread().name
    # once, not retried group by group: every group it was called for counts as failed
    failing = Collective(fail=True)
    scores = score_groups(GROUPS, [_ws(failing, "zero")])
    assert [n for n, _ in failing.calls] == [6]
    assert scores.faults == {"collective": 3}
    assert scores.combined.tolist() == [0.0] * 6
    # with nothing to score on this rank (all candidates known already): called with none
    from grpo_ensemble.rollout.scoring import Known

    known = Known([2, 2, 2], score_groups(GROUPS, [_ws(Collective(), "zero")]))
    late = Collective()
    score_groups(GROUPS, [_ws(late, "zero")], known)
    assert [n for n, _ in late.calls] == [0]
