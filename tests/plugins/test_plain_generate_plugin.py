"""The example plugin plugins/grpo-ensemble-plain-generate: a generator over plain
`model.generate`, found through its entry point, whose behaviour log-probs are the trainer's
(log_softmax of a forward of prompt + completion at the sampling temperature), whose seeds make
a prompt's candidates its own, and whose greedy decoding is argmax decoding.

Install it first: `pip install -e plugins/grpo-ensemble-plain-generate`. Everything else is
built locally: the built-in tiny model (cached) and a random one.
"""

from __future__ import annotations

import functools
import importlib.metadata
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from grpo_ensemble import (
    Generator,
    Prompt,
    RecipeError,
    RewardScorer,
    SamplingParams,
    UserError,
    plugins,
    train,
)
from grpo_ensemble.models.tiny import build_tokenizer, ensure_builtin_model

PLUGIN_DIR = Path(__file__).resolve().parents[2] / "plugins" / "grpo-ensemble-plain-generate"
try:
    from grpo_ensemble_plain_generate import PlainGenerate
except ModuleNotFoundError:  # not installed: the entry-point test says so, the others still run
    sys.path.insert(0, str(PLUGIN_DIR))
    from grpo_ensemble_plain_generate import PlainGenerate

PROMPTS = ["37+45=", "1+2=", "99+99=", "8+15="]  # different lengths: left padding in a batch
EOS = 2  # the tiny tokenizer's <eos>


@pytest.fixture(scope="module")
def gen() -> PlainGenerate:
    """Built from a path, as a recipe's peer is: model and tokenizer loaded, model frozen."""
    return PlainGenerate(str(ensure_builtin_model("tiny-arith-small")))


@pytest.fixture
def fresh():
    """A model and tokenizer of our own, for tests that change their state."""
    path = ensure_builtin_model("tiny-arith-small")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, build_tokenizer()


@torch.no_grad()
def reference_logprobs(model, tok, prompt: str, completion: list[int], temperature: float):
    """The trainer's behaviour log-probs: one unpadded forward of prompt + completion, the
    logits predicting each completion token divided by the temperature, log-softmaxed."""
    ids = tok(prompt).input_ids  # <bos> + one token per character
    logits = model(torch.tensor([ids + completion])).logits[0, len(ids) - 1 : -1]
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(1, torch.tensor(completion)[:, None]).squeeze(1)


def test_plugin_is_discovered_through_its_entry_point(monkeypatch):
    eps = importlib.metadata.entry_points(group="grpo_ensemble", name="plain_generate")
    assert eps, "install it: pip install -e plugins/grpo-ensemble-plain-generate"
    ep = next(iter(eps))
    assert (ep.dist.name, ep.value) == (
        "grpo-ensemble-plain-generate",
        "grpo_ensemble_plain_generate",
    )
    # conftest loads no third-party plugin: the name is unknown until it is allowed
    with pytest.raises(RecipeError, match="unknown generator 'plain_generate'"):
        plugins.get_component("generator", "plain_generate", "policy.generator")
    monkeypatch.setenv("GRPO_ENSEMBLE_LOAD_PLUGINS", "plain_generate")
    plugins.reset_plugin_manager()
    cls = plugins.get_component("generator", "plain_generate", "policy.generator")
    assert cls is ep.load().PlainGenerate and cls.name == "plain_generate"
    info = {i.name: i for i in plugins.plugin_infos()}["plain_generate"]
    assert info.version == "0.1.0"
    assert info.hooks == ["register_generators"]
    assert info.components == {"generator": ["plain_generate"]}


def test_loaded_from_a_path_the_model_is_frozen(gen):
    assert not gen.model.training
    assert not any(p.requires_grad for p in gen.model.parameters())
    assert gen.tokenizer.eos_token_id == EOS and gen.tokenizer.pad_token_id == 0


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logprobs_are_the_models_own(gen, temperature):
    model, tok = gen.model, gen.tokenizer
    sampling = SamplingParams(temperature=temperature, max_new_tokens=3, seeds=(1, 2, 3, 4))
    n = 4
    got = gen.generate([Prompt(t) for t in PROMPTS], n, sampling)
    assert [len(c) for c in got] == [n] * len(PROMPTS)
    finished = 0
    for text, cands in zip(PROMPTS, got, strict=True):
        for c in cands:
            ids = c.token_ids
            assert c.source == ""
            assert len(c.behaviour_logprobs) == len(ids) >= 1
            assert EOS not in ids[:-1]  # cut after the first EOS, EOS kept
            assert c.finished == (ids[-1] == EOS)
            assert c.finished or len(ids) == sampling.max_new_tokens
            assert c.text == tok.decode(ids, skip_special_tokens=True)
            want = reference_logprobs(model, tok, text, ids, temperature)
            torch.testing.assert_close(torch.tensor(c.behaviour_logprobs), want, rtol=0, atol=1e-5)
            finished += c.finished
    # "99+99=" needs 4 tokens ("198" + EOS): cut at 3; "1+2=" needs 2
    assert 0 < finished < n * len(PROMPTS)
    # without seeds, rows of all prompts share batches (here 5 rows at a time): same log-probs
    batched = PlainGenerate(model, tokenizer=tok, batch_size=5)
    torch.manual_seed(0)
    got = batched.generate([Prompt(t) for t in PROMPTS], 3, replace(sampling, seeds=None))
    for text, cands in zip(PROMPTS, got, strict=True):
        assert len(cands) == 3
        for c in cands:
            want = reference_logprobs(model, tok, text, c.token_ids, temperature)
            torch.testing.assert_close(torch.tensor(c.behaviour_logprobs), want, rtol=0, atol=1e-5)


def test_top_k_0_filters_nothing_and_top_k_filters_the_distribution():
    # transformers' generate falls back on top_k=50 when top_k is not given: a vocabulary
    # above 50 tells "no filter" from that default
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=EOS,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    tok = build_tokenizer()  # ids 19..63 decode to nothing; only the ids matter here
    g = PlainGenerate(model, tokenizer=tok)
    prompts = [Prompt(t) for t in PROMPTS]
    for top_k in (0, 5):
        sampling = SamplingParams(
            temperature=0.7, top_k=top_k, max_new_tokens=6, seeds=(5, 6, 7, 8)
        )
        for text, cands in zip(PROMPTS, g.generate(prompts, 3, sampling), strict=True):
            for c in cands:
                ids = tok(text).input_ids
                with torch.no_grad():
                    logits = model(torch.tensor([ids + c.token_ids])).logits[0, len(ids) - 1 : -1]
                logits = logits / 0.7
                if top_k:
                    kth = logits.topk(top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                want = torch.log_softmax(logits, -1).gather(1, torch.tensor(c.token_ids)[:, None])
                torch.testing.assert_close(
                    torch.tensor(c.behaviour_logprobs), want.squeeze(1), rtol=0, atol=1e-5
                )


def test_seeds_make_a_prompts_candidates_its_own(gen):
    a, b, c = (Prompt(t) for t in ("37+45=", "1+2=", "99+99="))
    s = SamplingParams(temperature=1.0, max_new_tokens=4, seeds=(11, 22, 33))
    rng = torch.get_rng_state()
    first = gen.generate([a, b, c], 4, s)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream is left alone
    assert gen.generate([a, b, c], 4, s) == first
    assert gen.generate([c], 4, replace(s, seeds=(33,))) == [first[2]]
    assert gen.generate([c, a], 4, replace(s, seeds=(33, 11))) == [first[2], first[0]]
    # the same prompt twice in a call, with different seeds: each gets its seed's candidates
    assert gen.generate([a, a], 4, replace(s, seeds=(11, 22))) == [
        first[0],
        gen.generate([a], 4, replace(s, seeds=(22,)))[0],
    ]
    assert gen.generate([a, b, c], 4, replace(s, seeds=(12, 23, 34))) != first
    # more candidates than a batch holds: still the prompt's alone
    small = PlainGenerate(gen.model, tokenizer=gen.tokenizer, batch_size=3)
    many = small.generate([a, c], 7, replace(s, seeds=(11, 33)))
    assert small.generate([c], 7, replace(s, seeds=(33,))) == [many[1]]
    assert many[0][:3] == small.generate([a], 3, replace(s, seeds=(11,)))[0]


@torch.no_grad()
def argmax_reference(model, tok, prompt: str, max_new_tokens: int, min_new_tokens: int = 0):
    """Greedy decoding by hand: a full forward per token, no cache, EOS barred before
    `min_new_tokens`; with the log-prob of each chosen token under the (masked) logits."""
    ids = tok(prompt).input_ids
    out, logps = [], []
    for t in range(max_new_tokens):
        logits = model(torch.tensor([ids + out])).logits[0, -1].float()
        if t < min_new_tokens:
            logits[EOS] = float("-inf")
        nxt = int(logits.argmax())
        out.append(nxt)
        logps.append(float(torch.log_softmax(logits, -1)[nxt]))
        if nxt == EOS:
            break
    return out, logps


@pytest.mark.parametrize("min_new_tokens", [0, 3])
def test_greedy_is_argmax_decoding(gen, min_new_tokens):
    sampling = SamplingParams(temperature=0, max_new_tokens=5, min_new_tokens=min_new_tokens)
    got = gen.generate([Prompt(t) for t in PROMPTS], 2, sampling)
    finished = []
    for text, cands in zip(PROMPTS, got, strict=True):
        ids, logps = argmax_reference(gen.model, gen.tokenizer, text, 5, min_new_tokens)
        assert cands[0] == cands[1]
        c = cands[0]
        assert c.token_ids == ids
        assert c.finished == (ids[-1] == EOS)
        assert c.text == gen.tokenizer.decode(ids, skip_special_tokens=True)
        # greedy: log-probs of the raw logits (temperature 1), EOS barred by min_new_tokens
        assert c.behaviour_logprobs == pytest.approx(logps, rel=0, abs=1e-5)
        finished.append(c.finished)
    assert any(finished)
    if min_new_tokens:
        assert all(len(c[0].token_ids) >= min_new_tokens for c in got)


def test_module_needs_a_tokenizer_and_its_state_is_put_back(fresh):
    model, tok = fresh
    with pytest.raises(UserError, match=r"^plain_generate needs a tokenizer"):
        PlainGenerate(model)
    model.train()
    tok.padding_side = "right"
    g = PlainGenerate(model, tokenizer=tok)
    assert g.model is model and g.tokenizer is tok
    g.generate([Prompt("1+2=")], 2, SamplingParams(max_new_tokens=3))
    assert model.training and tok.padding_side == "right"
    other = AutoModelForCausalLM.from_pretrained(ensure_builtin_model("tiny-arith-base"))
    g.sync_weights(other)
    assert g.model is other
    # the adopted module's weights are the ones sampled with: its greedy answer, not the old
    want, _ = argmax_reference(other.eval(), tok, "37+45=", 4)
    got = g.generate([Prompt("37+45=")], 1, SamplingParams(temperature=0, max_new_tokens=4))
    assert got[0][0].token_ids == want


class BehaviourCheck(RewardScorer):
    """Exact match; on the way, checks each policy candidate's behaviour log-probs against a
    forward of the model the policy's generator holds (the module being trained: scoring
    comes before the step's update, so its weights are those the candidate was sampled with)."""

    name = "behaviour_check"

    def __init__(self, made: list, temperature: float):
        self.made, self.temperature = made, temperature
        self.checked, self.worst = 0, 0.0

    def score(self, samples):
        (gen,) = self.made
        for s in samples:
            c = s.candidate
            if c.source == "policy":
                want = reference_logprobs(
                    gen.model, gen.tokenizer, s.prompt.text, c.token_ids, self.temperature
                )
                got = torch.tensor(c.behaviour_logprobs)
                self.worst = max(self.worst, (want - got).abs().max().item())
                self.checked += 1
        return [float(s.completion.strip() == s.row["answer"]) for s in samples]


def _spy_on(monkeypatch) -> tuple[list, list]:
    """The PlainGenerate objects made, and the temperature of every generate call."""
    made, temperatures = [], []
    init, generate = PlainGenerate.__init__, PlainGenerate.generate

    @functools.wraps(init)  # the same signature: the trainer reads it
    def spy_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    @functools.wraps(generate)
    def spy_generate(self, prompts, n, sampling):
        temperatures.append(sampling.temperature)
        return generate(self, prompts, n, sampling)

    monkeypatch.setattr(PlainGenerate, "__init__", spy_init)
    monkeypatch.setattr(PlainGenerate, "generate", spy_generate)
    return made, temperatures


def _trained_as_sampled(result, generator) -> None:
    """The saved model is the module the generator ended up sampling with."""
    saved = AutoModelForCausalLM.from_pretrained(result.model_dir).state_dict()
    held = generator.model.state_dict()
    base = AutoModelForCausalLM.from_pretrained(ensure_builtin_model("tiny-arith-small"))
    assert all(torch.equal(saved[k], held[k]) for k in saved)
    assert any(not torch.equal(saved[k], v) for k, v in base.state_dict().items())


def test_policy_samples_through_the_plugin_named_in_a_recipe(monkeypatch, small_recipe):
    # the recipe names the generator; the trainer builds it from the entry point with the
    # module being trained, trains 3 steps (beside an `hf` peer), and evaluates through it
    monkeypatch.setenv("GRPO_ENSEMBLE_LOAD_PLUGINS", "plain_generate")
    plugins.reset_plugin_manager()
    made, temperatures = _spy_on(monkeypatch)
    checker = BehaviourCheck(made, 0.7)
    recipe = small_recipe(
        policy__generator="plain_generate",
        policy__sampling__temperature=0.7,
        train__steps=3,
        train__lr=1e-3,
    )
    result = train(recipe, reward_scorers=[(checker, 1.0)])
    assert [m["step"] for m in result.metrics] == [1, 2, 3]
    assert all(m["member/policy/candidates"] == 8 for m in result.metrics)
    assert len(made) == 1  # the policy's; the peer samples with `hf`
    assert checker.checked == 3 * 4 * 2 and checker.worst < 1e-5
    # 3 steps at the policy's temperature, and the evaluations before and after, greedy
    assert temperatures == [0.0, 0.7, 0.7, 0.7, 0.0]
    assert result.before is not None and result.after is not None
    _trained_as_sampled(result, made[0])


def test_policy_generator_object_from_the_python_api(monkeypatch, small_recipe):
    # a generator object with its own copy of the weights: handed the module being trained
    # when the run is built, it samples with the current weights at every step
    made, temperatures = _spy_on(monkeypatch)
    policy = PlainGenerate(str(ensure_builtin_model("tiny-arith-small")))
    own = policy.model
    checker = BehaviourCheck(made, 1.0)
    recipe = small_recipe(peers=[], train__steps=3, train__lr=1e-3, eval__before=False)
    result = train(recipe, generators={"policy": policy}, reward_scorers=[(checker, 1.0)])
    assert len(result.metrics) == 3 and policy.model is not own
    assert checker.checked == 3 * 4 * 2 and checker.worst < 1e-5
    assert temperatures == [1.0, 1.0, 1.0, 0.0]
    _trained_as_sampled(result, policy)


def test_the_loss_divides_by_the_temperature_the_policy_samples_at(small_recipe, tmp_path):
    from grpo_ensemble.trainer.setup import build_run

    run = build_run(small_recipe(policy__sampling__temperature=0.6), tmp_path)
    assert run.ensemble.policy.sampling.temperature == 0.6  # what its generator is handed
    assert run.settings.update.temperature == 0.6  # what the update's log-probs divide by


def test_a_policy_generator_without_sync_weights_is_refused(small_recipe):
    class Frozen(Generator):
        name = "frozen"

        def generate(self, prompts, n, sampling):
            raise NotImplementedError

    with pytest.raises(UserError, match=r"generators\['policy'\]: .* sync_weights\(model\)"):
        train(small_recipe(), generators={"policy": Frozen()})
