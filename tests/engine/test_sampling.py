"""Our sampling loop: the distribution of `generate`, rows that depend only on their seed."""

import math

import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from grpo_ensemble.engine.hf import HFGenerator
from grpo_ensemble.engine.sampling import gumbel_noise, process_logits, row_keys, sample
from grpo_ensemble.models.loading import load_model
from grpo_ensemble.plugins.interfaces import SamplingParams
from grpo_ensemble.types import Prompt


@pytest.fixture(scope="module")
def small():
    return load_model("builtin:tiny-arith-small", "policy.model")


PROMPTS = [Prompt("12+7="), Prompt("99+99="), Prompt("3+4=")]


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.8)])
def test_processed_distribution_equals_transformers_warpers(temperature, top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(4, 10) * 2
    ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    ours = process_logits(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    assert torch.allclose(ours, torch.log_softmax(ref, -1), atol=1e-6)


def test_gumbel_max_draws_follow_the_distribution():
    """40 000 rows with seeds 0…39 999 draw from p = softmax(logits); the chi-square statistic
    of the counts (5 categories, 4 degrees of freedom) is below its 0.1% critical value 18.47.
    The seeds are fixed, so the test is deterministic."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    p = torch.softmax(logits, -1)
    n = 40_000
    keys = row_keys(range(n))
    draws = (torch.log(p) + gumbel_noise(keys, t=3, vocab=5)).argmax(-1)
    counts = torch.bincount(draws, minlength=5).double()
    expected = p.double() * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 18.47, (counts.tolist(), expected.tolist(), chi2)


def test_noise_is_a_pure_function_of_seed_and_position():
    a = gumbel_noise(row_keys([5, 6, 7]), 2, 9)
    b = gumbel_noise(row_keys([7, 5]), 2, 9)
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1])
    assert not torch.equal(a[0], gumbel_noise(row_keys([5]), 3, 9)[0])  # another position
    assert not torch.equal(a[0], a[1])  # another seed
    assert torch.isfinite(a).all()


def test_greedy_equals_transformers_generate(small):
    model, tok = small
    enc = tok([p.text for p in PROMPTS], return_tensors="pt", padding=True)
    ref = model.generate(**enc, do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id)[
        :, enc["input_ids"].shape[1] :
    ]
    ours, logps = sample(
        model, enc["input_ids"], enc["attention_mask"], 6, tok.eos_token_id, tok.pad_token_id, 0.0
    )
    assert logps is None
    n = ours.shape[1]
    assert torch.equal(ours, ref[:, :n])
    assert (ref[:, n:] == tok.pad_token_id).all()  # generate only padded after every EOS


def test_a_prompts_candidates_do_not_depend_on_its_batch(small):
    """The property that makes results independent of the number of ranks."""
    model, tok = small
    gen = HFGenerator(model, tok)
    params = SamplingParams(1.0, 0.9, 0, 6, seeds=(11, 22, 33))
    together = gen.generate(PROMPTS, 3, params)
    alone = gen.generate(PROMPTS[2:], 3, SamplingParams(1.0, 0.9, 0, 6, seeds=(33,)))
    small_batches = HFGenerator(model, tok, batch_size=2).generate(PROMPTS, 3, params)
    ids = [[c.token_ids for c in g] for g in together]
    assert ids[2] == [c.token_ids for c in alone[0]]
    assert ids == [[c.token_ids for c in g] for g in small_batches]
    assert len({tuple(x) for g in ids for x in g}) > 3  # the candidates are not all the same


def test_unseeded_sampling_follows_torch_seed(small):
    model, tok = small
    gen = HFGenerator(model, tok)
    params = SamplingParams(1.0, 1.0, 0, 6)
    torch.manual_seed(4)
    a = gen.generate(PROMPTS, 2, params)
    torch.manual_seed(4)
    b = gen.generate(PROMPTS, 2, params)
    assert [[c.token_ids for c in g] for g in a] == [[c.token_ids for c in g] for g in b]


def test_hash_keys_cover_64_bit_seeds():
    keys = row_keys([0, 1, 2**32, 2**32 + 1, 2**61])
    assert len(set(keys.tolist())) == 5
    assert all(0 <= k < 2**32 for k in keys.tolist())
    assert math.isfinite(float(gumbel_noise(keys, 0, 3).sum()))


def test_min_new_tokens_equals_generate_and_fixes_the_length(small):
    model, tok = small
    enc = tok([p.text for p in PROMPTS], return_tensors="pt", padding=True)
    args = (model, enc["input_ids"], enc["attention_mask"], 7, tok.eos_token_id, tok.pad_token_id)
    ref = model.generate(
        **enc, do_sample=False, max_new_tokens=7, min_new_tokens=7, pad_token_id=tok.pad_token_id
    )[:, enc["input_ids"].shape[1] :]
    greedy, _ = sample(*args, 0.0, min_new_tokens=7)
    assert torch.equal(greedy, ref)
    sampled, logps = sample(*args, 1.0, seeds=[1, 2, 3], min_new_tokens=7)
    assert sampled.shape == (3, 7) and not (sampled == tok.eos_token_id).any()
    assert torch.isfinite(logps).all()


def test_noise_of_many_positions_at_once_equals_one_at_a_time():
    keys = row_keys([5, 2**40 + 3, 0])
    block = gumbel_noise(keys, range(6), 11)
    assert block.shape == (6, 3, 11)
    for t in range(6):
        assert torch.equal(block[t], gumbel_noise(keys, t, 11))


def test_sampling_is_the_same_with_noise_drawn_per_position(small, monkeypatch):
    import grpo_ensemble.engine.sampling as sampling_module

    model, tok = small
    enc = tok(["12+7=", "99+99="], return_tensors="pt", padding=True)
    args = (model, enc["input_ids"], enc["attention_mask"], 6, tok.eos_token_id)
    kw = dict(pad_id=tok.pad_token_id, seeds=[3, 4], top_p=0.9)
    at_once = sample(*args, **kw)
    monkeypatch.setattr(sampling_module, "NOISE_AT_ONCE", 0)  # one position at a time
    per_position = sample(*args, **kw)
    assert torch.equal(at_once[0], per_position[0]) and torch.equal(at_once[1], per_position[1])
