"""`grpo-ensemble new-plugin NAME`: a ready plugin package, its test passing as generated.

The package holds a pyproject with the `grpo_ensemble` entry point, one component of the
chosen kind, a test that uses `grpo_ensemble.testing` (contract checks and two real steps
on the built-in tiny models, the plugin registered without being installed) and a README.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import UserError

KINDS = ("reward", "evaluator", "generator", "tracker")

_REWARD = '''
from grpo_ensemble import RewardScorer, hookimpl


class {cls}(RewardScorer):
    """1.0 when the completion, stripped, equals the row's `field` (e.g. its answer)."""

    name = "{name}"

    def __init__(self, field: str = "answer"):
        self.field = field

    def score(self, samples):
        return [float(s.completion.strip() == str(s.row.get(self.field, ""))) for s in samples]


@hookimpl
def register_reward_scorers(register):
    register({cls})
'''

_EVALUATOR = '''
import torch

from grpo_ensemble import GroupEvaluator, hookimpl


class {cls}(GroupEvaluator):
    """r − the mean reward of the group's statistics candidates (as dr_grpo)."""

    name = "{name}"

    def advantages(self, rewards, valid, stats):
        w = stats.to(rewards.dtype)
        mean = (rewards * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1)
        return torch.where(valid, rewards - mean, torch.zeros_like(rewards))


@hookimpl
def register_group_evaluators(register):
    register({cls})
'''

_GENERATOR = '''
from grpo_ensemble import Candidate, Generator, hookimpl


class {cls}(Generator):
    """A text-only peer that answers each prompt with its row's `answer` (an oracle): the
    ensemble re-tokenizes its text for the policy."""

    name = "{name}"
    tokenizer = None

    def generate(self, prompts, n, sampling):
        answers = [str(p.fields.get("answer", "")) for p in prompts]
        return [[Candidate(a, [], "") for _ in range(n)] for a in answers]


@hookimpl
def register_generators(register):
    register({cls})
'''

_TRACKER = '''
from pathlib import Path

from grpo_ensemble import Tracker, hookimpl


class {cls}(Tracker):
    """Appends each step's reward to `<run_dir>/{name}.txt`."""

    name = "{name}"

    def on_run_start(self, run_dir, recipe):
        self.path = Path(run_dir) / "{name}.txt"
        self.path.write_text("")

    def on_step_end(self, step, metrics):
        with open(self.path, "a") as fh:
            fh.write(f"{{step}} {{metrics.get('reward')}}\\n")


@hookimpl
def register_trackers(register):
    register({cls})
'''

_TESTS = {
    "reward": """
def test_the_contract():
    scores = check_scorer(plugin.{cls}())
    assert scores[0] == 1.0 and scores[1] == 0.0  # "42" is the answer, "41" is not


def test_two_steps(tmp_path):
    result = run_steps(tmp_path, plugins=[plugin], rewards=[{{"name": "{name}"}}])
    assert [m["step"] for m in result.metrics] == [1, 2]
""",
    "evaluator": """
def test_the_contract():
    check_evaluator(plugin.{cls}())


def test_two_steps(tmp_path):
    result = run_steps(tmp_path, plugins=[plugin], group={{"evaluator": "{name}"}})
    assert [m["step"] for m in result.metrics] == [1, 2]
""",
    "generator": """
def test_the_contract():
    out = check_generator(plugin.{cls}())
    assert out[0][0].text == "42"


def test_two_steps(tmp_path):
    peer = {{"name": "oracle", "generator": "{name}", "n": 2}}
    result = run_steps(tmp_path, plugins=[plugin], peers=[peer])
    assert all(m["member/oracle/reward"] == 1.0 for m in result.metrics)
""",
    "tracker": """
def test_two_steps(tmp_path):
    result = run_steps(tmp_path, plugins=[plugin], log={{"report_to": ["{name}"]}})
    lines = (result.run_dir / "{name}.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["1", "2"]
""",
}


def new_plugin(name: str, kind: str, where: Path) -> Path:
    """Write the package `grpo-ensemble-NAME` under `where`; returns its folder."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise UserError(
            f"new-plugin: {name!r} is no plugin name: lowercase letters, digits and _, "
            "starting with a letter (it names the component in recipes)"
        )
    if kind not in KINDS:
        raise UserError(f"new-plugin: --kind {kind!r}: give one of {', '.join(KINDS)}")
    root = Path(where) / f"grpo-ensemble-{name.replace('_', '-')}"
    if root.exists():
        raise UserError(f"new-plugin: {str(root)!r} exists; choose another name or --dir")
    package = f"grpo_ensemble_{name}"
    cls = "".join(p.capitalize() for p in name.split("_")) + kind.capitalize()
    body = {"reward": _REWARD, "evaluator": _EVALUATOR, "generator": _GENERATOR}
    body["tracker"] = _TRACKER
    files = {
        "pyproject.toml": _pyproject(name, package, kind),
        f"src/{package}/__init__.py": f'"""The {name} plugin of grpo-ensemble."""\n',
        f"src/{package}/plugin.py": f'"""The {name} {kind} (registered through the '
        f'grpo_ensemble entry point)."""\n' + body[kind].format(cls=cls, name=name),
        "tests/test_plugin.py": _test_header(package, kind)
        + _TESTS[kind].format(cls=cls, name=name),
        "README.md": _readme(name, kind, package),
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.lstrip("\n"))
    return root


def _pyproject(name: str, package: str, kind: str) -> str:
    return f'''[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "grpo-ensemble-{name.replace("_", "-")}"
version = "0.1.0"
description = "A {kind} plugin for grpo-ensemble"
requires-python = ">=3.11"
dependencies = ["grpo-ensemble"]

[project.optional-dependencies]
test = ["pytest>=8.0"]

[project.entry-points.grpo_ensemble]
{name} = "{package}.plugin"

[tool.setuptools.packages.find]
where = ["src"]
'''


def _test_header(package: str, kind: str) -> str:
    checks = {"reward": "check_scorer", "evaluator": "check_evaluator"}
    checks["generator"] = "check_generator"
    names = ", ".join(x for x in (checks.get(kind), "run_steps") if x)
    return f'''"""The plugin's own tests: contract checks and two real steps on the built-in tiny
models (grpo_ensemble.testing), the plugin registered without being installed."""

from grpo_ensemble.testing import {names}

import {package}.plugin as plugin
'''


def _readme(name: str, kind: str, package: str) -> str:
    return f"""# grpo-ensemble-{name.replace("_", "-")}

A {kind} plugin for grpo-ensemble, registered as `{name}` through the `grpo_ensemble` entry
point in `pyproject.toml`; the component is in `src/{package}/plugin.py`.

```bash
pip install -e '.[test]'
python -m pytest
grpo-ensemble plugins        # lists `{name}`
```

See grpo-ensemble's docs/plugins.md for the contract of each kind of component.
"""
