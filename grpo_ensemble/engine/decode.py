"""The per-token forward of the sampling loop: a preallocated KV cache, and a lean decode step
for the Llama family.

Two costs of decoding through a transformers model's `forward` that are not arithmetic:

- its default cache concatenates each new key and value onto the whole cache, copying all of
  it at every token (`kvcache.GrowingLayer` writes in place into buffers allocated once);
- every call runs the model's general machinery: keyword plumbing through decorators, an
  attention mask built for the whole cache, cache bookkeeping, the attention dispatch. On a
  CPU with a small model, or on a GPU where kernels are short, that costs more than the
  matrix products.

For the Llama family (Llama, Mistral, Qwen2: pre-norm decoder layers, rotary attention, gated
MLP) `LeanDecoder` runs the decode step itself, with the hidden states in column layout (see
the class). It uses the model's own weights and modules (embedding, projections, norms, MLP
activation, rotary embedding, LM head), computes the RMS norms and plain `Linear` products
itself (the same operations, on columns), and the attention with the operations of
transformers' `eager` attention. Any other model decodes through its own `forward`.

ZeRO-3: its module hooks gather and prefetch weights with the other ranks at module calls,
even while the weights are gathered whole, so ranks that decode different numbers of tokens
through the modules one by one would wait on each other for good. The lean step therefore
runs under ZeRO-3 only where it calls no module (`hook_free`: plain embedding, projections
and RMS norms, computed from their weights, and the weights gathered whole, as with
`generation_weights: gather`); otherwise such a model decodes through its own forward.
tests/engine/test_decode.py checks both against the model's `forward`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

from ..models.kvcache import GrowingLayer
from ..models.zero import zero3_managed
from .graphs import GraphedCall
from .recording import Recording, replay_pays

# decoder layers whose forward is: x + attn(norm1(x)), then x + mlp(norm2(x)), with rotary
# q/k, full attention and no extra scaling of embeddings or logits
LLAMA_FAMILY = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"}

# LeanDecoder stacks each layer's q/k/v and gate/up weights into one product (fewer, larger
# operations: what matters where a token's time is mostly per-operation overhead). The stacked
# copy costs memory (about three quarters of the model) while sampling, so on a CPU only for
# models up to FUSE_MAX_BYTES, whose tokens are mostly that overhead; on a GPU, where decoding
# waits on kernel launches, wherever the model is at most FUSE_GPU_SHARE of the device's
# memory (see docs/performance.md)
FUSE_MAX_BYTES = 256 * 2**20
FUSE_GPU_SHARE = 0.1

# On a GPU the lean step's kernels are short and the GPU waits on their launches (see
# docs/performance.md). There the step runs as a CUDA graph, captured once per `sample` (whose
# cache and recording buffers it writes) and replayed for every token after the first. A graph
# replays fixed shapes and addresses, so the captured step is the "static" one (`LeanDecoder`,
# `static=True`): it writes the cache and the recording at positions held in device tensors,
# and attends over the cache's whole room with the positions not written yet masked (zeros
# there, so they weigh exactly nothing). Devices where the sampling loop asks for the static
# step, and from how many new tokens (a capture costs about one step's launches and the graph's
# instantiation):
STATIC_DEVICES = {"cuda"}
STATIC_MIN_TOKENS = 16


def fuse_pays(model_bytes: int, device_type: str, device_memory: int | None = None) -> bool:
    """Whether the lean step stacks q/k/v and gate/up for a model of `model_bytes` on a device
    of this type (with `device_memory` bytes, for a GPU)."""
    if device_type == "cuda" and device_memory:
        return model_bytes <= FUSE_GPU_SHARE * device_memory
    return model_bytes <= FUSE_MAX_BYTES


# LeanDecoder keeps a step's hidden states in column layout, (hidden, B), on a CPU where
# rows × hidden² reaches this (see the class); in row layout, (B, hidden), below it and on
# other devices
COLUMNS_MIN = {"cpu": 100_000}


class LeanDecoder:
    """The one-token forward of a Llama-family model over a cache of `GrowingLayer`s filled by
    the model's own prefill. `full_mask` (B, S) is the attention mask of every position there
    will be (1 for real tokens, 0 for left padding).

    Layout. In column layout the hidden states are (hidden, B) and every projection is
    `W @ h`, the weight on the left; in row layout they are (B, hidden) and a projection is
    `h @ Wᵀ`, as `Linear` computes it. A CPU's matrix-product routine (MKL) runs `W @ h`
    faster than `h @ Wᵀ` for tens of rows and a width of a few hundred, and slower for small
    products, hence `COLUMNS_MIN` (see docs/performance.md). Both layouts run the same
    operations (norms, rotary embedding, MLP, the attention as transformers' `eager`
    attention); in columns the sums of the norm and of the products may round in another
    order, so the logits agree with the model's forward to float rounding, not bit for bit.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cache: Cache,
        full_mask: torch.Tensor,
        recording: Recording | None = None,
        static: bool = False,
    ):
        self.model = model
        self.base = model.model
        self.layers = list(self.base.layers)
        self.cache_layers = list(cache.layers)
        dtype = self.base.embed_tokens.weight.dtype
        device = full_mask.device
        blocked = torch.finfo(dtype).min  # as transformers' eager mask: not -inf
        bias = torch.zeros(full_mask.shape, dtype=dtype, device=device)
        self.bias = bias.masked_fill(full_mask == 0, blocked)[:, None, None, :]  # (B,1,1,S)
        self.head_bias = None  # the same per key/value head, made at the first step
        width = self.base.embed_tokens.weight.shape[1]
        least = COLUMNS_MIN.get(device.type)
        self.columns = least is not None and full_mask.shape[0] * width**2 >= least
        self.rope = self._rope_table(full_mask.shape[1], dtype, device)
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        memory = (
            torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        )
        fuse = fuse_pays(size, device.type, memory)
        self.fused = [_fused(layer) if fuse else (None, None) for layer in self.layers]
        # recorded only where the update's forward can be replayed from it (replay.py)
        self.recording = None
        ok = self.rope is not None and hook_free(model) and not zero3_managed(model)
        rows = full_mask.shape[0]
        if recording is not None and ok and replay_pays(model, rows, recording.steps_max):
            recording.start(model, self.columns, rows)
            self.recording = recording
        # the static step (see STATIC_DEVICES): row layout, positions from the rotary table
        room = getattr(self.cache_layers[0], "key_buf", None)
        self.static = (
            static
            and self.rope is not None
            and not self.columns
            and room is not None
            and room.shape[2] == full_mask.shape[1]  # a cache that did not grow past its plan
        )
        if self.static:
            self._static_setup(device)

    def _static_setup(self, device) -> None:
        """State of the static step: the next cache position and recording token as device
        tensors (the step advances them itself), the cache's unwritten positions zeroed."""
        first = self.cache_layers[0]
        self.slot = torch.full((1,), first.filled, dtype=torch.long, device=device)
        self.token = torch.zeros(1, dtype=torch.long, device=device)  # the recording's next
        for kv in self.cache_layers:
            kv.key_buf[:, :, kv.filled :].zero_()
            kv.value_buf[:, :, kv.filled :].zero_()
        self.key_at = torch.arange(first.key_buf.shape[2], device=device)
        # on a GPU, replayed as a CUDA graph (graphs.py)
        self.graphed = GraphedCall(self._step) if device.type == "cuda" else None

    def _rope_table(self, n: int, dtype, device):
        """(cos, signed sin), each (n, D), of positions 0 … n−1 ((D, n) in column layout), or
        None where the rotary embedding depends on more than the position (dynamic scaling).
        With the sin's first half negated, `rotate_half(x) * sin` is `x.roll(D/2) * signed
        sin`, bit for bit."""
        rotary = self.base.rotary_emb
        kind = str(getattr(rotary, "rope_type", "default"))
        if "dynamic" in kind or kind == "longrope":
            return None
        probe = torch.zeros(1, dtype=dtype, device=device)  # gives the dtype and device only
        cos, sin = rotary.forward(probe, torch.arange(n, device=device)[None])  # (1, n, D)
        cos, sin = cos[0], signed_sin(sin[0])
        return (cos.t().contiguous(), sin.t().contiguous()) if self.columns else (cos, sin)

    @classmethod
    def build(cls, model, cache, full_mask, recording=None, static=False) -> LeanDecoder | None:
        """A decoder for `model` over the prefilled `cache`, or None where the model needs its
        own forward (another architecture, ZeRO-3 weights that are sharded or that only module
        calls would reach, a cache other than ours)."""
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
        if zero3_managed(model) and not hook_free(model):
            return None  # ZeRO-3: see the module
        return cls(model, cache, full_mask, recording, static and not zero3_managed(model))

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of the next token after `tokens` (B,) at `positions` (B, 1)."""
        if self.static and self.graphed is not None:
            logits = self.graphed(tokens, positions)
        else:
            logits = self._step(tokens, positions)
        if self.recording is not None:
            self.recording.steps += 1
        return logits

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token per row through every layer, in the decoder's layout. The static step
        (see STATIC_DEVICES; row layout) differs only in where keys, values and products go
        and what the attention reads: the new key and value written at `self.slot`, the
        attention over every position of the cache (those after `slot` blocked), each product
        copied into the recording at `self.token`; both counters advanced in place."""
        cols = self.columns
        x = _embed(self.base.embed_tokens, tokens)  # (B, hidden)
        if cols:
            x = x.t().contiguous()
        if self.rope is not None:
            at = positions[:, 0]
            if cols:
                rope = self.rope[0][:, at], self.rope[1][:, at]  # (D, B)
            else:  # (B, 1, D): broadcast over heads
                rope = self.rope[0][at].unsqueeze(1), self.rope[1][at].unsqueeze(1)
        else:
            cos, sin = self.base.rotary_emb.forward(x, positions)  # (B, 1, D)
            sin = signed_sin(sin)
            rope = (cos[:, 0].t(), sin[:, 0].t()) if cols else (cos, sin)
        bias = None  # the usual step: the mask up to the cache's filled part, per layer
        if self.static:  # (B·KVH, 1, S): every position, those not written yet blocked
            head_bias = self._head_bias(*self.cache_layers[0].key_buf.shape[:2])
            blocked = torch.finfo(head_bias.dtype).min
            bias = torch.where(self.key_at <= self.slot, head_bias, blocked)
        layers = zip(self.layers, self.cache_layers, self.fused, strict=True)
        for i, (layer, kv, (qkv, gate_up)) in enumerate(layers):
            prod = self._producer(i)
            h = _norm(layer.input_layernorm, x, cols)
            x = x + self._attend(layer.self_attn, h, rope, kv, qkv, prod, bias)
            h = _norm(layer.post_attention_layernorm, x, cols)
            mlp = layer.mlp
            if gate_up is None:
                gate = prod("gate", mlp.gate_proj, h)
                up = prod("up", mlp.up_proj, h)
            else:  # the gate and up projections in one product
                gate, up = prod("gate_up", gate_up, h).chunk(2, dim=0 if cols else -1)
            act = mlp.act_fn.forward(gate) * up
            x = x + prod("down", mlp.down_proj, act)
        if self.static:
            self.slot.add_(1)
            if self.recording is not None:
                self.token.add_(1)
        logits = _project(self.model.lm_head, _norm(self.base.norm, x, cols), cols)
        return logits.t().contiguous() if cols else logits

    def _producer(self, layer: int):
        """prod(name, w, x) → the product of `w` (a `Linear`, or a stacked (weight, bias)) with
        `x` in the decoder's layout, kept in the recording under `name` when recording:
        written into its place there (the usual step), or copied in at token `self.token`
        (the static step, whose place in the recording is not fixed)."""
        cols, rec = self.columns, self.recording

        def product(w, x, out=None):
            if isinstance(w, torch.nn.Module):
                return _project(w, x, cols, out)
            return _product(*w, x, cols, out)

        if rec is None:
            return lambda name, w, x: product(w, x)
        if self.static:

            def copied(name: str, w, x: torch.Tensor) -> torch.Tensor:
                y = product(w, x)  # (B, out): the static step is in row layout
                rec.buffer(layer, name, y.shape[-1], y).index_copy_(0, self.token, y[None])
                return y

            return copied
        like = self.base.embed_tokens.weight

        def written(name: str, w, x: torch.Tensor) -> torch.Tensor:
            out = (w.weight if isinstance(w, torch.nn.Module) else w[0]).shape[0]
            return product(w, x, rec.slot(layer, name, out, like))

        return written

    def _head_bias(self, b: int, kv_heads: int) -> torch.Tensor:
        """The mask per (row, key/value head): (B·KVH, 1, S), made at the first step."""
        if self.head_bias is None:
            full = self.bias.shape[-1]
            self.head_bias = self.bias.expand(b, kv_heads, 1, full).reshape(-1, 1, full)
        return self.head_bias

    def _attend(self, attn, h: torch.Tensor, rope, kv: GrowingLayer, qkv, prod, bias):
        """Self-attention of one new token per row, as transformers' eager attention, for `h`
        in the decoder's layout; the result in that layout. `bias`: the static step's mask
        over the whole cache, None for the usual step."""
        cols, d = self.columns, attn.head_dim
        b = h.shape[1] if cols else h.shape[0]
        # heads: (heads, D, B) in columns, (B, heads, D) in rows
        shape, at = ((-1, d, b), 0) if cols else ((b, -1, d), 1)
        dim = 1 if cols else 2  # D
        if qkv is None:
            q = prod("q", attn.q_proj, h).view(shape)
            k = prod("k", attn.k_proj, h).view(shape)
            q, k = _rotate(q, *rope, dim), _rotate(k, *rope, dim)
            v = prod("v", attn.v_proj, h).view(shape)
        else:  # the three projections in one product; q and k rotated together
            heads = attn.q_proj.out_features // d
            kv_heads = attn.k_proj.out_features // d
            both = prod("qkv", qkv, h).view(shape)
            qk = _rotate(both.narrow(at, 0, heads + kv_heads), *rope, dim)
            q, k = qk.split([heads, kv_heads], dim=at)
            v = both.narrow(at, heads + kv_heads, kv_heads)
        if cols:  # (B, heads, D)
            q, k, v = q.permute(2, 0, 1), k.permute(2, 0, 1), v.permute(2, 0, 1)
        if bias is None:
            keys, values = kv.update(k.unsqueeze(2), v.unsqueeze(2))  # (B, KVH, n, D)
            bias = self._head_bias(b, keys.shape[1])[..., : keys.shape[2]]
        else:  # the static step: in place at `slot`, and every position read
            kv.key_buf.index_copy_(2, self.slot, k.unsqueeze(2))
            kv.value_buf.index_copy_(2, self.slot, v.unsqueeze(2))
            keys, values = kv.key_buf, kv.value_buf
        n, kv_heads = keys.shape[2], keys.shape[1]
        # query head i reads key/value head i // groups, as transformers' repeat_kv; with the
        # rows and key/value heads in one batch dimension (views of the cache, no copy)
        q = q.reshape(b * kv_heads, -1, d)  # (B·KVH, groups, D)
        keys, values = keys.reshape(-1, n, d), values.reshape(-1, n, d)  # (B·KVH, n, D)
        # scaling × q·k + mask in one product, as eager's (q·k) × scaling + mask
        scores = torch.baddbmm(bias, q, keys.transpose(1, 2), alpha=attn.scaling)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.bmm(weights, values).reshape(b, -1)  # (B, H·D)
        return prod("o", attn.o_proj, out.t() if cols else out)


# the RMS norms `_norm` computes itself, as their forward does
RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"}


def _plain_linear(m) -> bool:
    """A `torch.nn.Linear` itself, not a subclass (which may compute otherwise) or an
    adapter: the lean step may then compute its product from its weight and bias."""
    return type(m) is torch.nn.Linear


def hook_free(model: torch.nn.Module) -> bool:
    """True when the lean step calls no module of `model` (so no module hook runs, ZeRO-3's
    included) and every ZeRO-3 parameter is gathered whole: plain `Embedding`, `Linear`s and
    RMS norms, which it computes from their weights; the MLP's activation and the rotary
    embedding are called through `forward`, which runs no hooks."""
    base = model.model
    if type(base.embed_tokens) is not torch.nn.Embedding:
        return False
    if not _plain_linear(model.lm_head) or type(base.norm).__name__ not in RMS_NORMS:
        return False
    for layer in base.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = [getattr(attn, f"{x}_proj", None) for x in "qkvo"]
        linears += [getattr(mlp, f"{x}_proj", None) for x in ("gate", "up", "down")]
        if not all(_plain_linear(m) for m in linears):
            return False
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if not all(type(n).__name__ in RMS_NORMS for n in norms):
            return False
    # ZeRO-3 marks a gathered parameter AVAILABLE (generation_weights: gather); a sharded one
    # holds an empty placeholder until a module hook gathers it
    status = (getattr(p, "ds_status", None) for p in model.parameters() if hasattr(p, "ds_id"))
    return all(getattr(s, "name", None) == "AVAILABLE" for s in status)


def lean_hook_free(model: torch.nn.Module) -> bool:
    """Whether the lean step decodes `model` without calling a module: a Llama-family model
    whose layers `hook_free` accepts (see there)."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None or not hasattr(model, "lm_head"):
        return False
    if not all(type(x).__name__ in LLAMA_FAMILY for x in layers):
        return False
    return hook_free(model)


def _embed(embedding: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The embedding rows of `tokens`; a plain `Embedding` through `forward`, without hooks."""
    if type(embedding) is torch.nn.Embedding:
        return embedding.forward(tokens)
    return embedding(tokens)


def _norm(norm: torch.nn.Module, x: torch.Tensor, columns: bool) -> torch.Tensor:
    """`norm` of every column of `x` (hidden, B), or of every row of `x` (B, hidden)."""
    if type(norm).__name__ not in RMS_NORMS:
        return norm(x.t()).t() if columns else norm(x)
    dim, eps = 0 if columns else -1, norm.variance_epsilon
    if x.dtype == torch.float32:  # no casts: each is a call, and this runs per layer and token
        h = x * torch.rsqrt(x.pow(2).mean(dim, keepdim=True).add_(eps))
    else:
        h = x.to(torch.float32)
        h = (h * torch.rsqrt(h.pow(2).mean(dim, keepdim=True).add_(eps))).to(x.dtype)
    return (norm.weight[:, None] if columns else norm.weight) * h


def _product(weight, bias, x: torch.Tensor, columns: bool, out=None) -> torch.Tensor:
    """The product of a `Linear`'s weight and bias with columns `x` (in, B), `weight @ x`
    (+ bias per row): (out, B); or with rows `x` (B, in), as `Linear`: (B, out). Written into
    `out` when given."""
    if not columns:
        if out is None:
            return F.linear(x, weight, bias)
        if bias is None:
            return torch.mm(x, weight.t(), out=out)
        return torch.addmm(bias, x, weight.t(), out=out)
    if bias is None:
        return torch.mm(weight, x, out=out)
    return torch.addmm(bias[:, None], weight, x, out=out)


def _project(linear: torch.nn.Module, x: torch.Tensor, columns: bool, out=None) -> torch.Tensor:
    """`linear` applied to every column of `x` (in, B), or to every row of `x` (B, in). A
    plain `Linear` as `_product` (into `out` when given); any other module (an adapter, a
    quantised layer) through its own forward, on rows (not recorded: see `Recording`)."""
    if _plain_linear(linear):
        return _product(linear.weight, linear.bias, x, columns, out)
    return linear(x.t()).t() if columns else linear(x)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """`sin` (…, D) with its first half negated: then `rotate_half(x) * sin` is
    `x.roll(D/2) * signed_sin(sin)` (see `_rotate`), the same floats."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, dim: int):
    """Rotary embedding along `dim` (the head dimension D) of (heads, D, B) columns with cos
    and signed sin (D, B), or of (B, heads, D) rows with (B, 1, D), as transformers'
    `x * cos + rotate_half(x) * sin`, the same floats."""
    return x * cos + x.roll(x.shape[dim] // 2, dims=dim) * signed_sin


def _fused(layer) -> tuple:
    """((weight, bias) of q, k, v stacked, (weight, bias) of gate and up stacked) for one
    decoder layer, each None where its projections do not stack (another MLP, mixed biases)."""

    def stack(*linears):
        if not all(_plain_linear(m) for m in linears):  # a subclass may compute otherwise
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
