"""The per-token forward of the sampling loop: a preallocated KV cache, and a lean decode step
for the Llama family.

Two costs of decoding through a transformers model's `forward` that are not arithmetic:

- its default cache concatenates each new key and value onto the whole cache, copying all of
  it at every token (`GrowingLayer` writes in place into buffers allocated once);
- every call runs the model's general machinery: keyword plumbing through decorators, an
  attention mask built for the whole cache, cache bookkeeping, the attention dispatch. On a
  CPU with a small model, or on a GPU where kernels are short, that costs more than the
  matrix products.

For the Llama family (Llama, Mistral, Qwen2: pre-norm decoder layers, rotary attention, gated
MLP) `LeanDecoder` runs the decode step itself. It calls the model's own modules (embedding,
projections, norms, MLP, rotary embedding, LM head) and does only the attention by hand, with
the operations of transformers' `eager` attention. Any other model, or a model whose weights
are managed by ZeRO-3, decodes through its own `forward`: ZeRO-3's module hooks gather and
prefetch weights with the other ranks at module calls, even while the weights are gathered
whole, so ranks that decode different numbers of tokens through the modules one by one would
wait on each other for good.
tests/test_decode.py checks both against the model's `forward`.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer

# decoder layers whose forward is: x + attn(norm1(x)), then x + mlp(norm2(x)), with rotary
# q/k, full attention and no extra scaling of embeddings or logits
LLAMA_FAMILY = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"}

# LeanDecoder stacks each layer's q/k/v and gate/up weights into one product (fewer, larger
# operations: what matters where a token's time is mostly per-operation overhead) for models up
# to this size; the stacked copy costs memory about the model's size while sampling
FUSE_MAX_BYTES = 256 * 2**20


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer with room for `room` positions allocated at its first
    update. Each update writes in place and returns views of the filled part."""

    room = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self._alloc(key_states, value_states, max(self.room, key_states.shape[-2]))
        self.filled = 0

    def _alloc(self, k: torch.Tensor, v: torch.Tensor, room: int) -> None:
        b, h = k.shape[:2]
        self.key_buf = k.new_empty((b, h, room, k.shape[-1]))
        self.value_buf = v.new_empty((b, h, room, v.shape[-1]))

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.filled + key_states.shape[-2]
        if end > self.key_buf.shape[-2]:  # more than planned: grow, keeping what is there
            old_k, old_v = self.key_buf, self.value_buf
            self._alloc(old_k, old_v, 2 * end)
            self.key_buf[:, :, : self.filled] = old_k[:, :, : self.filled]
            self.value_buf[:, :, : self.filled] = old_v[:, :, : self.filled]
        self.key_buf[:, :, self.filled : end] = key_states
        self.value_buf[:, :, self.filled : end] = value_states
        self.filled = end
        self.keys = self.key_buf[:, :, :end]
        self.values = self.value_buf[:, :, :end]
        return self.keys, self.values


def full_attention_only(model: torch.nn.Module) -> bool:
    """True when every layer attends to the whole past (no sliding window, no linear
    attention), so that `GrowingLayer` can hold its cache."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        return False
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    except Exception:  # a config this transformers cannot read that way: keep the default
        return False
    return bool(types) and all(t == "full_attention" for t in types)


def cache_name(model: torch.nn.Module) -> str | None:
    """The keyword the model's forward takes its KV cache by (`cache` from transformers 5.2x
    on, `past_key_values` before), or None."""
    params = inspect.signature(model.forward).parameters
    return next((n for n in ("cache", "past_key_values") if n in params), None)


def cache_of(out):
    """The KV cache a forward returned, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def distinct_rows(*columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first (U,), inverse (B,)) for the distinct rows of the (B, ·) tensors side by side (a
    group's prompt, with its padding): row `first[u]` is one of distinct row u, and row i is
    distinct row `inverse[i]`."""
    key = torch.cat(columns, dim=1)
    distinct, inverse = torch.unique(key, dim=0, return_inverse=True)
    b = key.shape[0]
    first = torch.full((len(distinct),), b, dtype=torch.long, device=key.device)
    rows = torch.arange(b, device=key.device)
    return first.scatter_reduce(0, inverse, rows, "amin"), inverse


def repeat_rows(cache: Cache, prefilled: Cache, inverse: torch.Tensor) -> Cache:
    """Fill `cache` with the keys and values of `prefilled` (one row per distinct prompt), row i
    taking distinct row `inverse[i]`; returns `cache`. Differentiable: a row's gradient flows
    back to its prompt's keys and values, summed over the rows that share it."""
    for i, layer in enumerate(prefilled.layers):
        cache.update(layer.keys.index_select(0, inverse), layer.values.index_select(0, inverse), i)
    return cache


def preallocated_cache(model: torch.nn.Module, room: int) -> dict:
    """Keyword arguments that give a forward a cache of `GrowingLayer`s with `room` positions,
    or {} (the model's default cache) where such a cache does not fit the model."""
    name = cache_name(model)
    if name is None or not full_attention_only(model):
        return {}
    layer = type("GrowingLayer", (GrowingLayer,), {"room": room})
    return {name: Cache(layer_class_to_replicate=layer)}


class LeanDecoder:
    """The one-token forward of a Llama-family model over a cache of `GrowingLayer`s filled by
    the model's own prefill. `full_mask` (B, S) is the attention mask of every position there
    will be (1 for real tokens, 0 for left padding)."""

    def __init__(self, model: torch.nn.Module, cache: Cache, full_mask: torch.Tensor):
        self.model = model
        self.base = model.model
        self.layers = list(self.base.layers)
        self.cache_layers = list(cache.layers)
        dtype = self.base.embed_tokens.weight.dtype
        blocked = torch.finfo(dtype).min  # as transformers' eager mask: not -inf
        bias = torch.zeros(full_mask.shape, dtype=dtype, device=full_mask.device)
        self.bias = bias.masked_fill(full_mask == 0, blocked)[:, None, None, :]  # (B,1,1,S)
        self.rope = self._rope_table(full_mask.shape[1], dtype, full_mask.device)
        small = sum(p.numel() * p.element_size() for p in model.parameters()) <= FUSE_MAX_BYTES
        self.fused = [_fused(layer) if small else (None, None) for layer in self.layers]

    def _rope_table(self, n: int, dtype, device):
        """(cos, signed sin), each (n, D), of positions 0 … n−1, or None where the rotary
        embedding depends on more than the position (dynamic scaling). With the sin's first
        half negated, `rotate_half(x) * sin` is `x.roll(D/2) * signed sin`, bit for bit."""
        rotary = self.base.rotary_emb
        kind = str(getattr(rotary, "rope_type", "default"))
        if "dynamic" in kind or kind == "longrope":
            return None
        probe = torch.zeros(1, dtype=dtype, device=device)  # gives the dtype and device only
        cos, sin = rotary(probe, torch.arange(n, device=device)[None])  # (1, n, D)
        sign = torch.ones(cos.shape[-1], dtype=dtype, device=device)
        sign[: cos.shape[-1] // 2] = -1
        return cos[0], sin[0] * sign

    @classmethod
    def build(cls, model, cache, full_mask) -> LeanDecoder | None:
        """A decoder for `model` over the prefilled `cache`, or None where the model needs its
        own forward (another architecture, ZeRO-3 weights, a cache other than ours)."""
        base = getattr(model, "model", None)
        if base is None or not hasattr(model, "lm_head"):
            return None
        layers = getattr(base, "layers", None)
        if layers is None or not all(type(x).__name__ in LLAMA_FAMILY for x in layers):
            return None
        if not all(hasattr(base, a) for a in ("embed_tokens", "norm", "rotary_emb")):
            return None
        if getattr(model.config, "pretraining_tp", 1) not in (None, 1):
            return None
        if not isinstance(cache, Cache) or len(cache.layers) != len(layers):
            return None
        if not all(isinstance(x, GrowingLayer) for x in cache.layers):
            return None
        if any(hasattr(p, "ds_id") for p in model.parameters()):  # ZeRO-3: see the module
            return None
        return cls(model, cache, full_mask)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of the next token after `tokens` (B,) at `positions` (B, 1)."""
        x = self.base.embed_tokens(tokens[:, None])  # (B, 1, hidden)
        if self.rope is not None:
            cos, sin = self.rope[0][positions], self.rope[1][positions]  # (B, 1, head_dim)
        else:
            cos, sin = self.base.rotary_emb(x, positions)
            sin = torch.cat([-sin[..., : sin.shape[-1] // 2], sin[..., sin.shape[-1] // 2 :]], -1)
        rope = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
        layers = zip(self.layers, self.cache_layers, self.fused, strict=True)
        for layer, kv, (qkv, gate_up) in layers:
            h = layer.input_layernorm(x)
            x = x + self._attend(layer.self_attn, h, rope, kv, qkv)
            h = layer.post_attention_layernorm(x)
            if gate_up is None:
                x = x + layer.mlp(h)
            else:  # as the MLP's forward, its gate and up projections in one product
                gate, up = F.linear(h, *gate_up).chunk(2, dim=-1)
                x = x + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
        return self.model.lm_head(self.base.norm(x))[:, -1]

    def _attend(self, attn, h: torch.Tensor, rope, kv: GrowingLayer, qkv) -> torch.Tensor:
        """Self-attention of one new token per row, as transformers' eager attention."""
        b, d = h.shape[0], attn.head_dim
        if qkv is None:
            q = attn.q_proj(h).view(b, -1, 1, d)  # (B, H, 1, D): one position, so no transpose
            k = attn.k_proj(h).view(b, -1, 1, d)  # (B, KVH, 1, D)
            v = attn.v_proj(h).view(b, -1, 1, d)
            q, k = _rotate(q, *rope), _rotate(k, *rope)
        else:  # the three projections in one product; q and k rotated together
            heads = attn.q_proj.out_features // d
            kv_heads = attn.k_proj.out_features // d
            both = F.linear(h, *qkv).view(b, -1, 1, d)  # (B, H + 2·KVH, 1, D)
            qk = _rotate(both[:, : heads + kv_heads], *rope)
            q, k, v = qk[:, :heads], qk[:, heads:], both[:, heads + kv_heads :]
        keys, values = kv.update(k, v)  # (B, KVH, n, D)
        n, kv_heads = keys.shape[2], keys.shape[1]
        # query head i reads key/value head i // groups, as transformers' repeat_kv
        q = q.reshape(b, kv_heads, -1, d)  # (B, KVH, groups, D)
        scores = torch.matmul(q, keys.transpose(2, 3)) * attn.scaling + self.bias[..., :n]
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(weights, values)  # (B, KVH, groups, D)
        return attn.o_proj(out.reshape(b, 1, -1))


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as transformers' `x * cos + rotate_half(x) * sin`, the same floats."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def _fused(layer) -> tuple:
    """((weight, bias) of q, k, v stacked, (weight, bias) of gate and up stacked) for one
    decoder layer, each None where its projections do not stack (another MLP, mixed biases)."""

    def stack(*linears):
        if not all(isinstance(m, torch.nn.Linear) for m in linears):
            return None
        biases = [m.bias for m in linears]
        if any(b is None for b in biases) and not all(b is None for b in biases):
            return None
        weight = torch.cat([m.weight.detach() for m in linears])
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        return weight, bias

    attn, mlp = layer.self_attn, layer.mlp
    qkv = stack(attn.q_proj, attn.k_proj, attn.v_proj)
    parts = ("gate_proj", "up_proj", "down_proj", "act_fn")
    gate_up = stack(mlp.gate_proj, mlp.up_proj) if all(hasattr(mlp, a) for a in parts) else None
    return qkv, gate_up
