"""Co-training (`policies:`): the recipe, the exchange of candidates between the policies, the
run directory, metrics, resume and the report, in one process. Several ranks:
test_cotraining_multirank.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import subprocess_env
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from grpo_ensemble import hookimpl
from grpo_ensemble.errors import RecipeError
from grpo_ensemble.plugins.interfaces import SamplingParams, mix64
from grpo_ensemble.recipe import recipe_from_dict
from grpo_ensemble.recipe.cotraining import policy_recipes
from grpo_ensemble.rollout.groups import Rollout
from grpo_ensemble.trainer.cotrain import CoPolicy, win_counts
from grpo_ensemble.trainer.loop import train
from grpo_ensemble.types import Candidate, Group, GroupLayout, Prompt


def co_recipe(tmp_path: Path, **changes) -> dict:
    """Two policies of other sizes (and, with `pairs`, tokenizers), 4 prompts × (2 + 2)."""
    data = {
        "seed": 0,
        "output_dir": str(tmp_path / "run"),
        "policies": [
            {"name": "small", "model": "builtin:tiny-arith-small", "n": 2},
            {"name": "base", "model": "builtin:tiny-arith-base", "n": 2, "train": {"lr": 5e-4}},
        ],
        "train": {"steps": 3, "prompts_per_step": 4, "micro_batch_size": 8, "lr": 1e-3},
        "eval": {"max_prompts": 8},
        "log": {"progress": False},
    }
    for policy in data["policies"]:
        policy["sampling"] = {"max_new_tokens": 5}
    data.update(changes)
    return data


# ---- the recipe -------------------------------------------------------------------------


def test_each_policy_trains_under_its_own_recipe(tmp_path):
    data = co_recipe(tmp_path, peers=[{"name": "frozen", "model": "builtin:tiny-arith-base"}])
    data["policies"][0]["mode"] = "shaped"
    data["policies"][1]["loss"] = {"beta": 0.1}
    recipes = dict(policy_recipes(recipe_from_dict(data)))
    small, base = recipes["small"], recipes["base"]
    # the other policy first among the peers, with its n and mode; then the frozen peers
    assert [(p.name, p.n, p.mode) for p in small.peers] == [
        ("base", 2, "on_policy"),
        ("frozen", 4, "on_policy"),
    ]
    assert [(p.name, p.n, p.mode) for p in base.peers] == [
        ("small", 2, "shaped"),
        ("frozen", 4, "on_policy"),
    ]
    assert small.policy.model == "builtin:tiny-arith-small" and small.policy.n == 2
    assert (small.train.lr, base.train.lr) == (1e-3, 5e-4)
    assert (small.loss.beta, base.loss.beta) == (0.0, 0.1)
    assert small.output_dir == str(tmp_path / "run" / "policies" / "small")
    assert small.policies is None and base.train.steps == 3


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["policies"][1].update(name="small"), "policies.1.name: 'small' is taken"),
        (
            lambda d: d.update(peers=[{"name": "base", "model": "builtin:tiny-arith-base"}]),
            "policies.1.name: 'base' is also a peer",
        ),
        (lambda d: d["policies"][0].update(train={"steps": 2}), "policies.0.train.steps:"),
        (lambda d: d["policies"][1].update(train={"lr": -1}), "policies.1.train.lr:"),
        (lambda d: d["policies"][1].update(lora={"r": 0}), "policies.1.lora.r:"),
        (lambda d: d["policies"][0].update(loss={"clip_low": 3}), "policies.0.loss.clip_low:"),
        (lambda d: d.update(policy={"model": "builtin:tiny-arith-small"}), "policy: give"),
        (lambda d: d.update(policies=d["policies"][:1]), "policies:"),
    ],
)
def test_bad_co_training_recipes_name_the_field(tmp_path, change, message):
    data = co_recipe(tmp_path)
    change(data)
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(data)
    assert message in str(err.value)


def test_the_cli_refuses_a_policy_listed_as_a_peer_in_one_line(tmp_path):
    import yaml

    data = co_recipe(tmp_path, peers=[{"name": "small", "model": "builtin:tiny-arith-small"}])
    path = tmp_path / "co.yaml"
    path.write_text(yaml.safe_dump(data))
    proc = subprocess.run(
        [sys.executable, "-m", "grpo_ensemble", "validate", str(path)],
        capture_output=True, text=True, env=subprocess_env(), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert (
        lines[-1].startswith("error: ") and "policies.0.name: 'small' is also a peer" in lines[-1]
    )
    assert "Traceback" not in proc.stderr


# ---- the exchange -----------------------------------------------------------------------


def _cand(text: str, ids: list[int], logprobs=None) -> Candidate:
    return Candidate(text=text, token_ids=ids, source="policy", behaviour_logprobs=logprobs)


def test_a_co_policy_hands_over_copies_of_the_other_policys_candidates_by_seed():
    view = CoPolicy("base", tokenizer=None)
    view.k = 1
    groups = [
        Group(Prompt("1+1="), [_cand("2", [5, 2], [-0.1, -0.2]), _cand("3", [6, 2])]),
        Group(Prompt("1+1="), [_cand("4", [7, 2]), _cand("5", [8, 2])]),
    ]
    view.offer([11, 22], [g.candidates for g in groups])  # by the holder's prompt seeds
    # the holder's ensemble asks with its member seeds: mix64(prompt seed * 31 + k)
    sampling = SamplingParams(seeds=(mix64(22 * 31 + 1), mix64(11 * 31 + 1)))
    out = view.generate([Prompt("1+1="), Prompt("1+1=")], 2, sampling)
    assert [[c.text for c in cands] for cands in out] == [["4", "5"], ["2", "3"]]
    out[1][0].token_ids.append(99)
    out[1][0].behaviour_logprobs[0] = 0.0
    out[1][0].source = "base"
    # the other policy's own candidates are untouched by what the holder does with the copies
    assert groups[0].candidates[0].token_ids == [5, 2]
    assert groups[0].candidates[0].behaviour_logprobs == [-0.1, -0.2]
    assert groups[0].candidates[0].source == "policy"


def test_win_counts_compare_every_pair_of_the_two_sources_in_a_group():
    def cand(source):
        return Candidate(text="", token_ids=[1], source=source)

    groups = [
        Group(Prompt("a"), [cand("policy"), cand("policy"), cand("base"), cand("base")]),
        Group(Prompt("b"), [cand("policy"), cand("other")]),  # no base candidate: no pairs
        Group(Prompt("c"), [cand("policy"), cand("base")]),
    ]
    cands = [c for g in groups for c in g.candidates]
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.0, 1.0, 0.0, 0.0])
    ro = Rollout(
        groups=groups,
        layout=GroupLayout.from_groups(groups),
        candidates=cands,
        rewards=rewards,
        per_scorer={},
        advantages=torch.zeros(8),
        keep=torch.ones(8, dtype=torch.bool),
        equal_groups=0,
    )
    # group a: base 1.0 vs policy 1.0 (tie ½), 0.0 (win); base 0.5 vs 1.0 (loss), 0.0 (win)
    # group c: base 0.0 vs policy 0.0 (tie ½)
    assert win_counts(ro, "base") == (3.0, 5.0)
    assert win_counts(ro, "other") == (1.0, 1.0)


# ---- a run ------------------------------------------------------------------------------


class Heard:
    """An observer plugin: what the co-training run tells observers, in order."""

    def __init__(self):
        self.calls = []

    @hookimpl
    def on_step_end(self, step, metrics):
        self.calls.append(("step", step, sorted({k.split("/")[1] for k in metrics if "/" in k})))

    @hookimpl
    def on_eval(self, step, results):
        self.calls.append(("eval", step, results["when"], results["policy"]))

    @hookimpl
    def on_completions(self, step, rows):
        self.calls.append(("completions", step, sorted({r["policy"] for r in rows})))


HEARD = Heard()


@pytest.fixture(scope="module")
def co_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("co")
    data = co_recipe(
        tmp, log={"progress": False, "completions": {"every": 1, "prompts": 4, "per_member": 2}}
    )
    return train(recipe_from_dict(data), plugins=[HEARD])


def test_observers_hear_of_the_run_once_with_every_policy(co_run):
    evals = [("eval", s, w, n) for s, w in ((0, "before"), (3, "after")) for n in ("small", "base")]
    steps = []
    for step in (1, 2, 3):
        steps.append(("completions", step, ["small"]))
        steps.append(("completions", step, ["base"]))
        steps.append(("step", step, ["base", "small"]))  # policy/<name>/… and pair/<A>/<B>/…
    assert HEARD.calls == evals[:2] + steps + evals[2:]


def test_a_co_training_run_writes_each_policy_and_the_merged_rows(co_run):
    out = co_run.run_dir
    assert sorted(p.name for p in (out / "final").iterdir()) == ["base", "small"]
    for name, width in (("small", 64), ("base", 128)):
        model = AutoModelForCausalLM.from_pretrained(out / "final" / name)
        assert model.config.hidden_size == width
        own = out / "policies" / name
        assert {"recipe.yaml", "metrics.jsonl", "eval.json", "summary.json"} <= {
            p.name for p in own.iterdir()
        }
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for name in ("small", "base"):
        own = [
            json.loads(x)
            for x in (out / "policies" / name / "metrics.jsonl").read_text().splitlines()
        ]
        for merged, row in zip(rows, own, strict=True):
            assert {k: v for k, v in merged.items() if k.startswith(f"policy/{name}/")} == {
                f"policy/{name}/{k}": v for k, v in row.items() if k != "step"
            }
    assert co_run.policies["small"].metrics[0]["step"] == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and sorted(summary["policies"]) == ["base", "small"]


def test_each_policys_groups_hold_the_other_policys_own_candidates(co_run):
    """Step by step, what policy A's groups hold of B is exactly what B sampled for itself:
    the same completions for the same prompts (every prompt here: inject always)."""
    out = co_run.run_dir

    def completions(name):
        path = out / "policies" / name / "completions.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()]

    small, base = completions("small"), completions("base")

    def texts(rows, member, step):
        return sorted(
            (json.dumps(r["prompt"]), r["completion"])
            for r in rows
            if r["step"] == step and r["member"] == member
        )

    for step in (1, 2, 3):
        assert texts(small, "base", step) == texts(base, "policy", step)
        assert texts(base, "small", step) == texts(small, "policy", step)
        assert len(texts(small, "policy", step)) == 8  # 4 prompts × 2


def test_the_pair_win_rate_is_counted_from_the_groups(co_run):
    """pair/A/B/win_rate recomputed from B's logged groups: over each prompt, every pair of A's
    candidate and B's own, a win 1, a tie ½."""
    out = co_run.run_dir
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [
        json.loads(x)
        for x in (out / "policies" / "base" / "completions.jsonl").read_text().splitlines()
    ]
    for row in rows:
        won = pairs = 0.0
        step = [r for r in logged if r["step"] == row["step"]]
        for prompt in {json.dumps(r["prompt"]) for r in step}:
            group = [r for r in step if json.dumps(r["prompt"]) == prompt]
            theirs = [r["reward"] for r in group if r["member"] == "small"]
            ours = [r["reward"] for r in group if r["member"] == "policy"]
            for a in theirs:
                for b in ours:
                    won += 1.0 if a > b else 0.5 if a == b else 0.0
                    pairs += 1
        assert row["pair/small/base/win_rate"] == pytest.approx(won / pairs, abs=1e-12)
        assert row["pair/small/base/win_rate"] + row["pair/base/small/win_rate"] == pytest.approx(
            1.0
        )


def test_the_report_shows_every_policy(co_run, tmp_path):
    from grpo_ensemble.report import write_report
    from grpo_ensemble.report.rundata import load_runs

    runs = load_runs([co_run.run_dir])  # the co-training run: one run per policy
    assert [r.name for r in runs] == ["small", "base"]
    assert [r.path for r in runs] == [co_run.run_dir / "policies" / n for n in ("small", "base")]
    assert [[m["step"] for m in r.metrics] for r in runs] == [[1, 2, 3], [1, 2, 3]]
    assert runs[1].evaluation("after")["accuracy"] == co_run.policies["base"].after.accuracy
    page = tmp_path / "report.html"
    write_report([co_run.run_dir], page)
    html = page.read_text()
    assert html.count(">small<") >= 1 and html.count(">base<") >= 1


def test_a_resumed_co_training_run_is_bitwise_the_unbroken_one(tmp_path):
    data = co_recipe(tmp_path, eval={"before": False, "after": False})
    data["train"] = {**data["train"], "steps": 4, "checkpoint_every": 2}
    whole = train(recipe_from_dict({**data, "output_dir": str(tmp_path / "whole")}))
    broken = {**data, "output_dir": str(tmp_path / "broken")}
    train(recipe_from_dict(broken), overrides=["train.steps=2"])
    resumed = train(recipe_from_dict(broken), resume="auto")
    assert resumed.resumed_from.name == "step-00000002"

    def no_times(rows):
        return [{k: v for k, v in r.items() if "time" not in k} for r in rows]

    assert no_times(resumed.metrics) == no_times(whole.metrics[2:])
    for name in ("small", "base"):
        a = load_file(whole.run_dir / "final" / name / "model.safetensors")
        b = load_file(resumed.run_dir / "final" / name / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_policies_of_other_tokenizers_exchange_text_re_tokenized(tmp_path):
    """small reads a character to a token, pairs two digits: each one's candidates reach the
    other as text, re-tokenized, and cut at the taker's max_new_tokens of its own tokens (as a
    peer's are); the lengths each policy's row gives count the taker's tokens."""
    from grpo_ensemble.models.tiny import build_tokenizer

    data = co_recipe(
        tmp_path,
        eval={"before": False, "after": False},
        log={"progress": False, "completions": {"every": 1, "prompts": 4, "per_member": 2}},
    )
    data["policies"][1] = {
        "name": "pairs",
        "model": "builtin:tiny-arith-pairs",
        "n": 2,
        "sampling": {"max_new_tokens": 5},
    }
    data["train"] = {**data["train"], "steps": 1}
    result = train(recipe_from_dict(data))
    toks = {"small": build_tokenizer(), "pairs": build_tokenizer("digit-pairs")}

    def logged(name):
        path = result.run_dir / "policies" / name / "completions.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()]

    for taker, giver in (("small", "pairs"), ("pairs", "small")):
        tok = toks[taker]
        expected, lengths = [], []
        for r in logged(giver):
            if r["member"] != "policy":
                continue
            ids = tok(r["completion"], add_special_tokens=False)["input_ids"]
            ids += [tok.eos_token_id] if r["finished"] else []
            cut = tok.decode(ids[:5], skip_special_tokens=True)
            text = r["completion"] if len(ids) <= 5 else cut
            expected.append((json.dumps(r["prompt"]), text))
            lengths.append(min(len(ids), 5))
        theirs = [r for r in logged(taker) if r["member"] == giver]
        taken = [(json.dumps(r["prompt"]), r["completion"]) for r in theirs]
        assert sorted(taken) == sorted(expected)
        row = result.policies[taker].metrics[0]
        assert row[f"member/{giver}/completion_len"] == pytest.approx(sum(lengths) / len(lengths))


def test_one_policy_trains_adapters_beside_a_fully_trained_one(tmp_path):
    pytest.importorskip("peft")
    data = co_recipe(tmp_path, eval={"before": False, "after": False})
    data["policies"][0]["lora"] = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    data["train"] = {**data["train"], "steps": 1}
    result = train(recipe_from_dict(data))
    small, base = result.policies["small"].model_dir, result.policies["base"].model_dir
    assert (small / "adapter_config.json").is_file() and not (small / "model.safetensors").exists()
    assert json.loads((small / "adapter_config.json").read_text())["r"] == 4
    assert (base / "model.safetensors").is_file()
    trained = load_file(base / "model.safetensors")
    start = AutoModelForCausalLM.from_pretrained(_builtin("tiny-arith-base")).state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in trained)  # base trained too


def _builtin(name: str) -> str:
    from grpo_ensemble.models.loading import resolve_model

    return resolve_model(f"builtin:{name}", "policy.model")
