"""The step's settings, resolved once from the recipe when the run is built.

Every recipe value a phase of the step reads comes from here: the phases take these plain
values, never the recipe, so one value has one reading (the temperature the loss divides by
is the one the policy's generator was handed; beta decides the KL term, the reference model
and whether zero-advantage candidates may be left out, all in `resolve`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..recipe import Recipe
from ..rollout.ensemble import Member
from ..rollout.groups import GroupSettings
from .batching import BatchSettings
from .loss import LossSettings
from .update import UpdateSettings


@dataclass(frozen=True)
class StepSettings:
    seed: int  # with the step and the prompt's place, each prompt's sampling seed
    prompts_per_step: int  # over all ranks
    inject: str  # always | on_failure: which prompts the peers sample for
    success_reward: float  # on_failure: a policy candidate this good means no peers
    group: GroupSettings
    batching: BatchSettings
    update: UpdateSettings


def loss_settings(recipe: Recipe) -> LossSettings:
    """The loss's settings; its beta also decides whether a reference model is loaded."""
    lo = recipe.loss
    return LossSettings(
        type=lo.type,
        clip_low=lo.clip_low,
        clip_high=lo.clip_high,
        beta=lo.beta,
        aggregation=lo.aggregation,
        shaped_gamma=lo.shaped_gamma,
        tis_low=lo.tis_low,
        tis_high=lo.tis_high,
        kl_tokens=lo.kl_tokens,
        kl_estimator=lo.kl_estimator,
        delta=lo.delta,
        sapo_temperature_pos=lo.sapo_temperature_pos,
        sapo_temperature_neg=lo.sapo_temperature_neg,
        entropy_coef=lo.entropy_coef,
        top_entropy_quantile=lo.top_entropy_quantile,
        off_policy_mask=lo.off_policy_mask,
    )


def resolve(
    recipe: Recipe, members: list[Member], loss: LossSettings, train_is_eval: bool
) -> StepSettings:
    """The step's settings from the recipe, the ensemble's members (whose sampling
    parameters are the ones their generators are handed) and the loss's settings.
    `train_is_eval`: the policy's model computes the same in training as in eval mode."""
    lo, t, g = recipe.loss, recipe.train, recipe.group
    return StepSettings(
        seed=recipe.seed,
        prompts_per_step=t.prompts_per_step,
        inject=g.inject,
        success_reward=g.success_reward,
        group=GroupSettings(
            modes={m.name: m.mode for m in members},
            stats=g.stats,
            on_error=g.on_error,
            drop_equal_reward_groups=g.drop_equal_reward_groups,
            scale_rewards=g.scale_rewards,
            reward_aggregation=g.reward_aggregation,
            mask_truncated=lo.mask_truncated,
        ),
        batching=BatchSettings(
            micro_batch_size=t.micro_batch_size,
            # auto: the run's `TokenBudget` sets it step by step
            micro_batch_tokens=t.micro_batch_tokens if t.micro_batch_tokens != "auto" else None,
            # the KL term (beta > 0) and the entropy bonus give every candidate a share of
            # the loss, whatever its advantage; and a zero-advantage candidate's tokens count
            # in the entropy quantile that decides which other tokens keep their gradient
            skip_zero_advantage=t.skip_zero_advantage and loss.beta == 0 and not loss.needs_entropy,
        ),
        update=UpdateSettings(
            loss=loss,
            mu=lo.mu,
            temperature=members[0].sampling.temperature,
            # Dr. GRPO's constant normaliser: the policy's own longest completion, so that a
            # peer's longer budget does not shrink the policy's gradient against a solo run
            max_new_tokens=members[0].sampling.max_new_tokens
            if lo.constant_tokens == "policy"
            else max(m.sampling.max_new_tokens for m in members),
            train_is_eval=train_is_eval,
            back_off=t.micro_batch_tokens == "auto" and t.memory_limit_gb is None,
        ),
    )
