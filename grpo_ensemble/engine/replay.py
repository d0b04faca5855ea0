"""The update's first forward over the policy's own samples, from what sampling computed.

In the first optimizer pass of a step the weights are still those the policy sampled with, so
every projection's output at a completion position (q, k, v, o, gate, up, down of every layer)
is one the lean decode step already computed for that token (`recording.Recording`). Those
products are about a third of a forward and backward's arithmetic. `replay_logprobs` runs the
update's forward without them: each projection is `Replayed`, whose forward returns the
recorded output and whose backward computes the gradients of its input and weight from the
input this forward computed (the same values, to float rounding), as `Linear`'s backward does.
Everything else runs as in the model's forward: the prompt (through the model, with
gradients), the norms, the rotary embedding, the attention over the prompt's and the
completion's keys and values, the MLP's activation and the LM head. The log-probs and the
gradient equal those of `logprobs.completion_logprobs` to float rounding
(tests/engine/test_replay.py).

It applies where the lean decode step recorded (Llama, Mistral, Qwen2 with plain projections,
a rotary embedding that depends on the position only, not ZeRO-3) and only while no optimizer
step has changed the weights since (`recording.weights_version`; in training a recording lives
from the step's sampling to its first pass anyway), in a model that computes the same in
training and eval mode (no dropout: sampling runs in eval mode).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..models.kvcache import cache_of
from ..models.logprobs import (
    TokenBatch,
    checkpointing,
    logprobs_and_entropy,
    prompt_forward,
    selective_log_softmax,
    shared_prompt_plan,
)
from .decode import _norm, _rotate, signed_sin
from .recording import Recording, replay_pays, weights_version


class Trace(NamedTuple):
    """Where a candidate's decode step products are: row `row` of `recording`."""

    recording: Recording
    row: int


class Replayed(torch.autograd.Function):
    """A `Linear` over columns whose output `y` (out, N) was computed already: forward
    returns `y`; backward gives the gradients of the input `x` (in, N), `weight` and `bias`,
    as `Linear`'s backward does (on columns: x̄ = Wᵀ ȳ, W̄ = ȳ xᵀ, b̄ = Σ ȳ)."""

    @staticmethod
    def forward(ctx, y, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[1]:
            gx = weight.t() @ grad
        if ctx.needs_input_grad[2]:
            gw = grad @ x.t()
        if ctx.has_bias and ctx.needs_input_grad[3]:
            gb = grad.sum(1)
        return None, gx, gw, gb


def replayable(model: torch.nn.Module, batch: TokenBatch, traces) -> bool:
    """True when `replay_logprobs` may run for `batch`: every row has a trace of a recording
    of this model's current weights, long enough for the batch's completions."""
    module = getattr(model, "module", model)
    c_len = batch.completion_ids.shape[1]
    if traces is None or c_len < 2 or len(traces) != batch.input_ids.shape[0]:
        return False
    if checkpointing(module) and module.training:
        return False
    recordings = {id(t.recording): t.recording for t in traces if t is not None}
    if len(recordings) == 0 or any(t is None for t in traces):
        return False
    if not replay_pays(module, len(traces), c_len - 1):
        return False
    version = weights_version(module)
    return all(
        r.filled and r.model is module and r.version == version and r.steps >= c_len - 1
        for r in recordings.values()
    )


def _outputs(traces: Sequence[Trace], steps: int) -> list[dict[str, torch.Tensor]]:
    """Per layer, each recorded product of the batch's rows over their first `steps` tokens,
    as an (out, steps·B) matrix, tokens in the order (token, row): views of the recording
    where the rows are one recording's, in order; copies otherwise."""
    first = traces[0].recording
    rows = [t.row for t in traces]
    whole_rows = slice(rows[0], rows[0] + len(rows))
    if all(t.recording is first for t in traces) and rows == list(range(rows[0], rows[-1] + 1)):
        picks = None
    else:  # gathered: each recording's rows, placed at their positions in the batch
        by_rec: dict[int, tuple[Recording, list[int], list[int]]] = {}
        for at, t in enumerate(traces):
            rec, where, which = by_rec.setdefault(id(t.recording), (t.recording, [], []))
            where.append(at)
            which.append(t.row)
        picks = [
            (rec, torch.tensor(which), torch.tensor(where)) for rec, where, which in by_rec.values()
        ]

    def tokens(rec: Recording, name: str, layer: int, sel) -> torch.Tensor:
        """(out, steps, rows) of `sel`, a slice or an index of rows."""
        buf = rec.layers[layer][name]
        dev = buf.device
        if rec.columns:  # (out, steps_max, B)
            buf = buf[:, :steps]
            return buf[:, :, sel] if isinstance(sel, slice) else buf.index_select(2, sel.to(dev))
        buf = buf[:steps]  # (steps_max, B, out)
        part = buf[:, sel] if isinstance(sel, slice) else buf.index_select(1, sel.to(dev))
        return part.permute(2, 0, 1)

    out = []
    for layer, names in enumerate(first.layers):
        per: dict[str, torch.Tensor] = {}
        for name in names:
            if picks is None:
                part = tokens(first, name, layer, whole_rows)
            else:
                part = None
                for rec, which, where in picks:
                    got = tokens(rec, name, layer, which)
                    if part is None:
                        part = got.new_empty((got.shape[0], steps, len(traces)))
                    part[:, :, where.to(got.device)] = got
            per[name] = part.reshape(part.shape[0], -1)
        out.append(per)
    return out


def replay_logprobs(
    model: torch.nn.Module,
    batch: TokenBatch,
    traces: Sequence[Trace],
    temperature: float = 1.0,
    entropy: str | None = None,
):
    """(B, C) log-probs of the completion tokens, as `completion_logprobs`, with every
    projection of the completion positions taken from sampling's recording (`replayable`
    must hold). `model` may be a DeepSpeed engine; the prompt runs through it.

    The completion positions are computed in column layout, as the decode step on a CPU: the
    hidden states of all N = T·B positions (T completion tokens but the last, B rows; in the
    order (token, row), the recording's) are one (hidden, N) matrix."""
    module = getattr(model, "module", model)
    base = module.model
    b, width = batch.input_ids.shape
    c_len = batch.completion_ids.shape[1]
    p_len, steps = width - c_len, c_len - 1
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    plan = shared_prompt_plan(model, batch)
    prompt = prompt_forward(model, batch, position_ids, plan[0] if plan is not None else None)
    cache = cache_of(prompt)
    first_logits = prompt.logits[:, -1:]
    if plan is not None:
        first_logits = first_logits.index_select(0, plan[1])
    ys = _outputs(traces, steps)

    ids = batch.completion_ids[:, :steps].t().reshape(-1)  # (N,): token-major
    x = base.embed_tokens(ids).t().contiguous()  # (hidden, N)
    at = position_ids[:, p_len : p_len + steps].t().reshape(1, -1)
    cos, sin = base.rotary_emb(x, at)  # (1, N, D)
    cos, sin = cos[0].t().contiguous(), signed_sin(sin[0]).t().contiguous()  # (D, N)
    # a completion position sees the prompt's real tokens and the completion up to itself
    seen = batch.attention_mask[:, None, None, :p_len].bool().expand(b, 1, steps, p_len)
    causal = torch.ones(steps, steps, dtype=torch.bool, device=x.device).tril()
    mask = torch.cat([seen, causal.expand(b, 1, steps, steps)], dim=-1)

    for i, layer in enumerate(base.layers):
        keys, values = cache.layers[i].keys, cache.layers[i].values  # (U, KVH, P, D)
        if plan is not None:
            keys, values = keys.index_select(0, plan[1]), values.index_select(0, plan[1])
        x = _layer(layer, ys[i], x, (cos, sin), mask, (keys, values), (b, steps))
    head = module.lm_head
    logits = F.linear(_norm(base.norm, x, True).t(), head.weight, head.bias)  # (N, V)
    # the prompt's last position predicts completion token 0; completion token t, token t+1
    logits = torch.cat([first_logits, logits.view(steps, b, -1).transpose(0, 1)], dim=1)
    if temperature != 1.0:
        logits = logits / temperature
    if entropy is not None:  # with the entropy of each position: (log-probs, entropy)
        return logprobs_and_entropy(logits, batch.completion_ids, entropy=entropy)
    return selective_log_softmax(logits, batch.completion_ids)


def _layer(layer, y: dict, x: torch.Tensor, rope, mask, prompt_kv, rows_steps) -> torch.Tensor:
    """One decoder layer over the completion positions, in column layout (hidden, N), its
    projections `Replayed` from `y`; the prompt's keys and values (B, KVH, P, D) before the
    completion's in the attention."""
    (cos, sin), (b, steps) = rope, rows_steps
    n = x.shape[1]
    attn, mlp = layer.self_attn, layer.mlp
    d = attn.head_dim

    def heads(cols: torch.Tensor) -> torch.Tensor:  # (H·D, N) → (B, H, T, D)
        return cols.view(-1, d, steps, b).permute(3, 0, 2, 1).contiguous()

    h = _norm(layer.input_layernorm, x, True)
    sizes = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
    parts = y["qkv"].split(sizes) if "qkv" in y else (y["q"], y["k"], y["v"])
    q, k, v = (
        Replayed.apply(part, h, lin.weight, lin.bias)
        for part, lin in zip(parts, (attn.q_proj, attn.k_proj, attn.v_proj), strict=True)
    )  # (H·D, N)
    q = _rotate(q.view(-1, d, n), cos, sin, 1).view(-1, n)
    k = _rotate(k.view(-1, d, n), cos, sin, 1).view(-1, n)
    o = F.scaled_dot_product_attention(
        heads(q),
        torch.cat([prompt_kv[0], heads(k)], dim=2),
        torch.cat([prompt_kv[1], heads(v)], dim=2),
        attn_mask=mask,
        scale=attn.scaling,
        enable_gqa=sizes[0] != sizes[1],
    )  # (B, H, T, D)
    o = o.permute(1, 3, 2, 0).reshape(-1, n)  # (H·D, N)
    x = x + Replayed.apply(y["o"], o, attn.o_proj.weight, attn.o_proj.bias)
    h = _norm(layer.post_attention_layernorm, x, True)
    gate_y, up_y = y["gate_up"].chunk(2) if "gate_up" in y else (y["gate"], y["up"])
    gate = Replayed.apply(gate_y, h, mlp.gate_proj.weight, mlp.gate_proj.bias)
    up = Replayed.apply(up_y, h, mlp.up_proj.weight, mlp.up_proj.bias)
    act = mlp.act_fn.forward(gate) * up
    return x + Replayed.apply(y["down"], act, mlp.down_proj.weight, mlp.down_proj.bias)
