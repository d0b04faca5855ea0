"""Log-probs of completions with each distinct prompt run once (its keys and values repeated
for the group's rows) against the plain batch of whole rows: values and gradients."""

import pytest
import torch
from tiny_llms import build

import grpo_ensemble.models.logprobs as logprobs_module
from grpo_ensemble.models.logprobs import TokenBatch, completion_logprobs, shared_prompt_plan


def group_batch() -> TokenBatch:
    """Three prompts of different lengths (left padding differs), 3, 2 and 1 rows each, with
    completions of different lengths (right padding), ids below the test models' vocab."""
    prompts = [[1, 5, 6, 7], [1, 8], [1, 9, 10]]
    rows = [0, 1, 0, 2, 1, 0]
    completions = [[3, 4, 2], [5], [6, 7, 8, 9, 2], [10, 11], [12, 13, 14], [15, 2]]
    return TokenBatch.build([prompts[r] for r in rows], completions, pad_id=0)


@pytest.fixture
def always_share(monkeypatch):
    monkeypatch.setattr(logprobs_module, "SHARE_MIN", {"cpu": 0, "cuda": 0})


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gpt2"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_shared_prompt_equals_whole_rows(kind, temperature, always_share):
    model = build(kind).train()  # no dropout in build(): training mode changes nothing
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    batch = group_batch()
    first, inverse = shared_prompt_plan(model, batch)
    assert len(first) == 3  # distinct prompts
    assert inverse[0] == inverse[2] == inverse[5] and inverse[1] == inverse[4]
    assert len({int(inverse[0]), int(inverse[1]), int(inverse[3])}) == 3
    for u, row in enumerate(first.tolist()):
        assert inverse[row] == u
    grads = []
    values = []
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        logp = completion_logprobs(model, batch, temperature, share=share)
        weights = torch.linspace(-1, 1, logp.numel()).view_as(logp)  # a loss that uses all
        (logp * weights * batch.completion_mask).sum().backward()
        values.append(logp.detach() * batch.completion_mask)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert torch.allclose(values[0], values[1], atol=2e-6, rtol=0)
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-6, rtol=1e-5), name
    assert sum(float(g.abs().sum()) for g in grads[0].values()) > 0


def test_plain_forward_where_sharing_does_not_fit_or_pay(monkeypatch):
    batch = group_batch()
    model = build("llama")
    # default threshold: 3 repeated prompt rows of 4 columns on a 20k-parameter model is far
    # too little arithmetic to pay for a second forward call
    assert shared_prompt_plan(model, batch) is None
    monkeypatch.setattr(logprobs_module, "SHARE_MIN", {"cpu": 0, "cuda": 0})
    assert shared_prompt_plan(model, batch) is not None
    assert shared_prompt_plan(build("mistral-sliding"), batch) is None  # windowed attention
    distinct = TokenBatch.build([[1, 5], [1, 6]], [[3, 4], [5, 6]], pad_id=0)
    assert shared_prompt_plan(model, distinct) is None  # nothing shared
    one_token = TokenBatch.build([[1, 5], [1, 5]], [[3], [4]], pad_id=0)
    assert shared_prompt_plan(model, one_token) is None
    model.train()
    model.gradient_checkpointing_enable()  # transformers drops the cache in checkpointed layers
    assert shared_prompt_plan(model, batch) is None
    model.eval()
    assert shared_prompt_plan(model, batch) is not None  # no-grad passes still share


def test_threshold_counts_saved_prompt_positions(monkeypatch):
    model = build("llama")
    params = sum(p.numel() for p in model.parameters())
    batch = group_batch()  # 6 rows, 3 distinct prompts, 4 prompt columns: 12 positions saved
    monkeypatch.setattr(logprobs_module, "SHARE_MIN", {"cpu": 12 * params, "cuda": 0})
    assert shared_prompt_plan(model, batch) is not None
    monkeypatch.setattr(logprobs_module, "SHARE_MIN", {"cpu": 12 * params + 1, "cuda": 0})
    assert shared_prompt_plan(model, batch) is None


def test_checkpointing_is_read_without_a_deprecation_warning(always_share):
    import warnings

    from grpo_ensemble.models.logprobs import checkpointing

    model = build("llama").train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers' old name warns (FutureWarning)
        assert checkpointing(model) is False
        assert shared_prompt_plan(model, group_batch()) is not None
        model.activation_checkpointing_enable()
        assert checkpointing(model) is True
        # transformers turns the KV cache off in checkpointed layers: no shared prompt then
        assert shared_prompt_plan(model, group_batch()) is None
    assert checkpointing(torch.nn.Linear(2, 2)) is False  # not a transformers model
