"""The hf generator, log-prob computation, and the ensemble's pooling and re-tokenization."""

import pytest
import torch

from grpo_ensemble.engine.hf import HFGenerator
from grpo_ensemble.models.loading import load_model
from grpo_ensemble.models.logprobs import TokenBatch, completion_logprobs, selective_log_softmax
from grpo_ensemble.plugins.interfaces import Generator, SamplingParams
from grpo_ensemble.rollout.ensemble import Ensemble, Member
from grpo_ensemble.types import Candidate, Prompt


@pytest.fixture(scope="module")
def small():
    return load_model("builtin:tiny-arith-small", "policy.model")


PROMPTS = [Prompt("12+7=", {"answer": "19"}), Prompt("99+99=", {"answer": "198"})]


def test_selective_log_softmax_equals_full():
    torch.manual_seed(0)
    logits = torch.randn(5, 3, 11)
    index = torch.randint(0, 11, (5, 3))
    full = torch.log_softmax(logits, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(selective_log_softmax(logits, index, chunk_rows=2), full, atol=1e-6)


def test_token_batch_layout():
    b = TokenBatch.build([[1, 5], [1, 6, 7]], [[8, 2], [9]], pad_id=0)
    assert b.input_ids.tolist() == [[0, 1, 5, 8, 2], [1, 6, 7, 9, 0]]
    assert b.attention_mask.tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert b.completion_mask.tolist() == [[1.0, 1.0], [1.0, 0.0]]


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 0)])
def test_behaviour_logprobs_equal_recomputed_logprobs(small, temperature, top_k):
    model, tok = small
    torch.manual_seed(1)
    gen = HFGenerator(model, tok)
    cands = gen.generate(PROMPTS, 3, SamplingParams(temperature, 1.0, top_k, 5))
    assert [len(c) for c in cands] == [3, 3]
    flat = [c for cs in cands for c in cs]
    for c in flat:  # cut after the first EOS, which is kept
        assert c.finished == (c.token_ids[-1] == tok.eos_token_id)
        assert tok.eos_token_id not in c.token_ids[:-1]
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
    prompt_ids = [tok(p.text)["input_ids"] for p in PROMPTS for _ in range(3)]
    batch = TokenBatch.build(prompt_ids, [c.token_ids for c in flat], tok.pad_token_id)
    with torch.no_grad():
        recomputed = completion_logprobs(model, batch, temperature)
    for i, c in enumerate(flat):
        n = len(c.token_ids)
        assert torch.allclose(recomputed[i, :n], torch.tensor(c.behaviour_logprobs), atol=1e-4), (
            c.text,
            recomputed[i, :n],
            c.behaviour_logprobs,
        )


def test_same_seed_same_samples(small):
    model, tok = small
    gen = HFGenerator(model, tok)
    params = SamplingParams(1.0, 0.9, 5, 5)
    torch.manual_seed(3)
    a = gen.generate(PROMPTS, 4, params)
    torch.manual_seed(3)
    b = gen.generate(PROMPTS, 4, params)
    assert [[c.token_ids for c in g] for g in a] == [[c.token_ids for c in g] for g in b]


class TextOnly(Generator):
    """A text-only peer (no tokenizer), as an API-backed generator would be."""

    name = "text_only"

    def generate(self, prompts, n, sampling):
        return [[Candidate(str(p.fields["answer"]), [], "") for _ in range(n)] for p in prompts]


def test_ensemble_pools_tags_and_retokenizes(small):
    model, tok = small
    members = [
        Member("policy", HFGenerator(model, tok), 2, SamplingParams(max_new_tokens=5)),
        Member("oracle", TextOnly(), 3, SamplingParams()),
    ]
    groups = Ensemble(members, tok).generate(PROMPTS)
    assert [len(g.candidates) for g in groups] == [5, 5]
    assert [c.source for c in groups[0].candidates] == ["policy"] * 2 + ["oracle"] * 3
    peer = groups[1].candidates[-1]
    # re-tokenized with the policy's tokenizer, EOS appended, no behaviour log-probs
    assert peer.token_ids == tok("198", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert peer.behaviour_logprobs is None


def test_a_peers_completion_is_cut_at_its_max_new_tokens_of_the_policys_tokens(small):
    model, tok = small
    members = [
        Member("policy", HFGenerator(model, tok), 1, SamplingParams(max_new_tokens=5)),
        Member("oracle", TextOnly(), 1, SamplingParams(max_new_tokens=3)),
    ]
    groups = Ensemble(members, tok).generate(PROMPTS)
    short, long = groups[0].candidates[1], groups[1].candidates[1]
    # "19" + EOS fits 3 tokens: kept whole
    assert short.token_ids == tok("19", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert short.finished and short.text == "19"
    # "198" + EOS does not: cut at 3 tokens, as the policy's own completion would be
    ids = tok("198", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(ids) > 3
    assert long.token_ids == ids[:3] and not long.finished
    assert long.text == tok.decode(ids[:3], skip_special_tokens=True)


def test_greedy_generation_is_deterministic(small):
    model, tok = small
    gen = HFGenerator(model, tok)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=5)
    a = [c[0].text for c in gen.generate(PROMPTS, 1, greedy)]
    torch.manual_seed(123)
    assert a == [c[0].text for c in gen.generate(PROMPTS, 1, greedy)]
