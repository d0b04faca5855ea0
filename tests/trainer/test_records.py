"""What a run keeps beside metrics.jsonl and whom it tells: eval.json, completions.jsonl,
alerts.jsonl, summary.json, best/, the observer hooks, the console's lines and exit code 3."""

import io
import json
import re

import pytest
import yaml
from helpers import write_recipe
from rich.console import Console

from grpo_ensemble import hookimpl, train
from grpo_ensemble.cli import main
from grpo_ensemble.errors import AlertStopped, UserError
from grpo_ensemble.plugins.registry import get_plugin_manager
from grpo_ensemble.recipe.schema import LogConfig
from grpo_ensemble.rundir import StepProgress
from grpo_ensemble.trainer.evaluation import accuracy_of


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _sum_of(prompt: str) -> str:
    a, b = prompt.rstrip("=").split("+")
    return str(int(a) + int(b))


def test_accuracy_mean_reward_and_pass_at_k_by_hand():
    res = accuracy_of([1.0, 0.0, 0.75, 0.25], any_solved=[True, True, False, False], k=4)
    assert (res.accuracy, res.n, res.mean_reward, res.pass_at_k) == (0.5, 4, 0.5, 0.5)
    row = res.row(7, "during")
    assert row["pass@4"] == 0.5 and row["step"] == 7 and row["when"] == "during"
    assert "pass@1" not in accuracy_of([1.0]).row(0, "before")


class Recorder:
    """An observer plugin: every hook's call, in order."""

    def __init__(self):
        self.calls = []
        self.contexts = []

    @hookimpl
    def on_run_start(self, run_dir, recipe):
        self.calls.append(("start", recipe["train"]["steps"]))

    @hookimpl
    def on_step_end(self, step, metrics, context):
        self.calls.append(("step", step))
        self.contexts.append(context)

    @hookimpl
    def on_eval(self, step, results):
        self.calls.append(("eval", step, results["when"]))

    @hookimpl
    def on_completions(self, step, rows):
        self.calls.append(("completions", step, len(rows)))

    @hookimpl
    def on_alert(self, alert):
        self.calls.append(("alert", alert["step"], alert["rule"]))

    @hookimpl
    def on_run_end(self, run_dir, summary):
        self.calls.append(("end", summary["status"]))


@pytest.fixture
def recorder():
    rec = Recorder()
    get_plugin_manager().register(rec, name="recorder")
    yield rec
    get_plugin_manager().unregister(name="recorder")


def test_a_run_keeps_its_evaluations_completions_and_summary(small_recipe, recorder):
    recipe = small_recipe(
        train__steps=4,
        eval__every=2,
        eval__k=3,
        eval__keep_best=True,
        log__completions={"every": 2, "prompts": 2, "per_member": 2},
    )
    result = train(recipe)
    run = result.run_dir
    evals = json.loads((run / "eval.json").read_text())
    assert [(r["step"], r["when"]) for r in evals] == [(0, "before"), (2, "during"), (4, "after")]
    for r in evals:
        assert r["n"] == 16 and "pass@3" in r and 0 <= r["pass@3"] <= 1
    assert evals[0]["accuracy"] == result.before.accuracy
    assert evals[2]["accuracy"] == result.after.accuracy
    # the only evaluation during training is the best so far
    assert json.loads((run / "best" / "best.json").read_text()) == evals[1]
    assert (run / "best" / "model.safetensors").is_file()
    # completions: steps 2 and 4, 2 prompts × (2 policy + 2 peer), each group whole, so its
    # rewards and advantages can be recomputed here
    rows = _rows(run / "completions.jsonl")
    assert [r["step"] for r in rows] == [2] * 8 + [4] * 8
    for i in range(0, len(rows), 4):
        group = rows[i : i + 4]
        assert [r["member"] for r in group] == ["policy", "policy", "strong", "strong"]
        assert [r["injected"] for r in group] == [False, False, True, True]
        rewards = []
        for r in group:
            text = r["completion"].strip()
            want = 1.0 if text == _sum_of(r["prompt"]) else 0.0
            assert r["rewards"] == {"exact_match": want} and r["reward"] == want
            rewards.append(want)
        mean = sum(rewards) / 4
        std = (sum((x - mean) ** 2 for x in rewards) / 3) ** 0.5
        for r, x in zip(group, rewards, strict=True):
            want = 0.0 if std == 0 else (x - mean) / (std + 1e-4)
            assert r["advantage"] == pytest.approx(want, abs=1e-6)
    assert (run / "alerts.jsonl").read_text() == ""  # created empty: nothing fired
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 4
    assert summary["before"] == evals[0] and summary["after"] == evals[2]
    assert summary["change"] == pytest.approx(evals[2]["accuracy"] - evals[0]["accuracy"])
    assert recorder.calls == [
        ("start", 4),
        ("eval", 0, "before"),
        ("step", 1),
        ("completions", 2, 8),
        ("step", 2),
        ("eval", 2, "during"),
        ("step", 3),
        ("completions", 4, 8),
        ("step", 4),
        ("eval", 4, "after"),
        ("end", "completed"),
    ]


def _stopping_recipe(tmp_path, action):
    # entropy is far below 100 at every step: the rule fires at step 1
    return write_recipe(
        tmp_path / "recipe.yaml",
        output_dir=str(tmp_path / "run"),
        train={"steps": 3, "checkpoint_every": 0},
        eval={"before": False, "after": False},
        alerts={"entropy_collapse": {"threshold": 100.0, "window": 1, "action": action}},
    )


def test_an_alert_that_stops_the_run(tmp_path, capsys, recorder):
    recipe = _stopping_recipe(tmp_path, "stop")
    assert main(["train", str(recipe)]) == AlertStopped.EXIT_CODE == 3
    out, err = capsys.readouterr()
    run = tmp_path / "run"
    alerts = _rows(run / "alerts.jsonl")
    assert [(a["step"], a["rule"], a["action"]) for a in alerts] == [
        (1, "entropy_collapse", "stop")
    ]
    assert alerts[0]["threshold"] == 100.0 and alerts[0]["value"] < 100.0
    assert re.search(r"^alert: .*\(step 1: stop\)$", out, re.M)
    line = err.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert line.startswith("stopped by the alert entropy_collapse after step 1")
    assert "--resume auto" in line  # a checkpoint to continue from
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000001"]
    assert json.loads((run / "summary.json").read_text())["status"] == "stopped"
    assert ("end", "stopped") in recorder.calls
    # resumed with the rule off: the run completes; the alert row of step 1 is kept
    data = yaml.safe_load(recipe.read_text())
    data["alerts"]["entropy_collapse"]["enabled"] = False
    recipe.write_text(yaml.safe_dump(data))
    assert main(["train", str(recipe), "--resume", "auto"]) == 0
    assert [a["step"] for a in _rows(run / "alerts.jsonl")] == [1]
    assert [r["step"] for r in _rows(run / "metrics.jsonl")] == [1, 2, 3]
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


def test_an_alert_that_asks_for_a_checkpoint(tmp_path):
    recipe = _stopping_recipe(tmp_path, "checkpoint")
    assert main(["train", str(recipe), "--set", "train.keep_checkpoints=5"]) == 0
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    # the rule fires once (at step 1) and re-arms only when entropy recovers: one checkpoint
    # for it; the last step has none either (checkpoint_every 0)
    fired = [a["step"] for a in _rows(tmp_path / "run" / "alerts.jsonl")]
    assert names == [f"step-{s:08d}" for s in fired] and fired[0] == 1


def test_progress_lines_when_the_output_is_not_a_terminal():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    progress = StepProgress(3, LogConfig(line_every_s=3600), True, console)
    for step in (1, 2, 3):
        metrics = {"step": step, "reward": 0.25 * step, "kl": 0.01}
        metrics |= {"member/policy/reward": 0.1, "member/strong/reward": 0.5}
        progress.update(metrics, "kl_spike" if step == 2 else None)
    progress.close()
    lines = out.getvalue().splitlines()
    # the first and the last step (the interval is an hour); the latest alert is shown
    assert [x.split(" reward")[0] for x in lines] == ["step 1/3", "step 3/3"]
    assert lines[0].startswith("step 1/3 reward 0.250 (policy 0.100, strong 0.500) kl 0.0100")
    assert "| alert: kl_spike" in lines[1]


def test_keep_best_needs_eval_every(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", eval={"keep_best": True})
    assert main(["validate", str(recipe)]) == 2
    assert "eval.keep_best: needs eval.every" in capsys.readouterr().err


def test_observer_hooks_are_plugin_hooks():
    names = {"on_run_start", "on_step_end", "on_eval", "on_completions", "on_alert", "on_run_end"}
    assert names <= set(dir(get_plugin_manager().hook))


def test_observers_get_the_run_context(small_recipe, recorder):
    result = train(small_recipe(train__steps=2, eval__before=False, eval__after=False))
    first, second = recorder.contexts
    assert (first.step, second.step) == (1, 2)
    assert (first.rank, first.world_size) == (0, 1)
    assert first.run_dir == result.run_dir
    assert first.recipe["train"]["steps"] == 2 and first.recipe["peers"][0]["name"] == "strong"
    with pytest.raises(TypeError):  # read-only: an observer cannot change the run's recipe
        first.recipe["train"]["steps"] = 5
    with pytest.raises(AttributeError):
        first.step = 3


def test_a_step_whose_groups_were_all_skipped_has_no_reward(small_recipe):
    calls = []

    def refuses(prompts, completions, **kw):
        calls.append(len(completions))
        if len(calls) > 1:  # the start-up probe of the function passes; the run's calls fail
            raise RuntimeError("the judge is down")
        return [0.0] * len(completions)

    recipe = small_recipe(train__steps=2, eval__before=False, eval__after=False)
    result = train(recipe, reward_scorers=[(refuses, 1.0, {"on_error": "skip_group"})])
    for m in result.metrics:
        # absent, not 0.0 (a step of wrong answers); the skipped groups are counted
        assert "reward" not in m and "reward_std" not in m and "reward/refuses" not in m
        assert m["skipped_groups"] == 4 and m["skipped_update"] == 1


class OnlyForThisRun:
    def __init__(self):
        self.steps = []

    @hookimpl
    def on_step_end(self, step):
        self.steps.append(step)


def test_plugins_and_the_eval_scorer_as_objects_of_one_run(small_recipe):
    # registered for the run only, no entry point; the evaluation judged by a function
    observer = OnlyForThisRun()
    judged = []

    def judge(prompts, completions, answer, **kw):
        judged.extend(completions)
        return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer, strict=True)]

    recipe = small_recipe(train__steps=2, eval__before=False, eval__max_prompts=8)
    result = train(recipe, plugins=[observer], eval_scorer=judge)
    assert observer.steps == [1, 2]
    assert len(judged) == 8 and result.after.n == 8
    assert get_plugin_manager().get_plugin("plugins[0] OnlyForThisRun") is None  # gone after


def test_a_given_plugin_whose_hook_cannot_work_is_refused(small_recipe):
    class Wrong:
        @hookimpl
        def on_step_end(self, step, stats):
            pass

    with pytest.raises(UserError, match=r"plugins\[0\]: its hook on_step_end\(step, stats\)"):
        train(small_recipe(train__steps=1), plugins=[Wrong()])
