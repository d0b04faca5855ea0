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


def selective_log_softmax(
    logits: torch.Tensor, index: torch.Tensor, chunk_rows: int = 16
) -> torch.Tensor:
    """log_softmax(logits)[..., index] for (B, T, V) logits and (B, T) index, in row chunks."""
    out = []
    for lg, ix in zip(logits.split(chunk_rows), index.split(chunk_rows), strict=True):
        lg = lg.float()
        picked = lg.gather(-1, ix.unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(lg, dim=-1))
    return torch.cat(out)


def completion_logprobs(
    model: torch.nn.Module, batch: TokenBatch, temperature: float = 1.0
) -> torch.Tensor:
    """(B, C) log-probs of the completion tokens, at the sampling temperature (as TRL)."""
    c_len = batch.completion_ids.shape[1]
    # Left padding shifts positions: count only real tokens (as `generate` does).
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
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
    return selective_log_softmax(logits, batch.completion_ids)
