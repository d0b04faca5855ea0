"""The recipe's member sections: who samples (the policy, co-trained policies, peers), how
(sampling), and with which adapters (LoRA). Part of the recipe's schema (`schema`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from .base import _Config


class SamplingConfig(_Config):
    temperature: float = Field(1.0, gt=0, description="Softmax temperature for sampling.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1: off).")
    top_k: int = Field(0, ge=0, description="Keep only the k most likely tokens (0: off).")
    max_new_tokens: int = Field(32, ge=1, description="Longest completion, in tokens.")
    min_new_tokens: int = Field(
        0, ge=0, description="No EOS before this many tokens (= max_new_tokens: fixed length)."
    )

    @model_validator(mode="after")
    def _min_le_max(self) -> SamplingConfig:
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError("min_new_tokens: must not exceed max_new_tokens")
        return self


class MemberConfig(_Config):
    model: str | None = Field(
        None,
        min_length=1,
        description="Local path, hub id, or `builtin:NAME` of a built-in tiny model; for a "
        "peer also `policy_base`: the policy's model (with policy.lora, the very same weights).",
    )
    generator: str = Field("hf", description="Generator plugin that samples for this member.")
    params: dict[str, Any] = Field({}, description="Keyword arguments for the generator.")
    n: int = Field(4, ge=0, description="Candidates this member adds to each prompt's group.")
    sampling: SamplingConfig = Field(SamplingConfig(), description="Sampling settings.")
    trust_remote_code: bool = Field(
        False,
        description="Run the model repository's own code (said by a warning on stderr when set).",
    )
    chat_template: str | None = Field(
        None,
        description="Chat template this member renders conversations with: inline Jinja, or "
        "the path of a file holding one (null: its tokenizer's own).",
    )
    dtype: Literal["fp32", "bf16"] | None = Field(
        None,
        description="Precision of this member's frozen weights: a peer's model, or the "
        "policy's reference model (null: train.precision; the policy trains in that).",
    )


class LoraConfig(_Config):
    r: int = Field(16, ge=1, description="Rank of each adapter's low-rank update.")
    alpha: float = Field(
        32.0, gt=0, description="Scale of the update: it is multiplied by alpha / r."
    )
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout on each adapter's input while training (0: the update's first "
        "pass computes exactly the sampling policy's log-probs).",
    )
    target_modules: list[Annotated[str, Field(min_length=1)]] | Literal["all-linear"] | None = (
        Field(
            None,
            description="Names of the layers that get an adapter (a name matches a module "
            "whose dotted path ends with it), or all-linear (null: PEFT's choice for the "
            "architecture: q_proj and v_proj for the Llama family, c_attn for GPT-2).",
        )
    )


class PolicyConfig(MemberConfig):
    n: int = Field(8, ge=1, description="Candidates the policy samples for each prompt.")
    lora: LoraConfig | None = Field(
        None,
        description="Train LoRA adapters (PEFT) instead of every weight; the base stays "
        "frozen and also serves as the reference model and as any peer whose model is the "
        "policy's (null: full fine-tuning).",
    )
    adapter: str | None = Field(
        None,
        min_length=1,
        description="Continue training an existing PEFT adapter folder (trained on "
        "policy.model) instead of new LoRA adapters.",
    )


class CoPolicyConfig(PolicyConfig):
    name: str = Field(..., min_length=1, description="Policy name, used in metrics and final/.")
    mode: Literal["on_policy", "shaped", "tis", "baseline_only"] = Field(
        "on_policy",
        description="How this policy's candidates enter the other policies' loss, as a peer's "
        "mode (docs/algorithm.md).",
    )
    train: dict[str, Any] = Field(
        {},
        description="This policy's own optimizer settings, over the recipe's train section: "
        "lr, weight_decay, adam_betas, adam_eps, warmup_steps, schedule, max_grad_norm.",
    )
    loss: dict[str, Any] = Field(
        {}, description="This policy's own loss settings, over the recipe's loss section."
    )


class PeerConfig(MemberConfig):
    @model_validator(mode="before")
    @classmethod
    def _frozen(cls, data: Any) -> Any:
        """A peer is frozen: adapters are trained on the policy only."""
        for key in ("lora", "adapter"):
            if isinstance(data, dict) and key in data:
                raise ValueError(
                    f"{key}: a peer's model is frozen; adapters are trained on the policy only "
                    f"(policy.{key})"
                )
        return data

    name: str = Field(..., min_length=1, description="Member name, used in metrics.")
    mode: Literal["on_policy", "shaped", "tis", "baseline_only"] = Field(
        "on_policy",
        description="How this peer's candidates enter the loss: on_policy, shaped, tis, "
        "baseline_only (docs/algorithm.md).",
    )
    on_error: Literal["fail", "skip"] = Field(
        "fail",
        description="When its generator raises or returns the wrong count: stop the run, or "
        "go on without its candidates for that step.",
    )
