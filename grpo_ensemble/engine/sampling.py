"""Our own sampling loop over the KV cache, with noise that depends only on a row's seed.

`transformers.generate` draws tokens with `torch.multinomial` from one global random stream,
so what a prompt gets depends on which other prompts share its batch, and on how many ranks
split the step. Here every row carries its own seed and token t of that row is the Gumbel-max
choice `argmax(log p + g)`, where `g` is computed from (seed, t, token id) by an integer hash.
`argmax(log p + Gumbel)` is an exact draw from `p`; and because the noise is a pure function of
the row's seed, a prompt's candidates are the same in any batch, on any number of ranks, on a
CPU or a GPU (up to the floating-point noise of the logits themselves).

The distribution sampled from is the one `generate` uses: logits / temperature, then top-k,
then top-p (nucleus), and the behaviour log-probs returned are those of that processed
distribution, which the `tis` mode needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..models.kvcache import cache_name, cache_of, distinct_rows, preallocated_cache, repeat_rows
from . import decode
from .decode import LeanDecoder
from .recording import Recording

M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash ("lowbias32") on int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32  # the product may wrap int64; its low 32 bits are still right
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def row_keys(seeds: Sequence[int], device=None) -> torch.Tensor:
    """(B,) 32-bit keys from arbitrary non-negative Python ints."""
    s = torch.tensor([int(x) % (1 << 62) for x in seeds], dtype=torch.long, device=device)
    return _mix32((s & M32) ^ _mix32((s >> 32) & M32))


# sample() draws the noise of every position at once when it has at most this many entries
NOISE_AT_ONCE = 1 << 20


def gumbel_noise(keys: torch.Tensor, t: int | Sequence[int], vocab: int) -> torch.Tensor:
    """(B, V) standard Gumbel noise for position `t` of each row, a pure function of the key
    and the position; (T, B, V) for a sequence of T positions (the same values)."""
    ts = torch.as_tensor(t, dtype=torch.long, device=keys.device)
    step = _mix32(keys ^ ((ts.unsqueeze(-1) * GOLDEN) & M32))  # (B,) or (T, B)
    ids = torch.arange(vocab, device=keys.device, dtype=torch.long)
    h = _mix32((step.unsqueeze(-1) + ids) & M32)  # distinct ids → distinct hashes
    u = (h.double() + 0.5) / 2.0**32  # uniform on (0, 1), never 0 or 1
    return (-torch.log(-torch.log(u))).float()


def process_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float):
    """(B, V) log-probs of the distribution sampled from: temperature, top-k, top-p."""
    logits = logits.float()
    if temperature != 1.0:  # x / 1 is x: one operation less per token
        logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        probs, order = torch.softmax(logits, -1).sort(dim=-1, descending=True)
        before = probs.cumsum(-1) - probs  # mass strictly above each token
        drop_sorted = before >= top_p  # the top token always stays (its `before` is 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def _choose(logits, noise, temperature: float, top_k: int, top_p: float):
    """The next token of each row (B,) and its log-prob under the processed distribution:
    the Gumbel-max draw with the rows' (B, V) noise for this position (greedy: noise None)."""
    if noise is None:
        return logits.argmax(-1), None
    logp = process_logits(logits, temperature, top_k, top_p)  # (B, V)
    nxt = (logp + noise).argmax(-1)
    return nxt, logp.gather(-1, nxt.unsqueeze(1)).squeeze(1)


class _Forward:
    """The model's logits for the next token of every row (`logits`, (B, V)): the prefill over
    the left-padded prompts (once per distinct prompt where the cache is ours: a group's rows
    share theirs), then one token per row at a time over the KV cache, through the lean decode
    step where the model allows it (decode.py), else through its own forward."""

    def __init__(self, model, input_ids, attention_mask, max_new_tokens: int, recording=None):
        b, p_len = input_ids.shape
        self.model = model
        self.cache_key = cache_name(model) or "past_key_values"
        # the mask of every position there will be, filled in as tokens come (no copy per token)
        ones = attention_mask.new_ones((b, max_new_tokens))
        self.full_mask = torch.cat([attention_mask, ones], dim=1)
        self.filled = p_len  # positions the cache holds
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens
        cache = preallocated_cache(model, p_len + max_new_tokens)
        first, inverse = distinct_rows(input_ids, attention_mask)
        if cache and len(first) < b:  # a group's rows share a prompt: prefill it once
            out = model(
                input_ids=input_ids[first],
                attention_mask=attention_mask[first],
                position_ids=positions[first],
                use_cache=True,
                logits_to_keep=1,
            )
            self.cache = repeat_rows(next(iter(cache.values())), cache_of(out), inverse)
            self.logits = out.logits[:, -1, :].index_select(0, inverse)
        else:
            out = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **cache,
            )
            self.cache, self.logits = cache_of(out), out.logits[:, -1, :]
        # the static step (a CUDA graph on a GPU) where it pays: decode.STATIC_DEVICES
        static = (
            input_ids.device.type in decode.STATIC_DEVICES
            and max_new_tokens >= decode.STATIC_MIN_TOKENS
        )
        self.lean = (
            LeanDecoder.build(model, self.cache, self.full_mask, recording, static)
            if cache
            else None
        )
        self.next_pos = positions[:, -1:] + 1  # (B, 1)

    def advance(self, tokens: torch.Tensor) -> None:
        """Feed one token per row (B,): `logits` become those of the position after it."""
        self.filled += 1
        if self.lean is not None:
            self.logits = self.lean(tokens, self.next_pos)
        else:
            out = self.model(
                input_ids=tokens.unsqueeze(1),
                attention_mask=self.full_mask[:, : self.filled],
                position_ids=self.next_pos,
                use_cache=True,
                **{self.cache_key: self.cache},
            )
            self.cache, self.logits = cache_of(out), out.logits[:, -1, :]
        self.next_pos = self.next_pos + 1


def _all_done(done: torch.Tensor, synced: bool) -> bool:
    """True when every row is finished, on every rank when `synced` (ZeRO-3: each forward is a
    collective, so a rank whose rows are finished keeps stepping until all ranks are)."""
    if not synced:
        return bool(done.all())
    from .. import dist

    flag = torch.tensor([0 if bool(done.all()) else 1], dtype=torch.long)
    return int(dist.all_max_tensor(flag)) == 0


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seeds: Sequence[int] | None = None,
    synced: bool = False,
    min_new_tokens: int = 0,
    recording: Recording | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample completions of left-padded prompts (B, P).

    Returns tokens (B, T) with T ≤ max_new_tokens, padded with `pad_id` after a row's EOS, and
    the (B, T) log-probs of each sampled token under the processed distribution (None when
    greedy, temperature 0). Without `seeds`, row seeds are drawn from torch's global generator.
    EOS cannot be drawn before `min_new_tokens` tokens (with min = max, every completion has
    exactly that length: fair timing comparisons).

    With an empty `recording` (`Recording(max_new_tokens - 1)`), the lean decode step keeps
    every projection's output in it where the model allows (`recording.filled` then), for the
    update's first forward to reuse (replay.py).
    """
    b = input_ids.shape[0]
    greedy = temperature == 0
    if not greedy and seeds is None:
        seeds = torch.randint(0, 2**62, (b,)).tolist()
    keys = None if greedy else row_keys(seeds, input_ids.device)
    forward = _Forward(model, input_ids, attention_mask, max_new_tokens, recording)
    vocab = forward.logits.shape[-1]
    noise = None  # of every position at once, where that is small
    if keys is not None and max_new_tokens * b * vocab <= NOISE_AT_ONCE:
        noise = gumbel_noise(keys, range(max_new_tokens), vocab)  # (T, B, V)
    done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    eos = torch.tensor([eos_id], device=input_ids.device)
    tokens, logps = [], []
    for t in range(max_new_tokens):
        logits = forward.logits
        if t < min_new_tokens:  # no EOS yet (as `generate`'s min_new_tokens)
            logits = logits.index_fill(1, eos, float("-inf"))
        if keys is None:
            noise_t = None  # greedy
        else:
            noise_t = noise[t] if noise is not None else gumbel_noise(keys, t, vocab)
        nxt, logp = _choose(logits, noise_t, temperature, top_k, top_p)
        if logp is not None:
            logps.append(logp.masked_fill(done, 0.0))
        nxt = nxt.masked_fill(done, pad_id)
        tokens.append(nxt)
        done = done | (nxt == eos_id)
        # before min_new_tokens no row can have finished: no need to ask (a host sync on a GPU)
        if t == max_new_tokens - 1 or (t >= min_new_tokens and _all_done(done, synced)):
            break
        forward.advance(nxt)
    seq = torch.stack(tokens, dim=1)  # (B, T)
    return seq, None if greedy else torch.stack(logps, dim=1)
