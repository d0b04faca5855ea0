"""Conversational prompts (TRL's format): read and checked with file and line, rendered by each
member with its own chat template, given to scorers and TRL reward functions in TRL's shapes;
a conversational run of the built-in task equals the plain one."""

from __future__ import annotations

import json
import shutil

import pytest

from grpo_ensemble import (
    Candidate,
    InputFileError,
    Prompt,
    RecipeError,
    Sample,
    UserError,
    render_prompt,
    train,
)
from grpo_ensemble.cli import main
from grpo_ensemble.data.prompts import Cleaning, load_prompts
from grpo_ensemble.models.loading import load_tokenizer, resolve_model
from grpo_ensemble.plugins.builtin.rewards import TrlFunction
from grpo_ensemble.trainer.setup import build_run

SYSTEM = {"role": "system", "content": "Add."}


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_conversations_are_read_with_their_messages(tmp_path):
    rows = [
        {"prompt": [SYSTEM, _user("1+2=")], "answer": "3"},
        {"prompt": [_user("Hi"), {"role": "assistant", "content": "Hello"}, _user("4+4=")]},
    ]
    first, second = load_prompts(_write(tmp_path / "c.jsonl", rows), "prompt")
    assert first.messages == (SYSTEM, _user("1+2="))
    assert json.loads(first.text) == [SYSTEM, _user("1+2=")]  # canonical JSON of the messages
    assert first.fields == {"prompt": [SYSTEM, _user("1+2=")], "answer": "3"}
    assert [m["role"] for m in second.messages] == ["user", "assistant", "user"]
    # a system prompt goes first where there is none, and makes a string prompt a conversation
    how = Cleaning(system_prompt="Be brief.")
    plain = _write(tmp_path / "p.jsonl", [{"prompt": "5+5="}])
    (made,) = load_prompts(plain, "prompt", how=how)
    assert made.messages == ({"role": "system", "content": "Be brief."}, _user("5+5="))
    kept, added = load_prompts(_write(tmp_path / "c2.jsonl", rows), "prompt", how=how)
    assert kept.messages[0] == SYSTEM and added.messages[0]["content"] == "Be brief."


@pytest.mark.parametrize(
    "prompt, why",
    [
        ([], "a conversation must be a non-empty list of messages"),
        ([{"role": "bot", "content": "x"}], "message 0 has an unknown role 'bot'"),
        ([_user("a"), {"role": "user", "content": 5}], "message 1 content is not a string"),
        ([{"role": "user", "content": "a", "name": "x"}], "message 0 has an unknown key 'name'"),
        ([_user("a"), {"role": "assistant", "content": "b"}], "ends with an assistant message"),
        (["a"], "message 0 is not an object with role and content"),
    ],
)
def test_a_bad_conversation_is_named_with_file_and_line(tmp_path, prompt, why):
    path = _write(tmp_path / "bad.jsonl", [{"prompt": [_user("1+1=")]}, {"prompt": prompt}])
    with pytest.raises(InputFileError) as info:
        load_prompts(path, "prompt")
    assert str(info.value).startswith(f"{path}:2: 'prompt': ") and why in str(info.value)


def test_each_tokenizer_renders_with_its_template():
    tok = load_tokenizer(resolve_model("builtin:tiny-arith-small", "policy.model"))
    talk = Prompt("t", messages=(SYSTEM, _user("37+45=")), index=3)
    assert render_prompt(talk, tok) == "<bos>37+45="  # the user turn, as the model learned
    assert render_prompt(Prompt("37+45="), tok) == "37+45="  # a string as it is
    tok.chat_template = "{{ bos_token }}Q: {{ messages[-1]['content'] }} A:"
    assert render_prompt(talk, tok) == "<bos>Q: 37+45= A:"
    tok.chat_template = "{{ raise_exception('no system prompts') }}"
    with pytest.raises(UserError, match=r"^prompt 3: the chat template failed: .*no system"):
        render_prompt(talk, tok)
    tok.chat_template = None
    with pytest.raises(UserError, match=r"prompt 3 is a conversation, but .* no chat template"):
        render_prompt(talk, tok)


def test_a_peer_renders_with_its_own_template(small_recipe, tmp_path):
    # the peer's recipe entry gives it another template: each member's candidates were
    # sampled from the prompt as its own template renders it
    template = tmp_path / "peer.jinja"
    template.write_text("{{ bos_token }}{{ messages[-1]['content'] }}")
    recipe = small_recipe(
        data__train="builtin:arithmetic-chat/train",
        data__eval="builtin:arithmetic-chat/test",
        peers__0__chat_template=str(template),
        policy__chat_template="{{ bos_token }}{{ messages | length }}:{{ messages[-1].content }}",
    )
    run = build_run(recipe, tmp_path)
    (group,) = run.ensemble.generate(run.sampler.next(1))
    user = group.prompt.messages[-1]["content"]
    by_member = {c.source: c.prompt_text for c in group.candidates}
    assert by_member == {"policy": f"<bos>2:{user}", "strong": f"<bos>{user}"}
    ids = run.prompt_ids(group.prompt)  # the update's prompt ids: the policy's rendering
    assert ids == run.tokenizer(f"<bos>2:{user}", add_special_tokens=False)["input_ids"]


def test_validate_names_a_member_without_a_template_and_a_prompt_that_fails(tmp_path, capsys):
    plain = tmp_path / "no-template"
    shutil.copytree(resolve_model("builtin:tiny-arith-base", "x"), plain)
    (plain / "chat_template.jinja").unlink()
    data = _write(tmp_path / "c.jsonl", [{"prompt": [_user("1+1=")], "answer": "2"}] * 2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "policy: {model: 'builtin:tiny-arith-small'}\n"
        f"peers: [{{name: s, model: '{plain}'}}]\n"
        f"data: {{train: '{data}', eval: null}}\n"
    )
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {recipe}:2: peers.0.chat_template: the prompts are ")
    fails = "{% if messages | length > 0 %}{{ raise_exception('nope') }}{% endif %}"
    override = f"peers.0.chat_template={json.dumps(fails)}"
    assert main(["validate", str(recipe), "--set", override]) == 2
    assert capsys.readouterr().err.startswith(f"error: {data}:1: peers.0: prompt 1: the chat")
    with pytest.raises(RecipeError, match=r"peers\.0\.chat_template: the prompts are"):
        build_run(
            _recipe_with_peer(tmp_path, plain, data),
            tmp_path / "run",
        )


def _recipe_with_peer(tmp_path, peer_model, data):
    from grpo_ensemble.recipe import recipe_from_dict

    return recipe_from_dict(
        {
            "output_dir": str(tmp_path / "out"),
            "policy": {"model": "builtin:tiny-arith-small", "n": 2},
            "peers": [{"name": "s", "model": str(peer_model), "n": 2}],
            "data": {"train": data, "eval": None},
            "train": {"prompts_per_step": 2},
        }
    )


# TRL's documented format reward for conversational data, as written there
def format_reward_func(completions, **kwargs):
    """Reward function that checks if the completion has a specific format."""
    import re

    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]


def test_trl_functions_get_conversations_in_trls_shapes():
    talk = Prompt("t", {"answer": "2"}, messages=(SYSTEM, _user("1+1=")))
    samples = [
        Sample(talk, Candidate("<think>x</think><answer>2</answer>", [5], "policy")),
        Sample(talk, Candidate("2", [5], "policy")),
    ]
    assert TrlFunction(format_reward_func).score(samples) == [1.0, 0.0]
    seen = {}

    def spy(prompts, completions, **kwargs):
        seen.update(prompts=prompts, completions=completions)
        return [0.0, 0.0]

    TrlFunction(spy).score(samples)
    assert seen["prompts"] == [[SYSTEM, _user("1+1=")]] * 2
    assert seen["completions"][1] == [{"role": "assistant", "content": "2"}]


def test_a_conversational_run_of_the_builtin_task_equals_the_plain_one(small_recipe, tmp_path):
    # both built-in templates render the user turn as the models learned it: the same token
    # ids, so the same samples, rewards and updates, step by step
    rows = {}
    for name, task in (("plain", "arithmetic"), ("chat", "arithmetic-chat")):
        recipe = small_recipe(
            data__train=f"builtin:{task}/train",
            data__eval=f"builtin:{task}/test",
            output_dir=str(tmp_path / name),
            eval__max_prompts=8,
        )
        result = train(recipe)
        rows[name] = [
            {k: v for k, v in m.items() if not k.startswith("time/")} for m in result.metrics
        ]
        rows[name].append((result.before.accuracy, result.after.accuracy))
    assert rows["chat"] == rows["plain"]
