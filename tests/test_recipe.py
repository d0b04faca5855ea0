"""Recipe loading, overrides, and every kind of bad input: exit code 2, one line, no traceback."""

import textwrap
from pathlib import Path

import pytest
import yaml
from helpers import SMALL_RECIPE_TEXT

from grpo_ensemble.cli import main
from grpo_ensemble.errors import RecipeError
from grpo_ensemble.recipe import load_recipe

GOOD = SMALL_RECIPE_TEXT


def _write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).format(out=tmp_path / "run"))
    return path


def test_defaults_and_overrides(tmp_path):
    path = _write(tmp_path, GOOD)
    r = load_recipe(path, ["train.steps=3", "seed=7", "output_dir=runs/x", "loss.beta=0.05"])
    assert (r.train.steps, r.seed, r.output_dir, r.loss.beta) == (3, 7, "runs/x", 0.05)
    assert r.group.evaluator == "grpo" and r.rewards[0].name == "exact_match"
    r2 = load_recipe(path, ["peers=[{name: s, model: builtin:tiny-arith-base, n: 3}]"])
    assert r2.peers[0].n == 3 and r2.group_size == 5


def test_every_field_has_a_description():
    from pydantic import BaseModel

    from grpo_ensemble import recipe as rmod

    for cls in vars(rmod).values():
        if isinstance(cls, type) and issubclass(cls, BaseModel) and cls is not BaseModel:
            for name, f in cls.model_fields.items():
                assert f.description, f"{cls.__name__}.{name} has no description"


BAD = [
    # (recipe text or edit, override, expected fragment of the one-line message)
    (GOOD + "unknown_key: 1\n", None, "unknown_key: unknown key"),
    (GOOD, "train.steps=many", "train.steps"),
    (GOOD, "train.lr=-1", "train.lr"),
    (GOOD, "train.micro_batch_tokens=0", "train.micro_batch_tokens"),
    (GOOD, "policy.n=1", "policy.n: a group needs at least 2"),
    (GOOD, "loss.aggregation=median", "loss.aggregation"),
    (GOOD, "train.zero_stage=4", "train.zero_stage"),
    (GOOD, "policy.model=./no/such/model", "policy.model: model path './no/such/model' does not"),
    (GOOD, "rewards=[{name: no_such_scorer}]", "rewards.0.name: unknown reward scorer"),
    (GOOD, "group.evaluator=nope", "group.evaluator: unknown group evaluator 'nope'"),
    (GOOD, "policy.generator=nope", "policy.generator: unknown generator"),
    (GOOD, "data.train=/no/prompts.jsonl", "data.train: prompt file '/no/prompts.jsonl'"),
    (GOOD, "data.train=builtin:nope/train", "data.train: unknown built-in task"),
    (GOOD, "policy.model=builtin:nope", "policy.model: unknown built-in model"),
    (GOOD, "rewards=[{name: regex_format, params: {}}]", "rewards.0.params"),
    (GOOD, "peers=[{name: policy, model: builtin:tiny-arith-base}]", "peers.0.name"),
    ("policy: [1, 2\n", None, "invalid YAML"),
    ("- 1\n- 2\n", None, "a recipe must be a YAML mapping"),
    (GOOD, "nokey", "expected key.path=value"),
    (GOOD, "train.steps=0", "error: --set: train.steps: Input should be greater than"),
    (GOOD, "group.params={eps: abc}", "--set: group.params.eps: 'abc' does not fit float"),
    (GOOD, "group.params={nope: 1}", "group.params: got an unexpected keyword argument 'nope'"),
    (GOOD, "eval.scorer=nope", "eval.scorer: unknown reward scorer 'nope'"),
    (GOOD, "eval.scorer=regex_format", "eval.params: missing a required argument: 'pattern'"),
    (GOOD, "peers=[{name: s, n: 2}]", "peers.0.model: 'hf' needs a model"),
    (GOOD, "peers=[{name: s, model: builtin:tiny-arith-base, params: {x: 1}}]", "peers.0.params"),
    (GOOD, "train.offload_optimizer=true", "train.offload_optimizer: needs train.zero_stage 1"),
    (GOOD, "train.offload_params=true", "train.offload_params: needs train.zero_stage 3"),
    (GOOD, "train.frozen_models=shard", "train.frozen_models: shard needs train.zero_stage 3"),
    (GOOD, "train.generation_weights=half", "train.generation_weights"),
    (GOOD, "train.deepspeed={zero_optimization: {stage: 3}}", "zero_optimization.stage is 3"),
    (GOOD, "train.deepspeed={optimizer: {type: Adam}}", "train.deepspeed: optimizer: set by"),
    (GOOD, "train.deepspeed=/no/ds.json", "train.deepspeed: cannot read '/no/ds.json'"),
    (GOOD, "train.deepspeed={fp16: {enabled: true}}", "fp16 is not supported"),
    (GOOD, "policy.sampling.min_new_tokens=99", "--set: policy.sampling.min_new_tokens: must not"),
    # numbers the run could not use (they failed mid-run with exit 1, or trained NaNs)
    (GOOD, "seed=-1", "--set: seed: Input should be greater than or equal to 0"),
    (GOOD, "seed=4294967296", "--set: seed: Input should be less than or equal to 4294967295"),
    (GOOD, "train.adam_betas=[2, 0.9]", "--set: train.adam_betas.0: Input should be less than 1"),
    (GOOD, "train.adam_betas=[0.9, -1]", "train.adam_betas.1: Input should be greater than or"),
    (GOOD, "train.lr=.inf", "--set: train.lr: Input should be a finite number"),
    (GOOD, "train.adam_eps=0", "--set: train.adam_eps: Input should be greater than 0"),
    (GOOD, "loss.beta=.nan", "--set: loss.beta: Input should be a finite number"),
    (GOOD, "loss.tis_high=.inf", "--set: loss.tis_high: Input should be a finite number"),
    (GOOD, "rewards=[{name: exact_match, weight: .nan}]", "rewards.0.weight: Input should be a"),
    (GOOD, "rewards=[{name: exact_match, timeout_s: .inf}]", "rewards.0.timeout_s: Input should"),
    (GOOD, "policy.sampling.temperature=.inf", "policy.sampling.temperature: Input should be a"),
    (GOOD, 'policy.model=""', "--set: policy.model: String should have at least 1 character"),
    (GOOD, "train.deepspeed=[1]", "--set: train.deepspeed: give a .json/.yaml file path or a"),
    (GOOD, "train.steps.x=1", "--set: train.steps: Input should be a valid integer"),
    # a component's parameters against its constructor's type hints, before anything loads
    (
        GOOD + "rewards: [{{name: numeric_match, params: {{tolerance: two}}}}]\n",
        None,
        "r.yaml:8: rewards.0.params.tolerance: 'two' does not fit float: Input should be a",
    ),
    (GOOD, "group.params={eps: [1]}", "group.params.eps: [1] does not fit float"),
    # the loss family: options that would do nothing or cut into the clip range
    (GOOD, "loss.type=ppo", "--set: loss.type: Input should be 'grpo', 'bnpo', 'dr_grpo'"),
    (GOOD, "loss.kl_estimator=k2", "--set: loss.kl_estimator: Input should be 'k1', 'k3' or"),
    (GOOD, "loss.delta=1.1", "--set: loss.delta: 1.1 must exceed 1 + loss.clip_high (1.2)"),
    (GOOD + "loss: {{type: cispo, delta: 4}}\n", None, "loss.delta: cispo has no clipped ratio"),
    (GOOD, "loss.top_entropy_quantile=0", "loss.top_entropy_quantile: Input should be greater"),
    (GOOD, "loss.off_policy_mask=-1", "loss.off_policy_mask: Input should be greater than or"),
    # YAML's true and false are not numbers (`steps: true` trained 1 step)
    (GOOD, "train.steps=true", "--set: train.steps: give a number, not true"),
    (GOOD, "loss.beta=false", "--set: loss.beta: give a number, not false"),
    (GOOD, "eval.max_new_tokens=true", "--set: eval.max_new_tokens: give a number, not true"),
    (GOOD, "policy.sampling.top_k=false", "policy.sampling.top_k: give a number, not false"),
    (GOOD, "train.adam_betas=[false, 0.9]", "--set: train.adam_betas: give numbers, not false"),
    (GOOD, "train.adam_eps=true", "--set: train.adam_eps: give a number, not true"),
    # what DeepSpeed itself refuses (it failed in deepspeed.initialize with exit 1)
    (
        GOOD,
        "train.deepspeed={zero_optimization: {bogus: 7}}",
        "train.deepspeed: DeepSpeed's DeepSpeedZeroConfig rejects bogus: Extra inputs are not",
    ),
    (
        GOOD,
        "train.deepspeed={zero_optimization: {reduce_bucket_size: abc}}",
        "rejects reduce_bucket_size: Input should be a valid integer",
    ),
]


@pytest.mark.parametrize("text, override, fragment", BAD)
def test_bad_recipe_exit_2_one_line(tmp_path, capsys, text, override, fragment):
    path = _write(tmp_path, text)
    args = ["validate", str(path)] + (["--set", override] if override else [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err


def _broken_copy(tmp_path, name: str, drop: tuple = (), garbage: tuple = ()) -> Path:
    """A copy of a built-in model's folder without the files `drop`, with `garbage` files."""
    import shutil

    from grpo_ensemble.models.loading import resolve_model

    out = tmp_path / name
    shutil.copytree(resolve_model("builtin:tiny-arith-base", "x"), out)
    for f in drop:
        (out / f).unlink()
    for f in garbage:
        (out / f).write_bytes(b"not what it should be" * 10)
    return out


def test_a_model_folder_that_does_not_load_is_a_recipe_error(tmp_path, capsys):
    bad = _broken_copy(tmp_path, "bad-weights", garbage=("model.safetensors",))
    args = ["train", str(_write(tmp_path, GOOD)), "--set", f"output_dir={tmp_path / 'run'}"]
    assert main([*args, "--set", f"policy.model={bad}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --set: policy.model: cannot load model '{bad}': Error while")
    assert len(err.splitlines()) == 1
    # a tis peer's tokenizer is loaded by validate: one that is missing is the peer's error
    no_tok = _broken_copy(tmp_path, "no-tokenizer", drop=("tokenizer.json",))
    peer = f"peers=[{{name: p, model: {no_tok}, mode: tis}}]"
    assert main(["validate", str(_write(tmp_path, GOOD)), "--set", peer]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --set: peers.0.model: cannot load model '{no_tok}': ")
    assert len(err.splitlines()) == 1


def test_completions_longer_than_the_context_name_the_members_field(tmp_path, capsys):
    args = ["train", str(_write(tmp_path, GOOD)), "--set", f"output_dir={tmp_path / 'run'}"]
    peer = "peers=[{name: s, model: builtin:tiny-arith-base, sampling: {max_new_tokens: 100000}}]"
    assert main([*args, "--set", peer]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        "error: --set: peers.0.sampling.max_new_tokens: 100000 new tokens do not fit"
    )
    assert main([*args, "--set", "policy.sampling.max_new_tokens=100000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        "error: --set: policy.sampling.max_new_tokens: 100000 new tokens do not fit"
    )
    assert main([*args, "--set", "eval.max_new_tokens=100000"]) == 2  # before training
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --set: eval.max_new_tokens: 100000 new tokens do not fit")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_prompt_token_limits_for_training_and_held_out_prompts(small_recipe):
    from grpo_ensemble.models.loading import load_model
    from grpo_ensemble.trainer.build import prompt_token_limit

    model, _ = load_model("builtin:tiny-arith-small", "policy.model")
    context = model.config.max_position_embeddings
    base = {"policy__sampling__max_new_tokens": 5, "peers__0__sampling__max_new_tokens": 7}
    # (training: the longest member's completion; held out: the evaluation's)
    assert prompt_token_limit(small_recipe(**base), model) == (context - 7, context - 5)
    r = small_recipe(**base, eval__max_new_tokens=20)
    assert prompt_token_limit(r, model) == (context - 7, context - 20)
    for unused in ({"data__eval": None}, {"eval__before": False, "eval__after": False}):
        r = small_recipe(**base, eval__max_new_tokens=context, **unused)  # never evaluated
        assert prompt_token_limit(r, model) == (context - 7, context - 7)
    with pytest.raises(RecipeError) as info:
        prompt_token_limit(small_recipe(**base, eval__max_new_tokens=context), model)
    assert str(info.value) == (
        f"eval.max_new_tokens: {context} new tokens do not fit the policy's context of "
        f"{context} tokens"
    )


def test_error_names_the_line(tmp_path, capsys):
    path = _write(tmp_path, GOOD + "loss:\n  clip_low: 2.0\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:9: loss.clip_low" in err  # line 9 holds clip_low


def test_a_key_given_twice_is_an_error_naming_its_line(tmp_path, capsys):
    # YAML's safe loader keeps the last silently: a second `train:` dropped the first's keys
    path = _write(tmp_path, GOOD + "train:\n  lr: 0.1\n")
    line = len(GOOD.splitlines()) + 1
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {path}:{line}: invalid YAML: duplicate key 'train'"
    )


def test_unreadable_yaml_files_are_one_line_errors_naming_the_line(tmp_path, capsys):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"seed: 0\npolicy: {model: caf\xe9}\n")
    assert main(["validate", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {bad}:2: cannot read recipe: not UTF-8 text"
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 1')  # cut short
    path = _write(tmp_path, GOOD)
    assert main(["validate", str(path), "--set", f"train.deepspeed={ds}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {ds}:1: invalid YAML: expected ',' or '}}', but got '<stream end>'"
    assert main(["validate", str(path), "--set", f"train.deepspeed={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --set: train.deepspeed: cannot read '{tmp_path}': it is a directory"
    )


def test_errors_found_after_the_schema_name_the_line_too(tmp_path, capsys):
    # an unknown plugin is found when the registry is asked, after the schema check
    path = _write(tmp_path, GOOD + "rewards:\n  - name: nope\n    weight: 2\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    line = len(GOOD.splitlines()) + 2
    assert err.startswith(f"error: {path}:{line}: rewards.0.name: unknown reward scorer 'nope'")
    # set on the command line: blamed on --set
    assert main(["validate", str(_write(tmp_path, GOOD)), "--set", "group.evaluator=nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --set: group.evaluator: unknown group evaluator 'nope'")


def test_missing_recipe_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml: cannot read recipe" in capsys.readouterr().err


def test_unreadable_prompt_file_names_file_and_line(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": \n')
    path = _write(tmp_path, GOOD)
    assert main(["validate", str(path), "--set", f"data.train={prompts}"]) == 2
    assert f"{prompts}:2: invalid JSON" in capsys.readouterr().err


def test_validate_ok_and_resolved_recipe_round_trips(tmp_path, capsys):
    path = _write(tmp_path, GOOD)
    assert main(["validate", str(path)]) == 0
    assert "ok" in capsys.readouterr().out
    from grpo_ensemble.recipe import dump_recipe, recipe_from_dict

    r = load_recipe(path)
    assert recipe_from_dict(yaml.safe_load(dump_recipe(r))) == r


def test_every_field_is_in_the_docs():
    import typing
    from pathlib import Path

    from pydantic import BaseModel

    from grpo_ensemble.recipe import Recipe
    from grpo_ensemble.recipe.schema import AlertRule

    docs = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text()

    def paths(cls, prefix):
        for name, f in cls.model_fields.items():
            ann = f.annotation
            inner = getattr(ann, "__args__", (ann,))[0]
            if ann is AlertRule:  # every rule has the same fields: `alerts.<rule>.FIELD` rows
                yield f"{prefix}{name}"
                yield from paths(ann, f"{prefix}<rule>.")
            elif isinstance(ann, type) and issubclass(ann, BaseModel):
                yield from paths(ann, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    many = typing.get_origin(ann) is list
                    yield from paths(inner, f"{prefix}{name}{'[i]' if many else ''}.")

    missing = [p for p in paths(Recipe, "") if f"`{p}`" not in docs]
    assert not missing, f"docs/recipes.md lacks {missing}"


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml")), ids=str
)
def test_shipped_recipes_validate(path, capsys):
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
