"""`evaluate` metrics as rewards and as the held-out metric, offline: the shipped exact_match
module and a user's own metric script, both loaded by `evaluate.load(path)`."""

from __future__ import annotations

import textwrap

import evaluate
import pytest

from grpo_ensemble import Candidate, Prompt, Sample, UserError, train
from grpo_ensemble.plugins.builtin.evaluate_metric import SHIPPED, EvaluateMetric


def _samples(pairs):
    return [Sample(Prompt("q", {"answer": a}), Candidate(c, [5], "policy")) for c, a in pairs]


def test_the_shipped_exact_match_module_loads_offline_and_scores_each_sample():
    metric = evaluate.load(str(SHIPPED["exact_match"]))  # the real loader, no hub
    got = metric.compute(predictions=[" 82", "83", "Yes"], references=["82", "82", "yes"])
    assert got == {"exact_match": pytest.approx(1 / 3)}
    pairs = [(" 82", "82"), ("83", "82"), ("Yes", "yes"), ("a-1", "a1")]
    assert EvaluateMetric().score(_samples(pairs)) == [1.0, 0.0, 0.0, 0.0]
    loose = EvaluateMetric(options={"ignore_case": True, "regexes_to_ignore": ["-"]})
    assert loose.score(_samples(pairs)) == [1.0, 0.0, 1.0, 1.0]


def test_a_users_own_metric_script(tmp_path):
    folder = tmp_path / "shared_chars"
    folder.mkdir()
    (folder / "shared_chars.py").write_text(
        textwrap.dedent(
            """
            import datasets
            import evaluate


            class SharedChars(evaluate.Metric):
                def _info(self):
                    return evaluate.MetricInfo(
                        description="share of the reference's characters in the prediction",
                        citation="",
                        features=datasets.Features(
                            {"predictions": datasets.Value("string"),
                             "references": datasets.Value("string")}
                        ),
                    )

                def _compute(self, predictions, references):
                    p, r = predictions[0], references[0]
                    return {"share": sum(c in p for c in r) / len(r)}
            """
        )
    )
    scorer = EvaluateMetric(str(folder), key="share")
    assert scorer.score(_samples([("12", "1234"), ("4321", "1234")])) == [0.5, 1.0]
    with pytest.raises(UserError, match=r"gave \['share'\], not 'shared_chars'"):
        EvaluateMetric(str(folder)).score(_samples([("1", "1")]))


def test_a_metric_that_cannot_load_is_named(tmp_path):
    with pytest.raises(UserError, match=r"'bleu': neither a shipped metric \(exact_match\)"):
        EvaluateMetric("bleu")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "broken.py").write_text("raise RuntimeError('no')\n")
    with pytest.raises(UserError, match=r"evaluate metric '.*broken' did not load: "):
        EvaluateMetric(str(broken))


def test_as_a_reward_and_as_the_held_out_metric(small_recipe):
    # weighted 0 beside exact_match: the same per-step means; as eval.scorer: the same accuracy
    rewards = [{"name": "exact_match"}, {"name": "evaluate_metric", "weight": 0.0}]
    base = train(small_recipe(rewards=rewards))
    for m in base.metrics:
        assert m["reward/evaluate_metric"] == m["reward/exact_match"] == m["reward"]
    other = small_recipe(eval__scorer="evaluate_metric", output_dir=str(base.run_dir) + "-eval")
    result = train(other)
    assert (result.before, result.after) == (base.before, base.after)
