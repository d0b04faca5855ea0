"""Per-token log-probabilities of completion tokens under a causal LM.

Layout of a batch (as TRL): prompts left-padded to P columns, completions right-padded to C
columns, so every completion starts at column P and the logits that predict it are columns
P−1 … P+C−2. Only those C positions go through the LM head (`logits_to_keep`), and the
log-softmax is taken one chunk of rows at a time so a (B, C, V) float32 copy is never needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .. import dist
from .kvcache import cache_name, cache_of, distinct_rows, full_attention_only, repeat_rows
from .zero import zero3_managed

# the prompt runs once per distinct prompt when (rows − distinct prompts) × prompt columns ×
# parameters is at least this: the second forward call's fixed cost must be less than the
# arithmetic it saves (higher on a GPU, which computes far faster than it launches a forward's
# kernels; see docs/performance.md)
SHARE_MIN = {"cpu": 1e8, "cuda": 1e11}


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # (B, P + C)
    attention_mask: torch.Tensor  # (B, P + C)
    completion_ids: torch.Tensor  # (B, C)
    completion_mask: torch.Tensor  # (B, C) float, 1 on real completion tokens

    @classmethod
    def build(
        cls, prompts: Sequence[list[int]], completions: Sequence[list[int]], pad_id: int
    ) -> TokenBatch:
        b = len(prompts)
        p_len = max(len(p) for p in prompts)
        c_len = max(1, max(len(c) for c in completions))
        ids = torch.full((b, p_len + c_len), pad_id, dtype=torch.long)
        attn = torch.zeros((b, p_len + c_len), dtype=torch.long)
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            ids[i, p_len - len(p) : p_len] = torch.tensor(p, dtype=torch.long)
            ids[i, p_len : p_len + len(c)] = torch.tensor(c, dtype=torch.long)
            attn[i, p_len - len(p) : p_len + len(c)] = 1
        comp_ids = ids[:, p_len:]
        comp_mask = attn[:, p_len:].float()
        return cls(ids, attn, comp_ids, comp_mask)

    def to(self, device) -> TokenBatch:
        return TokenBatch(*(t.to(device) for t in vars(self).values()))

    def select(self, rows: Sequence[int]) -> TokenBatch:
        """The batch of these rows (in this order), with the same widths."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.input_ids.device)
        return TokenBatch(*(t.index_select(0, index) for t in vars(self).values()))


def selective_log_softmax(
    logits: torch.Tensor, index: torch.Tensor, chunk_rows: int = 16
) -> torch.Tensor:
    """log_softmax(logits)[..., index] for (B, T, V) logits and (B, T) index, in row chunks."""
    return logprobs_and_entropy(logits, index, chunk_rows, entropy=None)[0]


def logprobs_and_entropy(
    logits: torch.Tensor, index: torch.Tensor, chunk_rows: int = 16, entropy: str | None = "value"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T) log_softmax(logits)[..., index] and (B, T) entropy −Σ p·log p of each position's
    distribution, in row chunks. `entropy`: None (not computed), "value" (detached: a metric
    or a mask) or "grad" (with its graph, for an entropy term in the loss)."""
    out, ents = [], []
    for lg, ix in zip(logits.split(chunk_rows), index.split(chunk_rows), strict=True):
        lg = lg.float()
        lse = torch.logsumexp(lg, dim=-1)
        out.append(lg.gather(-1, ix.unsqueeze(-1)).squeeze(-1) - lse)
        if entropy is None:
            continue
        with torch.set_grad_enabled(entropy == "grad" and torch.is_grad_enabled()):
            x = lg if entropy == "grad" else lg.detach()
            z = lse if entropy == "grad" else lse.detach()
            # H = logsumexp − Σ softmax·logits: no second (rows, T, V) log-softmax kept
            ents.append(z - (torch.softmax(x, dim=-1) * x).sum(-1))
    return torch.cat(out), torch.cat(ents) if entropy is not None else None


def checkpointing(module: torch.nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on in a transformers model (read through
    `is_activation_checkpointing`: its old name `is_gradient_checkpointing` warns)."""
    on = getattr(type(module), "is_activation_checkpointing", None)
    name = "is_activation_checkpointing" if on is not None else "is_gradient_checkpointing"
    return bool(getattr(module, name, False))


def shared_prompt_plan(model: torch.nn.Module, batch: TokenBatch):
    """(distinct prompt rows (U,), row → its distinct prompt (B,)) when running each distinct
    prompt once pays and the model allows it, else None. `model` may be a DeepSpeed engine."""
    module = getattr(model, "module", model)
    b, width = batch.input_ids.shape
    p_len = width - batch.completion_ids.shape[1]
    if b < 2 or p_len < 1 or batch.completion_ids.shape[1] < 2:
        return None
    params = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
    least = SHARE_MIN.get(batch.input_ids.device.type, SHARE_MIN["cuda"])
    if (b - 1) * p_len * params < least:  # not even if every row had the same prompt
        return None
    # transformers turns the cache off in checkpointed layers while training
    if (checkpointing(module) and module.training) or cache_name(module) is None:
        return None
    if not full_attention_only(module) or module.config.get_text_config().is_encoder_decoder:
        return None
    # ZeRO-3 on several ranks: every forward gathers weights with the other ranks, so all must
    # run the same number of forwards, and whether sharing pays differs between their batches
    if dist.world_size() > 1 and zero3_managed(module):
        return None
    # distinct prompts: the same ids and the same padding
    first, inverse = distinct_rows(batch.input_ids[:, :p_len], batch.attention_mask[:, :p_len])
    saved = (b - len(first)) * p_len * params
    if saved == 0 or saved < least:
        return None
    return first, inverse


def completion_logprobs(
    model: torch.nn.Module, batch: TokenBatch, temperature: float = 1.0, share=True
) -> torch.Tensor:
    """(B, C) log-probs of the completion tokens, at the sampling temperature (as TRL).
    `share` False: every row runs whole, even where its prompt could run once for its group."""
    return completion_logprobs_entropy(model, batch, temperature, share, entropy=None)[0]


def completion_logprobs_entropy(
    model: torch.nn.Module, batch: TokenBatch, temperature: float = 1.0, share=True, entropy="value"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`completion_logprobs` and the (B, C) entropy of the policy's distribution at each
    completion position from the same forward (`entropy`: see `logprobs_and_entropy`)."""
    c_len = batch.completion_ids.shape[1]
    # Left padding shifts positions: count only real tokens (as `generate` does).
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    plan = shared_prompt_plan(model, batch) if share else None
    if plan is not None:
        logits = _shared_prompt_logits(model, batch, position_ids, *plan)
    else:
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=position_ids,
            logits_to_keep=c_len + 1,
            use_cache=False,
        )
        logits = out.logits[:, :-1, :]  # (B, C, V): position t predicts completion token t
    if temperature != 1.0:
        logits = logits / temperature
    return logprobs_and_entropy(logits, batch.completion_ids, entropy=entropy)


def prompt_forward(model, batch: TokenBatch, position_ids, rows=None):
    """The forward of the batch's prompts (of `rows` only, when given), keeping their keys and
    values (`use_cache`) and the logits of their last position."""
    p_len = batch.input_ids.shape[1] - batch.completion_ids.shape[1]
    rows = slice(None) if rows is None else rows
    return model(
        input_ids=batch.input_ids[rows, :p_len],
        attention_mask=batch.attention_mask[rows, :p_len],
        position_ids=position_ids[rows, :p_len],
        logits_to_keep=1,
        use_cache=True,
    )


def _shared_prompt_logits(model, batch: TokenBatch, position_ids, first, inverse) -> torch.Tensor:
    """(B, C, V) logits predicting the completion tokens, each distinct prompt run once."""
    module = getattr(model, "module", model)
    p_len = batch.input_ids.shape[1] - batch.completion_ids.shape[1]
    out = prompt_forward(model, batch, position_ids, first)
    cache = repeat_rows(Cache(layer_class_to_replicate=DynamicLayer), cache_of(out), inverse)
    rest = model(  # completion tokens but the last (nothing follows it)
        input_ids=batch.completion_ids[:, :-1],
        attention_mask=batch.attention_mask[:, :-1],
        position_ids=position_ids[:, p_len:-1],
        use_cache=True,
        **{cache_name(module): cache},
    )
    # the prompt's last position predicts completion token 0; completion token t, token t+1
    return torch.cat([out.logits[:, -1:].index_select(0, inverse), rest.logits], dim=1)
