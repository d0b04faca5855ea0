"""Alert rules over metrics rows: each rule trips where it should and only there, re-arms,
replays on resume to the same later alerts, and shrugs at missing keys; a bad `alerts`
section of a recipe is one line and exit 2."""

import json
import math
import textwrap

import pytest
from helpers import SMALL_RECIPE_TEXT

from grpo_ensemble.alerts import POLICY, Alert, Alerts
from grpo_ensemble.cli import main
from grpo_ensemble.recipe.schema import AlertsConfig

RULES = list(AlertsConfig.model_fields)
# a step without an optimizer step, as trainer/update.py reports it
NO_UPDATE = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "grad_norm": 0.0, "skipped_update": 1}


def healthy(step: int, **changes) -> dict:
    """A calm step's metrics row (a policy and one peer, `strong`), with `changes`; a change
    to None drops the key."""
    row = {
        "step": step,
        "reward": 0.5,
        "loss": 0.1,
        "kl": 0.01,
        "entropy": 1.0,
        "completion_len": 20.0,
        "truncated_fraction": 0.0,
        "clip_fraction": 0.05,
        "grad_norm": 1.0,
        "equal_reward_groups": 1,
        "groups": 16,
        "skipped_groups": 0,
        "scorer_faults/judge": 0,
        "member/policy/reward": 0.5,
        "member/strong/reward": 0.8,
    }
    row.update(changes)
    return {k: v for k, v in row.items() if v is not None}


def rows_of(key: str, values, **changes) -> list[dict]:
    """Healthy rows for steps 1, 2, …, with `key` taking `values` in turn."""
    return [healthy(i, **{key: v}, **changes) for i, v in enumerate(values, start=1)]


def only(rule: str, threshold: float, window: int = 10, action: str = "warn") -> AlertsConfig:
    """Every rule off but `rule`."""
    cfg = {name: {"threshold": 1, "enabled": False} for name in RULES}
    cfg[rule] = {"threshold": threshold, "window": window, "action": action}
    return AlertsConfig(**cfg)


def run(config: AlertsConfig, rows, members=(POLICY, "strong")) -> list[Alert]:
    alerts = Alerts(config, members=None if members is None else list(members))
    return [a for row in rows for a in alerts.check(row)]


def one(fired: list[Alert]) -> Alert:
    assert len(fired) == 1, fired
    return fired[0]


# -- each rule: a sequence that trips it, and a near one that must not ---------------------


def test_nonfinite_fires_on_the_skipped_update():
    rows = [
        healthy(1),
        healthy(2),
        healthy(3, **{**NO_UPDATE, "loss": math.nan}, nonfinite_update=1),
    ]
    a = one(run(only("nonfinite", 0.5, 1), rows))
    assert (a.step, a.rule, a.metric, a.value, a.threshold) == (
        3,
        "nonfinite",
        "nonfinite_update",
        1,
        0.5,
    )
    assert "nonfinite_update 1" in a.message and "loss nan" in a.message


@pytest.mark.parametrize(
    "bad",
    [{"loss": math.nan}, {"grad_norm": math.inf}, {"loss": None}],
    ids=["loss-nan", "grad-norm-inf", "loss-null-as-read-back"],
)
def test_nonfinite_fires_on_a_nonfinite_loss_or_gradient(bad):
    row = {**healthy(2), **bad}  # a None stays: metrics.jsonl writes NaN as null
    a = one(run(only("nonfinite", 0.5, 1), [healthy(1), row]))
    assert (a.step, a.value) == (2, 1.0)


def test_nonfinite_does_not_fire_on_an_update_skipped_for_no_signal():
    rows = [healthy(1), healthy(2, **NO_UPDATE), healthy(3)]  # every group dropped: no NaN
    assert run(only("nonfinite", 0.5, 1), rows) == []


def test_nonfinite_counts_over_its_window():
    bad = {**NO_UPDATE, "nonfinite_update": 1}
    # more than 1 of the last 3: steps 2 and 4 are 2 of steps 2-4
    fired = run(
        only("nonfinite", 1, 3), [healthy(1), healthy(2, **bad), healthy(3), healthy(4, **bad)]
    )
    a = one(fired)
    assert (a.step, a.value, a.threshold) == (4, 2.0, 1.0)
    # steps 2 and 5 are never within 3 steps of each other
    rows = [healthy(1), healthy(2, **bad), healthy(3), healthy(4), healthy(5, **bad)]
    assert run(only("nonfinite", 1, 3), rows) == []


def test_kl_spike():
    # median of 0.01, 0.02, 0.03 is 0.02; 5 × 0.02 = 0.1
    a = one(run(only("kl_spike", 5, 3), rows_of("kl", [0.01, 0.02, 0.03, 0.2])))
    assert (a.step, a.metric, a.value) == (4, "kl", 0.2)
    assert a.threshold == pytest.approx(0.1)
    assert a.message == "kl 0.2 is 10× its median 0.02 over the last 3 steps (threshold 5×)"
    assert run(only("kl_spike", 5, 3), rows_of("kl", [0.01, 0.02, 0.03, 0.099])) == []


def test_kl_spike_waits_for_a_full_window_and_ignores_a_tiny_median():
    assert run(only("kl_spike", 5, 3), rows_of("kl", [0.01, 0.02, 5.0])) == []  # 2 before
    # kl 0 (beta 0, the first steps): 0 → anything is no spike
    assert run(only("kl_spike", 5, 3), rows_of("kl", [0.0, 0.0, 0.00005, 0.5])) == []


def test_spike_history_leaves_out_steps_without_an_update():
    # the zeros NO_UPDATE reports would make the median 0 (no check at all); left out,
    # the median is still 0.01 and 0.06 > 5 × 0.01
    rows = rows_of("kl", [0.01, 0.01, 0.01])
    rows += [healthy(4, **NO_UPDATE), healthy(5, **NO_UPDATE), healthy(6, kl=0.06)]
    a = one(run(only("kl_spike", 5, 3), rows))
    assert (a.step, a.value) == (6, 0.06)
    assert a.threshold == pytest.approx(0.05)


def test_reward_collapse():
    # window 3: means 0.6, 0.6→(0.6+0.6+0.1)/3=0.433 ≥ 0.3, then (0.6+0.1+0.1)/3=0.267 < 0.3
    a = one(run(only("reward_collapse", 0.5, 3), rows_of("reward", [0.6, 0.6, 0.6, 0.1, 0.1])))
    assert (a.step, a.metric) == (5, "reward")
    assert a.value == pytest.approx(0.8 / 3) and a.threshold == pytest.approx(0.3)
    assert "best such mean 0.6" in a.message
    # down to 0.35: means 0.517, 0.433, 0.35, never below 0.3
    assert run(only("reward_collapse", 0.5, 3), rows_of("reward", [0.6] * 3 + [0.35] * 5)) == []


def test_reward_collapse_needs_a_best_above_zero():
    rows = rows_of("reward", [0.005] * 3 + [0.0] * 5)  # best 0.005: no collapse to speak of
    assert run(only("reward_collapse", 0.5, 3), rows) == []
    rows = rows_of("reward", [-0.2] * 3 + [-0.9] * 5)
    assert run(only("reward_collapse", 0.5, 3), rows) == []


def test_zero_variance_groups():
    # shares 15/16, 16/16, 15/16 from step 2: above 0.9 in each of steps 2-4
    rows = rows_of("equal_reward_groups", [1, 15, 16, 15])
    a = one(run(only("zero_variance_groups", 0.9, 3), rows))
    assert (a.step, a.metric, a.value, a.threshold) == (
        4,
        "equal_reward_groups/groups",
        15 / 16,
        0.9,
    )
    rows = rows_of("equal_reward_groups", [15, 14, 16, 15])  # 14/16 = 0.875 breaks the run
    assert run(only("zero_variance_groups", 0.9, 3), rows) == []


def test_entropy_collapse():
    a = one(run(only("entropy_collapse", 0.05, 3), rows_of("entropy", [1.0, 0.04, 0.03, 0.045])))
    assert (a.step, a.metric, a.value, a.threshold) == (4, "entropy", 0.045, 0.05)
    assert a.message == "entropy below 0.05 in each of the last 3 steps (highest 0.045)"
    assert (
        run(only("entropy_collapse", 0.05, 3), rows_of("entropy", [0.04, 0.06, 0.03, 0.04])) == []
    )


def test_length_blowup():
    # median of 20, 30, 25 is 25; 2 × 25 = 50
    a = one(run(only("length_blowup", 2, 3), rows_of("completion_len", [20, 30, 25, 61])))
    assert (a.step, a.metric, a.value, a.threshold) == (4, "completion_len", 61, 50)
    assert run(only("length_blowup", 2, 3), rows_of("completion_len", [20, 30, 25, 50])) == []


def test_truncation():
    a = one(run(only("truncation", 0.5, 3), rows_of("truncated_fraction", [0.6, 0.7, 0.55])))
    assert (a.step, a.metric, a.value, a.threshold) == (3, "truncated_fraction", 0.55, 0.5)
    # exactly 0.5 is not more than 0.5
    assert run(only("truncation", 0.5, 3), rows_of("truncated_fraction", [0.6, 0.5, 0.7])) == []


def test_clip_fraction():
    a = one(run(only("clip_fraction", 0.3, 3), rows_of("clip_fraction", [0.1, 0.4, 0.35, 0.5])))
    assert (a.step, a.metric, a.value, a.threshold) == (4, "clip_fraction", 0.35, 0.3)
    assert run(only("clip_fraction", 0.3, 3), rows_of("clip_fraction", [0.4, 0.29, 0.5])) == []


def test_clip_fraction_run_is_not_broken_by_a_step_without_an_update():
    rows = [healthy(1, clip_fraction=0.4), healthy(2, **NO_UPDATE)]
    rows += [healthy(3, clip_fraction=0.4), healthy(4, clip_fraction=0.4)]
    assert one(run(only("clip_fraction", 0.3, 3), rows)).step == 4


def test_grad_norm_spike():
    # median of 1, 2, 1.5 is 1.5; 10 × 1.5 = 15
    a = one(run(only("grad_norm_spike", 10, 3), rows_of("grad_norm", [1, 2, 1.5, 16])))
    assert (a.step, a.metric, a.value, a.threshold) == (4, "grad_norm", 16, 15)
    assert run(only("grad_norm_spike", 10, 3), rows_of("grad_norm", [1, 2, 1.5, 14])) == []


def test_member_reward_drift():
    # first 3: mean 0.8; steps 4-6: (0.5 + 0.4 + 0.4) / 3 = 0.433, 0.367 below
    rows = rows_of("member/strong/reward", [0.8, 0.8, 0.8, 0.5, 0.4, 0.4])
    a = one(run(only("member_reward_drift", 0.3, 3), rows))
    assert (a.step, a.rule, a.metric) == (6, "member_reward_drift", "member/strong/reward")
    assert a.value == pytest.approx(1.3 / 3 - 0.8) and a.threshold == 0.3
    assert "below its mean 0.8 over the first 3" in a.message
    rows = rows_of("member/strong/reward", [0.8] * 3 + [0.6] * 5)  # 0.2 below
    assert run(only("member_reward_drift", 0.3, 3), rows) == []
    # 0.5 - 0.8 is -0.30000000000000004 in floats: exactly the threshold, not more
    rows = rows_of("member/strong/reward", [0.8] * 3 + [0.5] * 5)
    assert run(only("member_reward_drift", 0.3, 3), rows) == []


def test_member_reward_drift_upward_and_only_for_peers():
    rows = rows_of("member/strong/reward", [0.2] * 3 + [0.6] * 3)
    a = one(run(only("member_reward_drift", 0.3, 3), rows))
    assert (a.step, a.value) == (6, pytest.approx(0.4))
    # the policy trains: its reward is meant to move
    rows = rows_of("member/policy/reward", [0.1] * 3 + [0.9] * 3)
    assert run(only("member_reward_drift", 0.3, 3), rows) == []
    # members=None: the peers are found in the rows
    rows = rows_of("member/weak/reward", [0.2] * 3 + [0.6] * 3)
    assert one(run(only("member_reward_drift", 0.3, 3), rows, members=None)).metric == (
        "member/weak/reward"
    )


def test_member_reward_drift_counts_only_steps_the_peer_sampled():
    # steps 2 and 4 without the peer: its 6th reward comes at step 8
    values = [0.8, None, 0.8, None, 0.8, 0.4, 0.4, 0.4]
    rows = [healthy(i, **{"member/strong/reward": v}) for i, v in enumerate(values, start=1)]
    assert "member/strong/reward" not in rows[1]
    assert one(run(only("member_reward_drift", 0.3, 3), rows)).step == 8


def test_scorer_failures():
    lost = {"skipped_groups": 1, "scorer_faults/judge": 2, "member/strong/generator_faults": 1}
    a = one(run(only("scorer_failures", 0, 1), [healthy(1), healthy(2), healthy(3, **lost)]))
    assert (a.step, a.metric, a.value, a.threshold) == (3, "faults", 4, 0)
    assert a.message == (
        "4 failures in the last step: member/strong/generator_faults 1, scorer_faults/judge 2, "
        "skipped_groups 1 (threshold 0)"
    )
    assert run(only("scorer_failures", 0, 1), [healthy(i) for i in range(1, 6)]) == []


def test_scorer_failures_over_a_window():
    # more than 5 over the last 3 steps: 2 + 2 + 2 = 6; 2 + 0 + 2 = 4 is not
    rows = rows_of("skipped_groups", [2, 2, 2])
    assert one(run(only("scorer_failures", 5, 3), rows)).value == 6
    assert run(only("scorer_failures", 5, 3), rows_of("skipped_groups", [2, 0, 2, 0, 2])) == []


# -- re-arming, actions, switches ----------------------------------------------------------


def test_a_lasting_condition_fires_once_and_rearms_when_it_clears():
    # above 0.3 from step 3: fires at step 5 (3 in a row), holds to 7, clears at 8, fires
    # again at 11 once 9-11 are above again
    values = [0.1, 0.1, 0.4, 0.4, 0.4, 0.4, 0.4, 0.1, 0.4, 0.4, 0.4, 0.4]
    fired = run(only("clip_fraction", 0.3, 3), rows_of("clip_fraction", values))
    assert [a.step for a in fired] == [5, 11]


def test_scorer_failures_rearm_after_a_clean_step():
    values = [0, 1, 1, 1, 0, 2, 0, 0, 3]
    fired = run(only("scorer_failures", 0, 1), rows_of("skipped_groups", values))
    assert [(a.step, a.value) for a in fired] == [(2, 1), (6, 2), (9, 3)]


def test_a_spike_level_that_lasts_rearms_once_the_median_catches_up():
    # 0.1 from step 4: steps 4 and 5 are above 5 × 0.01 (one alert); from step 6 the median
    # is 0.1 and the condition has cleared; a second jump fires again
    values = [0.01, 0.01, 0.01, 0.1, 0.1, 0.1, 0.1, 0.1, 1.0]
    fired = run(only("kl_spike", 5, 3), rows_of("kl", values))
    assert [a.step for a in fired] == [4, 9]


def test_drift_rearms_per_peer():
    rows = [
        healthy(i, **{"member/strong/reward": s, "member/weak/reward": w})
        for i, (s, w) in enumerate([(0.8, 0.2)] * 3 + [(0.2, 0.2)] * 3 + [(0.2, 0.8)] * 3, 1)
    ]
    # strong: 0.8 → 0.2 over steps 4-6, fires at 6 (and stays drifted); weak: 0.2, then at
    # step 8 its last 3 are 0.2, 0.8, 0.8, mean 0.6: 0.4 above
    fired = run(only("member_reward_drift", 0.3, 3), rows, members=[POLICY, "strong", "weak"])
    assert [(a.step, a.metric) for a in fired] == [
        (6, "member/strong/reward"),
        (8, "member/weak/reward"),
    ]


def test_action_and_row():
    a = one(run(only("grad_norm_spike", 10, 3, action="stop"), rows_of("grad_norm", [1, 1, 1, 50])))
    row = a.row()
    assert row == {
        "step": 4,
        "rule": "grad_norm_spike",
        "metric": "grad_norm",
        "value": 50.0,
        "threshold": 10.0,
        "action": "stop",
        "message": "grad_norm 50 is 50× its median 1 over the last 3 steps (threshold 10×)",
    }
    assert json.loads(json.dumps(row)) == row
    with pytest.raises(AttributeError):
        a.step = 5  # frozen


def test_disabled_rule_is_off():
    cfg = AlertsConfig(nonfinite={"threshold": 0.5, "window": 1, "enabled": False})
    rows = [healthy(1), healthy(2, **NO_UPDATE, nonfinite_update=1)]
    assert [a.rule for a in run(cfg, rows)] == []
    assert [a.rule for a in run(AlertsConfig(), rows)] == ["nonfinite"]


def test_the_defaults_are_quiet_on_a_calm_run():
    rows = []
    for i in range(1, 61):  # noisy but healthy numbers
        wiggle = 1 + 0.3 * math.sin(i)
        rows.append(
            healthy(
                i,
                kl=0.01 * wiggle,
                grad_norm=wiggle,
                completion_len=20 * wiggle,
                reward=0.4 + 0.005 * i,
                **{"member/strong/reward": 0.8 + 0.05 * math.cos(i)},
            )
        )
    assert run(AlertsConfig(), rows) == []
    assert Alerts().check(healthy(1)) == []  # no config: the defaults


def test_policy_name_is_the_trainers():
    from grpo_ensemble.types import POLICY as TRAINER_POLICY

    assert POLICY == TRAINER_POLICY


# -- resume ------------------------------------------------------------------------------


def _eventful() -> list[dict]:
    """40 steps that trip several rules, some for a while (so a resume can fall inside)."""
    rows = []
    for i in range(1, 41):
        change: dict = {
            "kl": 0.01 if i < 12 else 0.3,
            "clip_fraction": 0.4 if 15 <= i < 25 else 0.1,
        }
        if i in (7, 8, 30):
            change.update(NO_UPDATE, nonfinite_update=1)
            change["loss"] = math.nan
        if 18 <= i < 22 or i == 35:
            change["skipped_groups"] = 2
        if i >= 26:
            change["reward"] = 0.1
            change["member/strong/reward"] = 0.3
        rows.append(healthy(i, **change))
    return rows


def test_replay_gives_the_same_later_alerts_as_an_uninterrupted_run():
    rows = _eventful()
    members = [POLICY, "strong"]
    whole = run(AlertsConfig(), rows, members)
    assert {a.rule for a in whole} >= {
        "nonfinite",
        "kl_spike",
        "clip_fraction",
        "scorer_failures",
        "reward_collapse",
        "member_reward_drift",
    }
    for start in range(1, len(rows)):
        alerts = Alerts(AlertsConfig(), members=members)
        assert alerts.replay(rows[:start]) is None  # fires nothing
        later = [a for row in rows[start:] for a in alerts.check(row)]
        assert later == [a for a in whole if a.step > start], start


def test_replay_reads_metrics_jsonl_lines():
    # metrics.jsonl writes NaN and inf as null (rundir._clean): the same alerts after
    rows = _eventful()
    lines = [
        json.dumps(
            {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()}
        )
        + "\n"
        for r in rows
    ]
    whole = run(AlertsConfig(), rows)
    for start in (8, 20, 30):
        alerts = Alerts(AlertsConfig(), members=[POLICY, "strong"])
        alerts.replay(lines[:start] + ["\n"])
        later = [a for row in rows[start:] for a in alerts.check(row)]
        assert later == [a for a in whole if a.step > start]


# -- missing and odd values --------------------------------------------------------------


def _all_on() -> AlertsConfig:
    return AlertsConfig(**{name: {"threshold": 0.5, "window": 1} for name in RULES})


def test_missing_keys_never_crash():
    alerts = Alerts(_all_on(), members=[POLICY, "strong"])
    assert alerts.check({}) == []
    assert alerts.check({"step": 2}) == []
    full = healthy(3)
    for i, key in enumerate(full, start=4):  # each key missing in turn
        alerts.check({k: v for k, v in full.items() if k != key} | {"step": i})
    assert Alerts(_all_on(), members=None).check({"member/x/reward": None}) == []


@pytest.mark.parametrize("odd", [None, "abc", True, [], {}, math.nan, -math.inf])
def test_odd_values_are_not_history(odd):
    alerts = Alerts(_all_on(), members=[POLICY, "strong"])
    row = {k: odd for k in healthy(1) if k != "step" and k not in ("loss", "grad_norm")}
    for step in range(1, 5):
        assert alerts.check({**row, "step": step}) == []


# -- a bad alerts section of a recipe: one line, exit 2 ----------------------------------

GOOD = SMALL_RECIPE_TEXT


def _write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(text).format(out=tmp_path / "run"))
    return path


@pytest.mark.parametrize(
    "section, fragment",
    [
        ("alerts: {{nope: {{threshold: 1}}}}\n", "alerts.nope"),
        ("alerts: {{kl_spike: {{threshold: abc}}}}\n", "alerts.kl_spike.threshold"),
        ("alerts: {{kl_spike: {{threshold: 5, action: page}}}}\n", "alerts.kl_spike.action"),
        ("alerts: {{kl_spike: {{threshold: 5, window: 0}}}}\n", "alerts.kl_spike.window"),
        ("alerts: {{kl_spike: {{threshold: true}}}}\n", "alerts.kl_spike.threshold"),
    ],
    ids=["unknown-rule", "threshold-not-a-number", "unknown-action", "window-0", "bool"],
)
def test_bad_alerts_section_exit_2_one_line(tmp_path, capsys, section, fragment):
    assert main(["validate", str(_write(tmp_path, GOOD + section))]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err


def test_good_alerts_section_validates(tmp_path, capsys):
    section = (
        "alerts: {{kl_spike: {{threshold: 3, window: 5, action: stop}},"
        " truncation: {{enabled: false, threshold: 0.5}}}}\n"
    )
    assert main(["validate", str(_write(tmp_path, GOOD + section))]) == 0, capsys.readouterr().err
