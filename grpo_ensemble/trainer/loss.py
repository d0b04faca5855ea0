"""The GRPO loss as small pure tensor functions, each tested with hand-computed numbers.

Shapes: B candidates in a micro-batch, C completion tokens. `mask` is 1 on real completion
tokens. Aggregations take the *whole step's* sizes so that summing micro-batch losses gives
exactly the full-batch loss, whatever the micro-batch split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
    delta: float | None = None,
    log_ratio: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token −min(ρA, clip(ρ, 1−clip_low, 1+clip_high)A), ρ = exp(logp − old_logp) (PPO,
    GRPO). `delta`: two-sided clipping, ρ in the first term capped at delta, so that a
    negative advantage's loss stays bounded. `log_ratio` (B, C) or (B, 1): log ρ given (GSPO's
    sequence-level ratio), else logp − old_logp.

    logp, old_logp: (B, C); advantages: (B,). Returns the loss (B, C) and a (B, C) bool that is
    True where the token gives no gradient (the clipped or capped ratio was taken).
    """
    ratio = torch.exp(logp - old_logp if log_ratio is None else log_ratio)
    adv = advantages.unsqueeze(1)  # (B, 1)
    capped = ratio if delta is None else torch.clamp(ratio, max=delta)
    unclipped = capped * adv
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv
    flat = clipped < unclipped
    if delta is not None:
        flat = flat | ((ratio > delta) & (unclipped <= clipped))
    shape = torch.broadcast_shapes(ratio.shape, logp.shape)
    return -torch.min(unclipped, clipped).expand(shape), flat.expand(shape)


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor):
    """(B, 1) mean over each sequence's tokens of logp − old_logp: log of GSPO's sequence-level
    importance ratio s = (π_θ(y)/π_old(y))^(1/|y|), with its gradient."""
    return (((logp - old_logp) * mask).sum(1) / mask.sum(1).clamp(min=1)).unsqueeze(1)


def cispo_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token −sg(min(ρ, 1+clip_high))·A·logp (CISPO, MiniMax-M1): the importance weight is
    capped and detached, so every token keeps a gradient −A·w. Returns the loss (B, C) and
    where the cap bit (B, C) bool."""
    ratio = torch.exp(logp.detach() - old_logp)
    w = torch.clamp(ratio, max=1 + clip_high)
    return -w * advantages.unsqueeze(1) * logp, ratio > 1 + clip_high


def sapo_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, tau_pos, tau_neg
) -> torch.Tensor:
    """Per-token −(4/τ)·σ(τ(ρ−1))·A (SAPO): a soft gate in place of the hard clip, τ = tau_pos
    for A > 0, tau_neg otherwise. dL/dlogp = −4σ(1−σ)ρA, equal to −A at ρ = 1."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    tau = torch.where(adv > 0, tau_pos, tau_neg).to(logp.dtype)
    return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv


def shaped_surrogate(logp: torch.Tensor, advantages: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-token −A·f(π_θ), f(p) = p/(p+γ), no clipping (LUFFY): needs no behaviour probability.

    dL/dlogp = −A·γp/(p+γ)², which stays small for tokens the policy finds very unlikely.
    """
    p = torch.exp(logp)
    return -advantages.unsqueeze(1) * p / (p + gamma)


def tis_surrogate(
    logp: torch.Tensor, behaviour_logp: torch.Tensor, advantages: torch.Tensor, lo: float, hi: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token −A·w·logp with w = clamp(π_θ/μ, lo, hi) detached: truncated importance sampling
    of another model's tokens (μ: that model's own log-probs). dL/dlogp = −A·w.

    Returns the loss (B, C), the weights w (B, C) and where the clamp bit (B, C) bool.
    """
    ratio = torch.exp(logp.detach() - behaviour_logp)
    w = ratio.clamp(lo, hi)
    return -advantages.unsqueeze(1) * w * logp, w, (ratio < lo) | (ratio > hi)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π‖π_ref): exp(ref − logp) − (ref − logp) − 1 ≥ 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k1 estimator of KL(π‖π_ref): logp − ref (unbiased in value, may be < 0; as a
    loss term its gradient ∇logπ has expectation 0 under π)."""
    return logp - ref_logp


def entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, threshold) -> torch.Tensor:
    """(B, C) bool: real tokens whose entropy is at least `threshold` (Beyond the 80/20 rule)."""
    return (entropy >= threshold) & mask.bool()


def off_policy_keep(
    logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """(B, 1) 1.0 for a sequence kept, 0.0 for one dropped: a sequence with a negative advantage
    whose mean log μ − log π over its tokens exceeds `threshold` (DeepSeek-V3.2's off-policy
    sequence mask; μ the model that sampled it)."""
    mean = ((sampler_logp - logp.detach()) * mask).sum(1) / mask.sum(1).clamp(min=1)
    keep = (advantages >= 0) | (mean <= threshold)
    return keep.to(logp.dtype).unsqueeze(1)


@dataclass(frozen=True)
class BatchSize:
    """Sizes of the whole step's batch, which normalise every micro-batch's share."""

    sequences: int
    tokens: int
    max_new_tokens: int


def token_mean(per_token: torch.Tensor, mask: torch.Tensor, size: BatchSize) -> torch.Tensor:
    """Σ loss over all tokens of the batch / number of tokens in the batch (DAPO)."""
    return (per_token * mask).sum() / max(size.tokens, 1)


def seq_mean(per_token: torch.Tensor, mask: torch.Tensor, size: BatchSize) -> torch.Tensor:
    """Mean over sequences of each sequence's token mean (the original GRPO)."""
    per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
    return per_seq.sum() / max(size.sequences, 1)


def constant_norm(per_token: torch.Tensor, mask: torch.Tensor, size: BatchSize) -> torch.Tensor:
    """Σ loss / (sequences × max_new_tokens): no length bias (Dr. GRPO)."""
    return (per_token * mask).sum() / max(size.sequences * size.max_new_tokens, 1)


AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, BatchSize], torch.Tensor]] = {
    "token_mean": token_mean,
    "seq_mean": seq_mean,
    "constant": constant_norm,
}


# How a candidate enters the loss, by its member's mode (docs/algorithm.md). baseline_only
# candidates never reach the loss: they only count in the group statistics.
MODES = {"on_policy": 0, "shaped": 1, "tis": 2}


# The aggregation each loss type implies (TRL 1.16's): bnpo normalises by the tokens of the
# batch, which here is always the whole step's (every micro-batch's share is exact), so it
# aggregates as dapo does.
TYPE_AGGREGATION = {
    "grpo": "seq_mean",
    "bnpo": "token_mean",
    "dr_grpo": "constant",
    "dapo": "token_mean",
    "cispo": "token_mean",
    "sapo": "seq_mean",
    "gspo": "seq_mean",
}
KL_ESTIMATORS = ("k1", "k3", "k3_bias_corrected")


@dataclass(frozen=True)
class LossSettings:
    """The loss's settings (the recipe's `loss` section), in one place."""

    clip_low: float = 0.2  # the ratio is clipped to [1 − clip_low, 1 + clip_high]
    clip_high: float = 0.28
    beta: float = 0.0  # weight of the KL to the reference; 0: no reference at all
    aggregation: str | None = None  # a name in AGGREGATIONS; None: the type's
    shaped_gamma: float = 0.1  # shaped: f(p) = p/(p+γ)
    tis_low: float = 0.0  # tis: importance weights clamped to [tis_low, tis_high]
    tis_high: float = 2.0
    kl_tokens: str = "policy"  # "policy": KL on the policy's own rows (`own`), "all": every row
    type: str = "dapo"  # a name in TYPE_AGGREGATION
    kl_estimator: str = "k3_bias_corrected"  # a name in KL_ESTIMATORS
    delta: float | None = None  # two-sided clipping: the unclipped ratio capped at delta
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    entropy_coef: float = 0.0  # loss −= coef × mean entropy over the step's tokens
    top_entropy_quantile: float = 1.0  # < 1: the policy gradient on high-entropy tokens only
    off_policy_mask: float | None = None  # drop far-off-policy negative sequences

    def __post_init__(self):
        if self.type not in TYPE_AGGREGATION:
            raise ValueError(f"loss.type: {self.type!r} is not one of {list(TYPE_AGGREGATION)}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(
                f"loss.kl_estimator: {self.kl_estimator!r} is not one of k1, k3, k3_bias_corrected"
            )

    @property
    def norm(self) -> str:
        """The aggregation in force: the recipe's, else the one the loss type implies."""
        return self.aggregation or TYPE_AGGREGATION[self.type]

    @property
    def needs_entropy(self) -> bool:
        return self.entropy_coef != 0 or self.top_entropy_quantile < 1


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar: this micro-batch's share of the step loss
    kl: torch.Tensor  # (B, C) per-token KL term (zeros when beta = 0)
    clipped: torch.Tensor  # (B, C) bool: clipped or capped ratio (no gradient; cispo: capped)
    weight: torch.Tensor  # (B, C) tis importance weight or shaped f(p), 1 for on_policy rows
    tis_clamped: torch.Tensor | None = None  # (B, C) bool: a tis weight hit its clamp
    dropped: torch.Tensor | None = None  # (B,) bool: off_policy_mask dropped the sequence


def policy_term(logp, old_logp, advantages, mask, c: LossSettings):
    """The surrogate of the loss type for every row, and its no-gradient flags (B, C)."""
    if c.type == "cispo":
        return cispo_surrogate(logp, old_logp, advantages, c.clip_high)
    if c.type == "sapo":
        loss = sapo_surrogate(
            logp, old_logp, advantages, c.sapo_temperature_pos, c.sapo_temperature_neg
        )
        return loss, torch.zeros_like(mask, dtype=torch.bool)
    level = sequence_log_ratio(logp, old_logp, mask) if c.type == "gspo" else None
    return clipped_surrogate(logp, old_logp, advantages, c.clip_low, c.clip_high, c.delta, level)


def kl_term(logp, old_logp, ref_logp, mask, c: LossSettings, modes, behaviour, own):
    """(B, C) per-token KL term before beta. k3_bias_corrected multiplies k3 by the importance
    ratio with its gradient: on a row the policy sampled, π/π_old (1 in value at the first
    pass), whose gradient makes E[∇(ρ·k3)] = ∇KL(π‖π_ref); on a tis peer's row (kl_tokens:
    all) the truncated ratio π/μ_peer, which makes the same hold under the peer's sampling."""
    if c.kl_estimator == "k1":
        kl = kl_k1(logp, ref_logp)
    else:
        kl = kl_k3(logp, ref_logp)
    if c.kl_estimator == "k3_bias_corrected":
        log_ratio = sequence_log_ratio(logp, old_logp, mask) if c.type == "gspo" else None
        ratio = torch.exp(logp - old_logp if log_ratio is None else log_ratio)
        if modes is not None and behaviour is not None:
            peer = torch.exp(logp.detach() - behaviour).clamp(c.tis_low, c.tis_high)
            peer = peer * torch.exp(logp - logp.detach())  # the clamped value, ∇ of π
            ratio = torch.where(modes.unsqueeze(1) == MODES["tis"], peer, ratio)
        kl = kl * ratio
    if c.kl_tokens == "policy" and own is not None:
        kl = kl * own.unsqueeze(1)  # (B, C)
    return kl


def peer_terms(per_token, clipped, logp, advantages, mask, c: LossSettings, modes, behaviour):
    """The shaped and tis rows' own surrogates in place of the type's; returns the per-token
    loss, the clip flags (on_policy rows only), the weights and where a tis weight clamped."""
    row = modes.unsqueeze(1)  # (B, 1)
    weight = torch.ones_like(logp)
    shaped = shaped_surrogate(logp, advantages, c.shaped_gamma)
    p = torch.exp(logp.detach())
    weight = torch.where(row == MODES["shaped"], p / (p + c.shaped_gamma), weight)
    per_token = torch.where(row == MODES["shaped"], shaped, per_token)
    tis_clamped = None
    if behaviour is not None:
        tis, w, hit = tis_surrogate(logp, behaviour, advantages, c.tis_low, c.tis_high)
        tis_clamped = hit & (row == MODES["tis"]) & mask.bool()
        per_token = torch.where(row == MODES["tis"], tis, per_token)
        weight = torch.where(row == MODES["tis"], w, weight)
    return per_token, clipped & (row == MODES["on_policy"]), weight, tis_clamped


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    size: BatchSize,
    settings: LossSettings,
    modes: torch.Tensor | None = None,
    behaviour_logp: torch.Tensor | None = None,
    own: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    keep_tokens: torch.Tensor | None = None,
) -> LossOutput:
    """Per-candidate surrogate (by `modes` (B,), see MODES) + beta·KL − entropy_coef·entropy,
    aggregated by the settings' `norm`.

    The policy's own candidates and on_policy peers take the loss type's surrogate; shaped and
    tis rows their own. `own` (B,) bool marks the rows the policy sampled: with
    `kl_tokens: policy` the KL applies to those alone (k3 on tokens another model sampled
    estimates neither KL(π‖ref) nor its gradient); None: every row is the policy's.
    `entropy` (B, C): the policy's entropy per position (with its graph when entropy_coef ≠ 0);
    `keep_tokens` (B, C) bool: the tokens top_entropy_quantile keeps in the policy gradient.
    """
    c = settings
    if modes is not None and behaviour_logp is None and bool((modes == MODES["tis"]).any()):
        raise ValueError("grpo_loss: tis rows need behaviour_logp (the sampler's log-probs)")
    per_token, clipped = policy_term(logp, old_logp, advantages, mask, c)
    weight, tis_clamped = torch.ones_like(logp), None
    if modes is not None and bool((modes != MODES["on_policy"]).any()):
        per_token, clipped, weight, tis_clamped = peer_terms(
            per_token, clipped, logp, advantages, mask, c, modes, behaviour_logp
        )
    dropped = None
    if c.off_policy_mask is not None:
        sampler = old_logp
        if modes is not None and behaviour_logp is not None:  # a tis peer sampled its rows
            sampler = torch.where(modes.unsqueeze(1) == MODES["tis"], behaviour_logp, old_logp)
        keep = off_policy_keep(logp, sampler, advantages, mask, c.off_policy_mask)
        per_token = per_token * keep
        dropped = keep.squeeze(1) == 0
    if keep_tokens is not None:
        per_token = per_token * keep_tokens
    kl = torch.zeros_like(logp)
    if c.beta > 0 and ref_logp is not None:
        kl = kl_term(logp, old_logp, ref_logp, mask, c, modes, behaviour_logp, own)
        per_token = per_token + c.beta * kl
    loss = AGGREGATIONS[c.norm](per_token, mask, size)
    if c.entropy_coef != 0 and entropy is not None:
        # over the step's tokens whatever the loss type's normaliser, so that a micro-batch's
        # share is exact (TRL: the mean over each micro-batch's kept tokens, the same with one
        # micro-batch and top_entropy_quantile 1)
        kept = mask if keep_tokens is None else mask * keep_tokens
        loss = loss - c.entropy_coef * (entropy * kept).sum() / max(size.tokens, 1)
    return LossOutput(loss, kl.detach(), clipped & mask.bool(), weight, tis_clamped, dropped)
