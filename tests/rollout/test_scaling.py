"""What divides the advantages (`group.scale_rewards`), how several rewards are combined
(`group.reward_aggregation`), and truncated completions out of the loss (`loss.mask_truncated`).

Every expected value is worked out by hand in the test, or by a plain-Python reference of
TRL's formulas written here, never by the code under test.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import small_recipe_dict
from helpers import subprocess_env

from grpo_ensemble import RewardScorer
from grpo_ensemble.cli import main
from grpo_ensemble.errors import RecipeError
from grpo_ensemble.plugins.builtin.evaluators import GRPO, RLOO, DrGRPO
from grpo_ensemble.recipe import recipe_from_dict
from grpo_ensemble.rollout.groups import GroupSettings, batch_scaled, evaluate_groups
from grpo_ensemble.rollout.scoring import WeightedScorer, score_groups
from grpo_ensemble.trainer.build import build_evaluator
from grpo_ensemble.trainer.loop import train
from grpo_ensemble.types import Candidate, Group, Prompt

EPS = 1e-4
ROOT = Path(__file__).resolve().parents[2]


class Table(RewardScorer):
    """The score written after the scorer's name in the completion: "a=1 b=3" gives a 1 and
    b 3; a scorer not named there returns None (no score)."""

    def __init__(self, name: str):
        self.name = name

    def score(self, samples):
        out = []
        for s in samples:
            found = dict(part.split("=") for part in s.completion.split() if "=" in part)
            out.append(float(found[self.name]) if self.name in found else None)
        return out


def _group(texts, sources=None, finished=None):
    sources = sources or ["policy"] * len(texts)
    finished = finished or [True] * len(texts)
    rows = zip(texts, sources, finished, strict=True)
    return Group(Prompt("q", {}), [Candidate(t, [1], src, finished=f) for t, src, f in rows])


def _scorers(*names_weights):
    return [WeightedScorer(n, Table(n), w) for n, w in names_weights]


def _rollout(groups, scorers, evaluator, **settings):
    how = GroupSettings(modes={"policy": "on_policy", "strong": "on_policy"}, **settings)
    scores = score_groups(groups, scorers)
    weights = {ws.name: ws.weight for ws in scorers}
    return batch_scaled(evaluate_groups(groups, scores, evaluator, how, weights), how), how


def _evaluator(tmp_path, evaluator="grpo", params=None, **group):
    data = small_recipe_dict(tmp_path, group__evaluator=evaluator, group__params=params or {})
    data["group"].update(group)
    return build_evaluator(recipe_from_dict(data))


# two groups, one ragged: rewards [1, 0, 0, 1] and [2, 0, 1]
TWO_GROUPS = [_group(["a=1", "a=0", "a=0", "a=1"]), _group(["a=2", "a=0", "a=1"])]
CENTRED = [0.5, -0.5, -0.5, 0.5, 1.0, -1.0, 0.0]  # r − group mean (means 0.5 and 1)
# unbiased stds: group 1 √(4·0.25/3) = √(1/3), group 2 √((1+1+0)/2) = 1; the whole batch of
# 7 rewards: mean 5/7, Σr² = 7, Σ(r − mean)² = 7 − 25/7 = 24/7, over 6: 4/7
GROUP_STDS = [math.sqrt(1 / 3)] * 4 + [1.0] * 3
BATCH_STD = math.sqrt(4 / 7)


@pytest.mark.parametrize("scale", ["none", "group", "batch", None])
def test_grpo_scale_rewards_by_hand(tmp_path, scale):
    evaluator = _evaluator(tmp_path, scale_rewards=scale)
    assert isinstance(evaluator, GRPO)
    ro, how = _rollout(TWO_GROUPS, _scorers(("a", 1.0)), evaluator, scale_rewards=scale)
    if scale == "none":
        want = CENTRED
    elif scale == "batch":
        want = [c / (BATCH_STD + EPS) for c in CENTRED]
    else:  # group, and the evaluator's own (grpo: group)
        want = [c / (s + EPS) for c, s in zip(CENTRED, GROUP_STDS, strict=True)]
    assert ro.advantages.tolist() == pytest.approx(want, rel=1e-6)
    assert ro.rewards.tolist() == [1.0, 0.0, 0.0, 1.0, 2.0, 0.0, 1.0]


def test_batch_divides_the_other_evaluators_own_advantages(tmp_path):
    # rloo: r − mean of the others; group 1: ±2/3, group 2: 2 − 1/2, 0 − 3/2, 1 − 1
    evaluator = _evaluator(tmp_path, "rloo", scale_rewards="batch")
    assert isinstance(evaluator, RLOO)
    ro, _ = _rollout(TWO_GROUPS, _scorers(("a", 1.0)), evaluator, scale_rewards="batch")
    own = [2 / 3, -2 / 3, -2 / 3, 2 / 3, 1.5, -1.5, 0.0]
    assert ro.advantages.tolist() == pytest.approx([a / (BATCH_STD + EPS) for a in own])
    # none leaves dr_grpo and rloo as they are
    assert isinstance(_evaluator(tmp_path, "dr_grpo", scale_rewards="none"), DrGRPO)


def test_batch_std_of_the_statistics_candidates_and_where_it_is_zero():
    # group.stats: policy. The statistics (the policy's) rewards [1, 0 | 3, 3]: mean 7/4,
    # Σ(r − mean)² = (3/4)² + (7/4)² + 2·(5/4)² = 6.75, over 3: 2.25, std 1.5; the peer's 10
    # is not in it
    groups = [
        _group(["a=1", "a=0", "a=10"], ["policy", "policy", "strong"]),
        _group(["a=3", "a=3"]),
    ]
    ro, _ = _rollout(groups, _scorers(("a", 1.0)), DrGRPO(), scale_rewards="batch", stats="policy")
    want = [a / (1.5 + EPS) for a in [0.5, -0.5, 9.5, 0, 0]]
    assert ro.advantages.tolist() == pytest.approx(want)
    # the policy's rewards all 0 (std 0), the peer's 1: the std of every scored candidate,
    # [0, 0, 1, 0, 0]: mean 0.2, Σ(r − mean)² = 4·0.04 + 0.64 = 0.8, over 4: 0.2
    groups = [_group(["a=0", "a=0", "a=1"], ["policy", "policy", "strong"]), _group(["a=0"] * 2)]
    ro, _ = _rollout(groups, _scorers(("a", 1.0)), DrGRPO(), scale_rewards="batch", stats="policy")
    peer = 1 / (math.sqrt(0.2) + EPS)
    assert ro.advantages.tolist() == pytest.approx([0, 0, peer, 0, 0])
    # every reward equal, or a lone candidate: std 0, advantages 0, never NaN
    for groups in ([_group(["a=2"] * 3), _group(["a=2"] * 2)], [_group(["a=5"])]):
        ro, _ = _rollout(groups, _scorers(("a", 1.0)), GRPO(scale="none"), scale_rewards="batch")
        assert ro.advantages.tolist() == [0.0] * len(ro.candidates)


BATCH_ON_TWO_RANKS = """
import json, sys
import torch
from grpo_ensemble.plugins.builtin.evaluators import GRPO
from grpo_ensemble.rollout.groups import GroupSettings, batch_scaled, evaluate_groups
from grpo_ensemble.rollout.scoring import Scores
from grpo_ensemble.types import Candidate, Group, Prompt

torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
rewards = json.loads(sys.argv[2])[rank]  # this rank's group
group = Group(Prompt("q", {}), [Candidate(str(r), [1], "policy") for r in rewards])
r = torch.tensor(rewards)
scores = Scores(r, {"a": r}, [False])
how = GroupSettings(modes={"policy": "on_policy"}, scale_rewards="batch")
ro = batch_scaled(evaluate_groups([group], scores, GRPO(scale="none"), how), how)
with open(sys.argv[1] + f"/rank{rank}.json", "w") as f:
    json.dump(ro.advantages.tolist(), f)
torch.distributed.destroy_process_group()
"""


@pytest.mark.multirank
def test_batch_std_is_over_the_groups_of_every_rank(tmp_path):
    # rank 0 holds group 1, rank 1 group 2: each divides by the std of all 7 rewards
    script = tmp_path / "two.py"
    script.write_text(BATCH_ON_TWO_RANKS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rewards = json.dumps([[1.0, 0.0, 0.0, 1.0], [2.0, 0.0, 1.0]])  # TWO_GROUPS'
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(port), str(script), str(tmp_path), rewards]
    env = subprocess_env(OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [x for r in (0, 1) for x in json.loads((tmp_path / f"rank{r}.json").read_text())]
    assert got == pytest.approx([c / (BATCH_STD + EPS) for c in CENTRED], rel=1e-6)


def test_normalize_then_sum_with_two_scorers_and_no_scores():
    # a (weight 1) scores the first four; b (weight 2) all but the second; the fifth has no
    # score at all. a: [1, 0, 1, 0], mean 0.5, std √(1/3); b: [3, 1, 2] over 1st, 3rd, 4th,
    # mean 2, std √((1 + 1 + 0)/2) = 1
    group = _group(["a=1 b=3", "a=0", "a=1 b=1", "a=0 b=2", "-"])
    # a group where b scored one candidate (its term 0) and a's are equal: the rewards
    # differ (1 and 1 + 2·5) but what the evaluator sees does not: an equal group
    equal = _group(["a=1", "a=1 b=5"])
    scorers = _scorers(("a", 1.0), ("b", 2.0))
    ro, _ = _rollout([group, equal], scorers, DrGRPO(), reward_aggregation="normalize_then_sum")
    a, b = 0.5 / (math.sqrt(1 / 3) + EPS), 1 / (1 + EPS)
    signal = [a + 2 * b, -a, a - 2 * b, -a]  # mean 0: dr_grpo's advantages are these
    assert ro.signal[:4].tolist() == pytest.approx(signal, rel=1e-6)
    assert ro.advantages.tolist() == pytest.approx([*signal, 0.0, 0.0, 0.0], rel=1e-6)
    assert ro.rewards.tolist() == [7.0, 0.0, 3.0, 4.0, 0.0, 1.0, 11.0]  # the raw weighted sum
    assert ro.keep.tolist() == [True, True, True, True, False, False, False]
    assert ro.equal_groups == 1
    # sum_then_normalize: today's, the evaluator sees the weighted sum
    ro, _ = _rollout([group, equal], scorers, DrGRPO())
    assert ro.advantages.tolist() == pytest.approx([3.5, -3.5, -0.5, 0.5, 0.0, -5.0, 5.0])
    assert ro.equal_groups == 0


def _trl_normalize_then_sum(rewards, weights, size):
    """TRL 1.16's normalize_then_sum advantages in plain Python: `rewards[i][k]` of candidate
    i (groups of `size` in a row) by scorer k, every one scored."""

    def mean(xs):
        return sum(xs) / len(xs)

    def std(xs):
        m = mean(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))

    summed = []
    for start in range(0, len(rewards), size):
        rows = rewards[start : start + size]
        cols = [[r[k] for r in rows] for k in range(len(weights))]
        for r in rows:
            terms = [(r[k] - mean(c)) / (std(c) + EPS) for k, c in enumerate(cols)]
            summed.append(sum(w * t for w, t in zip(weights, terms, strict=True)))
    return [(s - mean(summed)) / (std(summed) + EPS) for s in summed]


def test_batch_with_normalize_then_sum_is_trls_normalize_then_sum():
    texts = [["a=1 b=0.5", "a=0 b=2", "a=0 b=1"], ["a=3 b=0", "a=1 b=0", "a=2 b=4"]]
    rewards = [[float(p.split("=")[1]) for p in t.split()] for g in texts for t in g]
    ro, _ = _rollout(
        [_group(g) for g in texts],
        _scorers(("a", 1.0), ("b", 0.5)),
        GRPO(scale="none"),
        scale_rewards="batch",
        reward_aggregation="normalize_then_sum",
    )
    want = _trl_normalize_then_sum(rewards, [1.0, 0.5], 3)
    assert ro.advantages.tolist() == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_normalize_then_sum_needs_the_weights():
    how = GroupSettings(modes={"policy": "on_policy"}, reward_aggregation="normalize_then_sum")
    scores = score_groups(TWO_GROUPS, _scorers(("a", 1.0)))
    with pytest.raises(ValueError, match="weight"):
        evaluate_groups(TWO_GROUPS, scores, DrGRPO(), how)


def test_mask_truncated_leaves_the_loss_not_the_statistics():
    # rewards [1, 0, 0], the last cut at max_new_tokens: mean 1/3, std √(((2/3)² + 2/9)/2)
    group = _group(["a=1", "a=0", "a=0"], finished=[True, True, False])
    std = math.sqrt(1 / 3)
    want = [(2 / 3) / (std + EPS), -(1 / 3) / (std + EPS), -(1 / 3) / (std + EPS)]
    for mask, keep in ((True, [True, True, False]), (False, [True, True, True])):
        ro, _ = _rollout([group], _scorers(("a", 1.0)), GRPO(), mask_truncated=mask)
        assert ro.advantages.tolist() == pytest.approx(want, rel=1e-6)
        assert ro.keep.tolist() == keep
        assert ro.rewards.tolist() == [1.0, 0.0, 0.0]


def _recipe_file(tmp_path, **changes) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(small_recipe_dict(tmp_path, **changes)))
    return path


@pytest.mark.parametrize("evaluator", ["rloo", "dr_grpo"])
def test_scale_rewards_group_needs_grpo_validate_exit_2(tmp_path, capsys, evaluator):
    recipe = _recipe_file(tmp_path, group__evaluator=evaluator, group__scale_rewards="group")
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {recipe}:")  # the line of the recipe's group section
    assert err.endswith(
        f": group.scale_rewards: group needs the grpo evaluator, not {evaluator!r} "
        "(dr_grpo and rloo never divide by a std)"
    )
    assert len(err.splitlines()) == 1


def test_grpo_params_keep_working_beside_scale_rewards(tmp_path):
    ev = _evaluator(tmp_path, params={"eps": 0.5}, scale_rewards="none")
    assert (ev.eps, ev.scale) == (0.5, "none")
    ev = _evaluator(tmp_path, params={"scale": "none"})  # the evaluator's own option
    assert ev.scale == "none"
    with pytest.raises(RecipeError, match=r"^group\.params: scale: set group\.scale_rewards"):
        _evaluator(tmp_path, params={"scale": "none"}, scale_rewards="group")


def test_a_run_with_batch_scale_and_normalize_then_sum(small_recipe, monkeypatch):
    # two rewards (exact match; a length penalty past 2 tokens): each step's advantages are
    # the evaluator's r − group mean of the normalised sum, divided by that sum's batch std
    import importlib

    step = importlib.import_module("grpo_ensemble.trainer.step")
    seen = []

    def spy(ro, how):
        out = step_batch_scaled(ro, how)
        seen.append((ro.advantages.clone(), ro.signal.clone(), ro.in_stats.clone(), out))
        return out

    step_batch_scaled = step.batch_scaled
    monkeypatch.setattr(step, "batch_scaled", spy)
    recipe = small_recipe(
        rewards=[
            {"name": "exact_match"},
            {"name": "length_penalty", "weight": 0.5, "params": {"max_tokens": 2}},
        ],
        group__scale_rewards="batch",
        group__reward_aggregation="normalize_then_sum",
        eval__before=False,
        eval__after=False,
    )
    rows = train(recipe).metrics
    assert [r["step"] for r in rows] == [1, 2]
    assert len(seen) == 2
    for before, signal, stats, out in seen:
        xs = signal[stats].double().tolist()
        m = sum(xs) / len(xs)
        std = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
        assert std > 0  # the run had rewards to tell apart
        assert out.advantages.tolist() == pytest.approx((before / (std + EPS)).tolist())
        assert torch.isfinite(out.advantages).all()
    assert all(math.isfinite(r["loss"]) for r in rows)
