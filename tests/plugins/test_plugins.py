"""Plugin discovery through real entry points, the registry, and the meta-tests on hooks."""

import importlib.metadata
import json
from pathlib import Path

import pytest

import grpo_ensemble
from grpo_ensemble import GroupEvaluator, RewardScorer, hookimpl, plugins, train
from grpo_ensemble.cli import main
from grpo_ensemble.errors import PluginError
from grpo_ensemble.plugins import hookspecs

ROOT = Path(__file__).resolve().parents[2]


def test_example_plugin_is_discovered_through_its_entry_point(monkeypatch, small_recipe):
    eps = importlib.metadata.entry_points(group="grpo_ensemble", name="digits")
    assert eps, "install plugins/grpo-ensemble-digits (README's test command does)"
    assert next(iter(eps)).dist.name == "grpo-ensemble-digits"
    monkeypatch.setenv("GRPO_ENSEMBLE_LOAD_PLUGINS", "digits")
    plugins.reset_plugin_manager()
    cls, plugin = plugins.components("reward_scorer")["digit_match"]
    assert plugin == "digits"
    recipe = small_recipe(
        rewards=[{"name": "exact_match"}, {"name": "digit_match", "weight": 0.5}],
        train__steps=1,
        eval__before=False,
        eval__after=False,
    )
    m = train(recipe).metrics[0]
    assert m["reward"] == pytest.approx(m["reward/exact_match"] + 0.5 * m["reward/digit_match"])
    assert 0 <= m["reward/digit_match"] <= 1


def test_example_plugin_scores_by_hand():
    from grpo_ensemble_digits import DigitMatch

    from grpo_ensemble import Candidate, Prompt, Sample

    p = Prompt("37+45=", {"answer": "82"})
    got = DigitMatch().score(
        [Sample(p, Candidate(t, [], "policy")) for t in ("82", "81", "182", "")]
    )
    assert got == [1.0, 0.5, 2 / 3, 0.0]


def test_plugins_command_lists_versions_and_components(monkeypatch, capsys):
    monkeypatch.setenv("GRPO_ENSEMBLE_LOAD_PLUGINS", "digits")
    plugins.reset_plugin_manager()
    assert main(["plugins", "--json"]) == 0
    infos = {i["name"]: i for i in json.loads(capsys.readouterr().out)}
    assert infos["digits"]["version"] == "0.1.0"
    assert infos["digits"]["components"] == {"reward_scorer": ["digit_match"]}
    assert infos["builtin-evaluators"]["components"]["group_evaluator"] == [
        "dr_grpo",
        "grpo",
        "rloo",
    ]
    assert main(["plugins"]) == 0
    assert "digit_match" in capsys.readouterr().out


def test_no_third_party_plugin_loads_when_disabled():
    # conftest sets GRPO_ENSEMBLE_LOAD_PLUGINS="" for the whole suite
    assert "digit_match" not in plugins.components("reward_scorer")
    assert {i.name for i in plugins.plugin_infos()} == set(plugins.DEFAULT_PLUGINS)


class Dup:
    class ExactMatch(RewardScorer):
        name = "exact_match"

    @hookimpl
    def register_reward_scorers(self, register):
        register(self.ExactMatch)


def test_duplicate_component_name_names_both_plugins():
    pm = plugins.get_plugin_manager()
    pm.register(Dup(), name="dup-plugin")
    with pytest.raises(PluginError) as info:
        plugins.components("reward_scorer")
    msg = str(info.value)
    assert "dup-plugin" in msg and "builtin-rewards" in msg and "'exact_match'" in msg


class Extra:
    class Half(GroupEvaluator):
        name = "half"

        def advantages(self, rewards, valid, stats):
            return (rewards * 0.5) * valid

    @hookimpl
    def register_group_evaluators(self, register):
        register(self.Half)

    @hookimpl
    def register_commands(self, app):
        @app.command()
        def hello(who: str = "world"):
            """Say hello."""
            print(f"hello {who}")


def test_registered_object_plugin_adds_components_and_commands(capsys):
    pm = plugins.get_plugin_manager()
    pm.register(Extra(), name="extra")
    assert plugins.get_component("group_evaluator", "half", "group.evaluator") is Extra.Half
    assert main(["hello", "--who", "tests"]) == 0
    assert "hello tests" in capsys.readouterr().out


def test_every_hook_is_documented_and_tested():
    docs = (ROOT / "docs" / "plugins.md").read_text()
    tests = "".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    names = [n for n in dir(hookspecs) if n.startswith(("register_", "on_"))]
    assert len(names) == 11
    for name in names:
        assert f"`{name}(" in docs, f"{name} has no section in docs/plugins.md"
        assert f"def {name}(" in tests, f"{name} has no test"
        assert getattr(hookspecs, name).__doc__, f"{name} has no docstring"


class OraclePlugin:
    """Registers a text-only generator that a recipe then names like any other."""

    class Oracle:
        name = "oracle"
        tokenizer = None

        def __init__(self, wrong: bool = False):
            self.wrong = wrong

        def generate(self, prompts, n, sampling):
            from grpo_ensemble import Candidate

            text = (lambda p: "0") if self.wrong else (lambda p: p.fields["answer"])
            return [[Candidate(text(p), [], "") for _ in range(n)] for p in prompts]

        def sync_weights(self, model):
            pass

    @hookimpl
    def register_generators(self, register):
        register(self.Oracle)


def test_registered_generator_is_used_by_name(small_recipe, capsys):
    pm = plugins.get_plugin_manager()
    pm.register(OraclePlugin(), name="oracle-plugin")
    recipe = small_recipe(
        peers=[{"name": "teacher", "generator": "oracle", "n": 2}],
        train__steps=1,
        eval__before=False,
        eval__after=False,
    )
    m = train(recipe).metrics[0]
    assert m["member/teacher/reward"] == 1.0 and m["member/teacher/candidates"] == 8
    # and `hf` without a model is a recipe error naming the field
    bad = small_recipe(peers=[{"name": "p", "n": 2}])
    from grpo_ensemble.errors import RecipeError
    from grpo_ensemble.trainer.build import build_peer_generator

    with pytest.raises(RecipeError, match=r"peers\.0\.model: 'hf' needs a model"):
        build_peer_generator("peers.0", bad.peers[0])


class FrozenPlugin:
    """A generator over a model that cannot take other weights (no sync_weights)."""

    class Frozen:
        name = "frozen"
        tokenizer = None

        def __init__(self, model):
            self.model = model

        def generate(self, prompts, n, sampling):
            raise NotImplementedError

    @hookimpl
    def register_generators(self, register):
        register(self.Frozen)


@pytest.mark.parametrize(
    "generator, why",
    [
        # the oracle takes no model: it cannot be handed the module being trained
        ("oracle", "its constructor takes no `model` (the module being trained is passed as "),
        ("frozen", "it has no sync_weights(model) method to take the trained weights after "),
    ],
)
def test_policy_generator_must_take_the_trained_weights(tmp_path, capsys, generator, why):
    pm = plugins.get_plugin_manager()
    pm.register(OraclePlugin(), name="oracle-plugin")
    pm.register(FrozenPlugin(), name="frozen-plugin")
    path = tmp_path / "r.yaml"
    path.write_text(f"policy:\n  model: builtin:tiny-arith-small\n  generator: {generator}\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    want = f"error: {path}:3: policy.generator: {generator!r} cannot sample for the policy: {why}"
    assert err.startswith(want) and err.count("\n") == 1


def _fake_distribution(root, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """An installed distribution `fakeplug` (a .dist-info folder on sys.path) declaring these
    grpo_ensemble entry points, with these modules beside it."""
    info = root / "fakeplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplug\nVersion: 0.1\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[grpo_ensemble]\n{lines}")
    for name, text in modules.items():
        (root / f"{name}.py").write_text(text)


RAISER = """
from grpo_ensemble import hookimpl

@hookimpl
def register_reward_scorers(register):
    raise RuntimeError("no API key")
"""

OBSERVER = """
from grpo_ensemble import hookimpl

@hookimpl
def on_step_end(step, metrics):
    raise ConnectionError("logger unreachable")
"""

SHADOW = """
from grpo_ensemble import RewardScorer, hookimpl

class Shadow(RewardScorer):
    name = "shadow"
    def score(self, samples):
        return [0.0] * len(samples)

@hookimpl
def register_reward_scorers(register):
    register(Shadow)
"""


def test_a_misbehaving_plugin_is_left_out_and_named_not_fatal(
    tmp_path, monkeypatch, capsys, small_recipe
):
    # one that does not import, one whose name another distribution (here: ours) has, one
    # whose hooks raise: every command still works, each is named once on stderr, and a
    # recipe naming a component they would have given is told why it is unknown
    _fake_distribution(
        tmp_path,
        {
            "broken": "fake_broken",
            "builtin-rewards": "fake_shadow",
            "raiser": "fake_raiser",
            "observer": "fake_observer",
        },
        {
            "fake_broken": "raise RuntimeError('needs an API key')\n",
            "fake_shadow": SHADOW,
            "fake_raiser": RAISER,
            "fake_observer": OBSERVER,
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("GRPO_ENSEMBLE_LOAD_PLUGINS", "broken,builtin-rewards,raiser,observer")
    plugins.reset_plugin_manager()
    try:
        from grpo_ensemble.trainer.loop import train

        recipe = Path(__file__).parents[2] / "recipes" / "quickstart.yaml"
        assert main(["validate", str(recipe)]) == 0
        err = capsys.readouterr().err
        assert (
            "warning: plugin 'broken' left out: entry point 'fake_broken' failed to load: "
            "RuntimeError: needs an API key" in err
        )
        assert (
            "warning: plugin 'builtin-rewards of fakeplug' left out: the name "
            "is taken by grpo-ensemble (built in)" in err
        )
        assert (
            "warning: plugin 'raiser' left out: its register_reward_scorers hook raised "
            "RuntimeError: no API key" in err
        )
        assert main(["validate", str(recipe), "--set", "rewards=[{name: shadow}]"]) == 2
        err = capsys.readouterr().err
        assert "unknown reward scorer 'shadow' (known: " in err
        assert "plugin 'broken' was left out: entry point 'fake_broken' failed" in err
        # an observer that raises: named once, the run goes on to its end
        result = train(small_recipe(train__steps=2, eval__before=False, eval__after=False))
        assert [m["step"] for m in result.metrics] == [1, 2]
        err = capsys.readouterr().err
        assert err.count("warning: plugin 'observer' left out: its on_step_end hook raised") == 1
    finally:
        monkeypatch.undo()
        plugins.reset_plugin_manager()


WRONG_ARGUMENT = """
from grpo_ensemble import hookimpl

@hookimpl
def on_step_end(step, stats):
    pass
"""

MISSPELT = """
from grpo_ensemble import hookimpl

@hookimpl
def register_group_evaluator(register):
    pass
"""


def test_a_hook_that_cannot_work_leaves_its_plugin_out(tmp_path, monkeypatch, capsys):
    # a wrong argument name (pluggy refused the whole manager: every command failed, --help
    # included) and a misspelt hook (accepted silently: never called): each plugin is left
    # out with one line naming the hook and the fix; the commands work; plugins --json lists
    # them with their error
    _fake_distribution(
        tmp_path,
        {"wrongarg": "fake_wrongarg", "misspelt": "fake_misspelt"},
        {"fake_wrongarg": WRONG_ARGUMENT, "fake_misspelt": MISSPELT},
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("GRPO_ENSEMBLE_LOAD_PLUGINS", "wrongarg,misspelt,nosuch")
    plugins.reset_plugin_manager()
    try:
        assert main(["--help"]) == 0
        err = capsys.readouterr().err
        assert main(["plugins", "--json"]) == 0
        out, more = capsys.readouterr()
        err += more
        lines = [x for x in err.splitlines() if x.startswith("warning:")]
        assert (
            "warning: plugin 'wrongarg' left out: its hook on_step_end(step, stats) asks for "
            "'stats', which the hook does not pass: write it as on_step_end(step, metrics, "
            "context) (any of these arguments, by these names)"
        ) in lines
        assert (
            "warning: plugin 'misspelt' left out: its hook 'register_group_evaluator' is no "
            "hook of grpo-ensemble: did you mean 'register_group_evaluators'?"
        ) in lines
        assert any(
            x.startswith("warning: plugin 'nosuch' left out: GRPO_ENSEMBLE_LOAD_PLUGINS names it")
            for x in lines
        )
        listed = {p["name"]: p for p in json.loads(out)}
        assert listed["wrongarg"]["left_out"].startswith("its hook on_step_end(step, stats)")
        assert listed["misspelt"]["distribution"] == "fakeplug"
        assert listed["builtin-rewards"]["left_out"] is None
        assert listed["builtin-rewards"]["distribution"] == "grpo-ensemble"
    finally:
        plugins.reset_plugin_manager()


def test_an_unknown_component_names_the_plugins_the_variable_kept_out(
    tmp_path, monkeypatch, capsys
):
    _fake_distribution(tmp_path, {"shadow": "fake_shadow"}, {"fake_shadow": SHADOW})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("GRPO_ENSEMBLE_LOAD_PLUGINS", "")
    plugins.reset_plugin_manager()
    try:
        recipe = Path(__file__).parents[2] / "recipes" / "quickstart.yaml"
        assert main(["validate", str(recipe), "--set", "rewards=[{name: shadow}]"]) == 2
        err = capsys.readouterr().err
        assert "unknown reward scorer 'shadow'" in err
        assert "installed but not loaded (GRPO_ENSEMBLE_LOAD_PLUGINS): " in err
        assert "shadow" in err.split("installed but not loaded")[1]
    finally:
        plugins.reset_plugin_manager()


def test_plugins_shows_each_components_parameters(capsys):
    assert main(["plugins", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    rewards = listed["builtin-rewards"]["details"]
    assert rewards["numeric_match"] == {
        "kind": "reward_scorer",
        "doc": "1.0 when the last number in the completion equals the numeric answer within "
        "`tolerance`.",
        "params": [
            {"name": "field", "type": "str", "default": "'answer'"},
            {"name": "tolerance", "type": "float", "default": "1e-06"},
        ],
    }
    assert listed["builtin-evaluators"]["details"]["rloo"]["params"] == []
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    # the table folds long cells: the parameter's name and type are there, maybe wrapped
    assert "numeric_match" in out and "tolerance" in out and "float" in out


def test_every_public_data_type_is_documented():
    docs = (ROOT / "docs" / "plugins.md").read_text()
    for name in ("Prompt", "Candidate", "Sample", "SamplingParams", "Group", "RunContext"):
        assert f"### `{name}`" in docs or f"`{name}` and" in docs, f"{name}: no section"
        cls = getattr(grpo_ensemble, name)
        fields = getattr(cls, "__dataclass_fields__", {})
        for field in fields:  # each field of a data type is named in its section
            assert f"`{field}`" in docs, f"{name}.{field} is not in docs/plugins.md"


def test_a_component_may_declare_a_pydantic_model_for_its_params(tmp_path, capsys):
    from pydantic import BaseModel, Field

    class Banded(RewardScorer):
        """1.0 inside [low, high]."""

        name = "banded"

        class Params(BaseModel):
            low: float = 0.0
            high: float = Field(1.0, le=100)

        def __init__(self, low: float = 0.0, high: float = 1.0):
            self.low, self.high = low, high

        def score(self, samples):
            return [1.0 for _ in samples]

    class Plugin:
        @hookimpl
        def register_reward_scorers(self, register):
            register(Banded)

    plugins.get_plugin_manager().register(Plugin(), name="banded")
    path = tmp_path / "r.yaml"
    path.write_text(
        "policy:\n  model: builtin:tiny-arith-small\n"
        "rewards:\n  - name: banded\n    params:\n      high: 500\n"
    )
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:6: rewards.0.params.high: Input should be less than")
