"""Tiny causal LMs of several architectures built from configs, with the helpers the decoder,
replay and log-prob tests share (found on sys.path through the tests' conftest folder)."""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import grpo_ensemble.engine.decode as decode_module

SHAPE = dict(
    vocab_size=23,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention: 2 query heads per key/value head
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def build(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SHAPE, rope_theta=500.0))
    elif kind == "qwen2":  # biases on q, k, v
        model = Qwen2ForCausalLM(Qwen2Config(**SHAPE, tie_word_embeddings=False))
    elif kind == "llama-dynamic":  # rotary scaling that depends on the length so far
        rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500.0}
        model = LlamaForCausalLM(LlamaConfig(**SHAPE, rope_parameters=rope))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=None))
    elif kind == "mistral-sliding":  # a sliding window: neither fast path applies
        model = MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=3))
    elif kind == "gpt2":  # another architecture: the model's own forward
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=23,
                n_embd=32,
                n_layer=2,
                n_head=4,
                n_positions=64,
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=0,
            )
        )
    # RMS norm weights other than 1: the lean step folds them into its stacked products
    gains = torch.Generator().manual_seed(5)
    for m in model.modules():
        if type(m).__name__ in decode_module.RMS_NORMS:
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=gains) + 0.5)
    return model.eval()


def left_padded(b: int = 5, p: int = 6):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 23, (b, p), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 2, 4, 1, 0][:b]):
        ids[row, :pad], mask[row, :pad] = 0, 0
    return ids, mask


class LowRank(torch.nn.Module):
    """A projection with a low-rank adapter (as LoRA): not a plain `Linear`."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.down = torch.nn.Linear(base.in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, base.out_features, bias=False)
        self.out_features = base.out_features

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def use_columns(monkeypatch, columns: bool) -> None:
    """The lean step in column layout (hidden, B) or row layout (B, hidden), whatever the
    size (the tests' models are below the size where columns pay)."""
    monkeypatch.setattr(decode_module, "COLUMNS_MIN", {"cpu": 0} if columns else {})
