"""Any transformers causal LM as the policy or a peer: tiny models of five architectures
built from configs offline, with the built-in character tokenizer. Llama is the built-in
models'; here GPT-2 (learned absolute positions), Qwen2 (rotary, grouped-query attention),
GPT-NeoX (rotary on part of each head) and Bloom (ALiBi: no position embedding at all)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from grpo_ensemble import RewardScorer
from grpo_ensemble.models.loading import load_model
from grpo_ensemble.models.logprobs import TokenBatch, completion_logprobs
from grpo_ensemble.models.tiny import build_tokenizer
from grpo_ensemble.trainer.setup import build_run
from grpo_ensemble.trainer.step import grpo_step


def _configs(tok) -> dict:
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    ids.update(pad_token_id=tok.pad_token_id, vocab_size=len(tok))
    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    size.update(num_attention_heads=4, max_position_embeddings=64)
    return {
        "gpt2": (
            GPT2LMHeadModel,
            GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2, **ids),
        ),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(num_key_value_heads=2, **size, **ids)),
        "gpt_neox": (GPTNeoXForCausalLM, GPTNeoXConfig(rotary_pct=0.5, **size, **ids)),
        "bloom": (BloomForCausalLM, BloomConfig(hidden_size=32, n_layer=2, n_head=4, **ids)),
    }


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Each architecture saved in Hugging Face format with the tokenizer (seeded weights)."""
    tok, root = build_tokenizer(), tmp_path_factory.mktemp("archs")
    out = {}
    for name, (cls, config) in _configs(tok).items():
        torch.manual_seed(0)
        cls(config).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


class DigitsAndLogprobs(RewardScorer):
    """The share of a completion's characters that are digits (a reward that varies, so that
    random models get a learning signal); checks, on the way, every policy candidate's
    behaviour log-probs against a forward of the policy's current weights."""

    name = "digit_share"

    def __init__(self):
        self.model, self.tokenizer, self.worst, self.checked = None, None, 0.0, 0

    def score(self, samples):
        for s in samples:
            c = s.candidate
            if c.source == "policy" and c.token_ids:
                ids = self.tokenizer(s.prompt.text)["input_ids"]
                batch = TokenBatch.build([ids], [c.token_ids], self.tokenizer.pad_token_id)
                with torch.no_grad():
                    want = completion_logprobs(self.model, batch, 1.0)[0]
                got = torch.tensor(c.behaviour_logprobs)
                self.worst = max(self.worst, float((want - got).abs().max()))
                self.checked += 1
        return [sum(ch.isdigit() for ch in s.completion) / 5 for s in samples]


@pytest.mark.parametrize(
    "policy, peer",
    [("gpt2", "qwen2"), ("qwen2", "gpt2"), ("gpt_neox", "bloom"), ("bloom", "gpt_neox")],
)
def test_any_causal_lm_trains_as_policy_beside_a_peer_of_another(
    model_dirs, small_recipe, tmp_path, policy, peer
):
    recipe = small_recipe(
        policy__model=str(model_dirs[policy]),
        peers__0__model=str(model_dirs[peer]),
        train__lr=1e-2,
    )
    scorer = DigitsAndLogprobs()
    run = build_run(recipe, tmp_path, reward_scorers=[(scorer, 1.0)])
    scorer.model, scorer.tokenizer = run.engine.module, run.tokenizer
    start = {k: v.clone() for k, v in run.engine.module.state_dict().items()}
    rows = [grpo_step(run, step) for step in (1, 2)]
    assert all(r["member/policy/candidates"] == r["member/strong/candidates"] == 8 for r in rows)
    assert scorer.checked == 16 and scorer.worst < 1e-4  # sampling's log-probs are the model's
    assert any(r["advantage_abs_mean"] > 0 for r in rows)
    after = run.engine.module.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in start.items())  # the policy learned


def test_trust_remote_code_is_said(model_dirs, capsys, monkeypatch):
    from grpo_ensemble import dist

    monkeypatch.setattr(dist, "warned", set())
    model, _ = load_model(str(model_dirs["gpt2"]), "peers.0.model", trust_remote_code=True)
    assert isinstance(model, GPT2LMHeadModel)
    assert capsys.readouterr().err == (
        f"warning: peers.0.trust_remote_code: Python code shipped with "
        f"{str(model_dirs['gpt2'])!r} runs in this process; only load models whose code you "
        "trust\n"
    )
    load_model(str(model_dirs["gpt2"]), "peers.0.model")  # off: nothing said
    assert capsys.readouterr().err == ""
    assert type(AutoModelForCausalLM.from_pretrained(model_dirs["bloom"])) is BloomForCausalLM
