"""The recipe's schema: typed config, validated once (its member sections: `members`).

Every field has a default and a one-line description; unknown keys are errors. Cross-field
checks live in `Recipe._cross_checks`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    model_validator,
)

from ..data.rows import ROW_BYTES, ROW_DEPTH
from ..types import POLICY, POLICY_BASE
from .base import _Config
from .cotraining import check_policies
from .members import (
    CoPolicyConfig,
    PeerConfig,
    PolicyConfig,
)
from .observing import AlertRule, AlertsConfig, CompletionsConfig, LogConfig

__all__ = ["AlertRule", "AlertsConfig", "CompletionsConfig", "LogConfig", "Recipe"]

RECIPE_NODES = 100_000  # YAML nodes, aliases expanded: thousands of times a real recipe's


def _file_or_mapping(value: Any) -> Any:
    """A DeepSpeed config given as a file path or a mapping; anything else is one clear error
    (the union's own error names its branch, e.g. `train.deepspeed.str`)."""
    if value is None or isinstance(value, dict) or (isinstance(value, str) and value.strip()):
        return value
    raise ValueError(f"give a .json/.yaml file path or a mapping, not {value!r}")


Beta = Annotated[float, Field(ge=0, lt=1)]  # an AdamW beta


class DataConfig(_Config):
    train: str = Field(
        "builtin:arithmetic/train",
        description="Training prompts: a .jsonl/.json/.csv/.parquet file, a folder written by "
        "`datasets`' `save_to_disk`, `builtin:TASK/SPLIT`, or a hub data set id (where the "
        "network allows).",
    )
    eval: str | None = Field(
        "builtin:arithmetic/test", description="Held-out prompts for accuracy (null: none)."
    )
    train_split: str | None = Field(
        None, description="The split of a `save_to_disk` folder holding several (a DatasetDict)."
    )
    eval_split: str | None = Field(None, description="The same for `data.eval`.")
    train_config: str | None = Field(
        None, description="The configuration of a hub data set named in `data.train`."
    )
    eval_config: str | None = Field(None, description="The same for `data.eval`.")
    prompt_field: str = Field("prompt", description="Column holding the prompt text.")
    rename: dict[str, str] = Field(
        {},
        description="Columns read under other names, `{column: field}`: e.g. `{question: "
        "prompt, solution: answer}` for the prompt and the field the scorers read.",
    )
    system_prompt: str | None = Field(
        None,
        description="A system message put first in every conversation without one; a string "
        "prompt then becomes a conversation of one user message.",
    )
    shuffle: bool = Field(True, description="Shuffle the prompts each epoch (seeded).")
    on_bad_row: Literal["fail", "skip"] = Field(
        "fail",
        description="A malformed, non-UTF-8, empty, too long or incomplete row: stop with its "
        "file and line, or leave it out (counted).",
    )
    on_long_prompt: Literal["skip", "truncate_left", "fail"] | None = Field(
        None,
        description="A prompt too long for the model's context beside the longest completion: "
        "leave it out (counted), cut it from the left to fit, or stop naming its file and line "
        "(null: as data.on_bad_row).",
    )
    required_fields: list[str] = Field(
        [], description="Fields every row must have, besides those the scorers read."
    )
    normalize: Literal["none", "NFC", "NFKC"] = Field(
        "none", description="Unicode normalisation of prompt text."
    )
    strip_control: bool = Field(
        False, description="Remove control characters (except newline and tab) from prompts."
    )
    dedupe: bool = Field(False, description="Keep only the first of identical prompts.")


class RewardConfig(_Config):
    name: str = Field(..., description="Reward scorer plugin, e.g. `exact_match`.")
    weight: float = Field(1.0, description="Weight of this scorer in the combined reward.")
    params: dict[str, Any] = Field({}, description="Keyword arguments for the scorer.")
    on_error: Literal["fail", "skip_group", "zero"] = Field(
        "fail",
        description="When it raises, returns the wrong count, NaN/inf or times out: stop the "
        "run, drop the group, or score 0.",
    )
    timeout_s: float | None = Field(
        600.0,
        gt=0,
        description="Seconds one call may take before it counts as failed (null: no limit).",
    )


class GroupConfig(_Config):
    evaluator: str = Field("grpo", description="Group evaluator plugin: grpo, dr_grpo, rloo.")
    params: dict[str, Any] = Field({}, description="Keyword arguments for the evaluator.")
    inject: Literal["always", "on_failure"] = Field(
        "always",
        description="Peers sample for every prompt, or only where no policy candidate succeeded.",
    )
    success_reward: float = Field(
        1.0, description="on_failure: a policy candidate with this combined reward succeeded."
    )
    stats: Literal["group", "policy"] = Field(
        "group", description="Group mean/std over the whole pooled group or the policy's own."
    )
    drop_equal_reward_groups: bool = Field(
        False, description="Leave out of the loss groups whose rewards are all equal."
    )
    on_error: Literal["fail", "skip_group"] = Field(
        "fail",
        description="When the evaluator raises or gives NaN/inf for a group: stop, or drop it.",
    )
    scale_rewards: Literal["group", "batch", "none"] | None = Field(
        None,
        description="What divides the advantages: the group's reward std (group: the grpo "
        "evaluator's own), the std of the step's rewards over all ranks (batch, as TRL's "
        "scale_rewards: batch), or nothing (none). null: the evaluator's own (grpo: group; "
        "dr_grpo and rloo never divide).",
    )
    reward_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = Field(
        "sum_then_normalize",
        description="With several rewards: the evaluator sees their weighted sum "
        "(sum_then_normalize), or the weighted sum of each reward normalised within its group, "
        "(r − group mean) / (group std + 1e-4) (normalize_then_sum).",
    )


class LossConfig(_Config):
    clip_low: float = Field(0.2, ge=0, lt=1, description="Ratio may fall to 1 − clip_low.")
    clip_high: float = Field(0.2, ge=0, description="Ratio may rise to 1 + clip_high.")
    beta: float = Field(0.0, ge=0, description="KL coefficient to the reference (0: no ref).")
    type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "gspo"] = Field(
        "dapo",
        description="Loss formulation (docs/algorithm.md): the surrogate and the aggregation it "
        "implies. grpo: clipped, seq_mean; bnpo and dapo: clipped, token_mean; dr_grpo: clipped, "
        "constant; cispo: clipped importance weight times log-prob, token_mean; sapo: soft gate, "
        "seq_mean; gspo: clipped sequence-level ratio, seq_mean.",
    )
    aggregation: Literal["token_mean", "seq_mean", "constant"] | None = Field(
        None,
        description="token_mean over the batch, per-sequence mean, or constant-length "
        "normaliser (null: the one loss.type implies).",
    )
    delta: float | None = Field(
        None,
        gt=1,
        description="Two-sided clipping: the ratio's unclipped term is capped at delta, so a "
        "negative-advantage token's loss stays bounded (null: off).",
    )
    sapo_temperature_pos: float = Field(
        1.0, gt=0, description="sapo: gate temperature for positive advantages."
    )
    sapo_temperature_neg: float = Field(
        1.05, gt=0, description="sapo: gate temperature for zero and negative advantages."
    )
    mask_truncated: bool = Field(
        False,
        description="Leave completions cut at max_new_tokens (no EOS) out of the loss; they "
        "still count in their group's statistics.",
    )
    top_entropy_quantile: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Keep in the policy-gradient term only the tokens whose entropy is in the "
        "top quantile of the micro-batch's tokens over all ranks (1: every token).",
    )
    entropy_coef: float = Field(
        0.0,
        description="Subtract entropy_coef × the policy's mean per-token entropy from the loss "
        "(positive: an exploration bonus).",
    )
    kl_estimator: Literal["k1", "k3", "k3_bias_corrected"] = Field(
        "k3_bias_corrected",
        description="Per-token KL term: k1 = log π − log π_ref, k3 = exp(d) − d − 1 with "
        "d = log π_ref − log π, k3_bias_corrected = k3 × the importance ratio (its gradient is "
        "that of KL(π‖π_ref); TRL's use_bias_correction_kl).",
    )
    off_policy_mask: float | None = Field(
        None,
        ge=0,
        description="Drop from the loss the negative-advantage sequences whose mean log-ratio "
        "log μ − log π to the model that sampled them exceeds this (null: off).",
    )
    mu: int = Field(1, ge=1, description="Optimizer passes over each step's generations.")
    shaped_gamma: float = Field(0.1, gt=0, description="shaped peers: f(p) = p/(p+gamma).")
    tis_low: float = Field(0.0, ge=0, description="tis peers: lower clamp of π_θ/μ_peer.")
    tis_high: float = Field(2.0, gt=0, description="tis peers: upper clamp of π_θ/μ_peer.")
    kl_tokens: Literal["policy", "all"] = Field(
        "policy",
        description="Tokens the beta·KL term applies to: the policy's own samples (k3 estimates "
        "KL(π‖ref) only on tokens π sampled), or every trained token, peers' included.",
    )
    constant_tokens: Literal["policy", "longest"] = Field(
        "policy",
        description="aggregation constant: divide by the policy's own max_new_tokens, or by the "
        "longest any member may write.",
    )


class TrainConfig(_Config):
    steps: int = Field(50, ge=1, description="GRPO steps (each: generate, score, update).")
    prompts_per_step: int = Field(8, ge=1, description="Prompts (groups) per step.")
    micro_batch_size: int = Field(
        32, ge=1, description="Candidates per forward/backward (sorted by length when several)."
    )
    micro_batch_tokens: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        None,
        description="At most this many token positions per forward/backward (candidates × "
        "(longest prompt + longest completion)), besides micro_batch_size: short candidates "
        "fill larger micro-batches (null: candidates only). auto: the largest that fits, found "
        "on a GPU by halving after an out-of-memory error, on a CPU from train.memory_limit_gb.",
    )
    memory_limit_gb: float | None = Field(
        None,
        gt=0,
        description="micro_batch_tokens auto on a CPU: the memory the update may use, in GiB "
        "(null: no token limit).",
    )
    lr: float = Field(1e-5, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1).")
    adam_eps: float = Field(
        1e-8, gt=0, description="AdamW epsilon, added to the root of the second moment."
    )
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps of linear warmup.")
    schedule: Literal["constant", "cosine"] = Field("constant", description="LR after warmup.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0: off).")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on a GPU that supports it, fp32 on a CPU."
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads (null: default).")
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each layer's activations in the backward pass instead of keeping "
        "them: less memory, about one more forward pass of time.",
    )
    reuse_sampling_forward: bool = Field(
        True,
        description="The first optimizer pass takes the policy's matrix products at its "
        "completion tokens from sampling instead of computing them again (Llama, Mistral, Qwen2; "
        "when a step's policy candidates fit one micro-batch): the same gradient, about a third "
        "less update arithmetic, sampling's products kept in memory until then.",
    )
    skip_zero_advantage: bool = Field(
        True,
        description="With beta 0 (and no entropy term), leave candidates whose advantage is "
        "exactly 0 (e.g. every "
        "candidate of a group whose rewards are all equal) out of the update's forward and "
        "backward: their share of the loss and of its gradient is exactly 0. They still count "
        "in the loss's normaliser, so the gradient is the same.",
    )
    offload_optimizer: bool = Field(
        False, description="Keep optimizer state in CPU memory (ZeRO stage 1 or more)."
    )
    offload_params: bool = Field(
        False, description="Keep parameters in CPU memory between uses (ZeRO stage 3)."
    )
    generation_weights: Literal["gather", "sharded"] = Field(
        "gather",
        description="ZeRO-3: gather whole weights to generate (fast) or keep them sharded (low "
        "memory, slow).",
    )
    frozen_models: Literal["replicate", "shard"] = Field(
        "replicate",
        description="Reference model and peers: a whole copy on each rank, or sharded across "
        "ranks as ZeRO-3 inference engines (needs zero_stage 3).",
    )
    deepspeed: Annotated[str | dict[str, Any] | None, BeforeValidator(_file_or_mapping)] = Field(
        None,
        description="Raw DeepSpeed config (a .json/.yaml file or a mapping) merged into the one "
        "the recipe implies; a conflicting value is an error.",
    )
    dist_timeout_s: int = Field(
        1800, ge=10, description="Seconds a rank waits for the others before the run fails."
    )
    checkpoint_every: int = Field(
        100, ge=0, description="Checkpoint every N steps and at the end (0: only on SIGTERM)."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept on disk.")
    save_merged: bool = Field(
        False,
        description="With adapters (policy.lora or policy.adapter): also save the base with "
        "the adapters merged in, a plain Hugging Face model, in final/merged.",
    )
    max_bad_updates: int = Field(
        3,
        ge=1,
        description="Updates in a row with a NaN/inf loss or gradient before the run stops.",
    )


class EvalConfig(_Config):
    before: bool = Field(True, description="Measure held-out accuracy before training.")
    after: bool = Field(True, description="Measure held-out accuracy after training.")
    max_prompts: int = Field(300, ge=1, description="Held-out prompts to evaluate.")
    scorer: str = Field("exact_match", description="Reward scorer that decides correctness.")
    params: dict[str, Any] = Field({}, description="Keyword arguments for the eval scorer.")
    max_new_tokens: int | None = Field(
        None,
        ge=1,
        description="Longest completion in evaluation (default: the policy's max_new_tokens).",
    )
    every: int | None = Field(
        None,
        ge=1,
        description="Also evaluate every this many steps during training (null: only before "
        "and after).",
    )
    k: int = Field(
        1,
        ge=1,
        description="Samples per prompt for pass@k (k > 1: sampled at the policy's temperature, "
        "besides the greedy completion that accuracy is measured on).",
    )
    keep_best: bool = Field(
        False,
        description="Keep the model of the best evaluation during training in best/ (needs "
        "eval.every).",
    )


class LimitsConfig(_Config):
    row_bytes: int = Field(
        ROW_BYTES,
        ge=1,
        le=2**30,
        description="Longest row of a prompt file or data set, in bytes (at most 1 GiB): a "
        "longer one is a bad row (data.on_bad_row), never read whole into memory.",
    )
    row_depth: int = Field(
        ROW_DEPTH,
        ge=1,
        le=500,
        description="Deepest nesting of lists and objects in a row (the row itself is 1): a "
        "deeper one is a bad row.",
    )
    recipe_nodes: int = Field(
        RECIPE_NODES,
        ge=1,
        description="Most YAML values a recipe may hold once its aliases (`*name`) are "
        "expanded; read before the rest of the recipe.",
    )


class Recipe(_Config):
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Seed of every random number generator (0 … 2³² − 1)."
    )
    output_dir: str = Field("runs/run", description="Run directory (created).")
    policy: PolicyConfig | None = Field(
        None, description="The model being trained (or `policies`, to train several together)."
    )
    policies: list[CoPolicyConfig] | None = Field(
        None,
        min_length=2,
        description="Co-training: two or more policies trained together, each a peer of the "
        "others (docs/cotraining.md); in place of `policy`.",
    )
    placement: Literal["shared", "split"] = Field(
        "shared",
        description="Co-training on several ranks: every policy on every rank (shared), or "
        "each policy on its own equal share of the ranks (split).",
    )
    peers: list[PeerConfig] = Field([], description="Other models that add candidates.")
    data: DataConfig = Field(DataConfig(), description="Prompt sources.")
    rewards: list[RewardConfig] = Field(
        [RewardConfig(name="exact_match")], min_length=1, description="Weighted reward scorers."
    )
    group: GroupConfig = Field(GroupConfig(), description="How rewards become advantages.")
    loss: LossConfig = Field(LossConfig(), description="GRPO loss settings.")
    train: TrainConfig = Field(TrainConfig(), description="Optimisation settings.")
    eval: EvalConfig = Field(EvalConfig(), description="Held-out evaluation.")
    log: LogConfig = Field(LogConfig(), description="Logging.")
    alerts: AlertsConfig = Field(AlertsConfig(), description="Anomaly alerts (docs/monitoring.md).")
    limits: LimitsConfig = Field(LimitsConfig(), description="Bounds on the size of input.")

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        if self.policies is not None:
            check_policies(self)  # each policy's own recipe runs the checks below
            return self
        if self.policy is None:
            raise ValueError("policy: required (or `policies`, to train several together)")
        if self.policy.model is None:
            raise ValueError("policy.model: required (a path, a hub id or builtin:NAME)")
        self._adapter_checks()
        names = [p.name for p in self.peers]
        for i, name in enumerate(names):
            if name == POLICY or names.index(name) != i:
                raise ValueError(f"peers.{i}.name: {name!r} is taken; give each peer its own name")
        t = self.train
        if t.offload_optimizer and t.zero_stage == 0:
            raise ValueError("train.offload_optimizer: needs train.zero_stage 1, 2 or 3")
        if t.offload_params and t.zero_stage != 3:
            raise ValueError("train.offload_params: needs train.zero_stage 3")
        if t.frozen_models == "shard" and t.zero_stage != 3:
            raise ValueError("train.frozen_models: shard needs train.zero_stage 3")
        if self.loss.tis_low > self.loss.tis_high:
            raise ValueError("loss.tis_low: must not exceed loss.tis_high")
        if self.eval.keep_best and not self.eval.every:
            raise ValueError("eval.keep_best: needs eval.every (the evaluations during training)")
        lo = self.loss
        if lo.delta is not None and lo.type in ("cispo", "sapo"):
            raise ValueError(
                f"loss.delta: {lo.type} has no clipped ratio to cap; delta applies to grpo, "
                "bnpo, dr_grpo, dapo and gspo"
            )
        if lo.delta is not None and lo.delta <= 1 + lo.clip_high:
            raise ValueError(
                f"loss.delta: {lo.delta:g} must exceed 1 + loss.clip_high ({1 + lo.clip_high:g}), "
                "else it cuts into the clipping range"
            )
        for i, p in enumerate(self.peers):
            if p.mode == "baseline_only" and self.group.stats == "policy":
                raise ValueError(
                    f"peers.{i}.mode: baseline_only changes nothing with group.stats: policy "
                    "(the group statistics are then the policy's own, and its candidates get "
                    "no gradient): use group.stats: group, another mode, or leave the peer out"
                )
        size = self.group_size
        if size < 2:
            raise ValueError(
                f"policy.n: a group needs at least 2 candidates, this recipe pools {size}; "
                "raise policy.n or add a peer"
            )
        return self

    def _adapter_checks(self) -> None:
        p, t = self.policy, self.train
        if p.lora is not None and p.adapter is not None:
            raise ValueError(
                "policy.adapter: continues an adapter whose rank and layers are its own; drop "
                "policy.lora (or policy.adapter to start new adapters)"
            )
        adapters = p.lora is not None or p.adapter is not None
        if t.save_merged and not adapters:
            raise ValueError(
                "train.save_merged: needs adapters (policy.lora or policy.adapter); without "
                "them final/ holds the whole model already"
            )
        if adapters and p.dtype is not None:
            raise ValueError(
                "policy.dtype: with adapters the reference is the policy's own frozen base, in "
                "train.precision; drop policy.dtype"
            )
        if t.memory_limit_gb is not None and t.micro_batch_tokens != "auto":
            raise ValueError("train.memory_limit_gb: applies to train.micro_batch_tokens: auto")
        if t.micro_batch_tokens == "auto" and t.zero_stage > 1 and t.memory_limit_gb is None:
            raise ValueError(
                "train.micro_batch_tokens: auto backs off by doing a step's update again, which "
                "needs the gradients held whole until the step's last micro-batch: use "
                "zero_stage 0 or 1, train.memory_limit_gb, or a number"
            )
        for peer in self.peers:
            if peer.model == POLICY_BASE:
                peer.model = p.model  # the same model; with adapters, the same weights

    @property
    def group_size(self) -> int:
        """Candidates per prompt when every member contributes (with `policies`: the first's)."""
        if self.policy is None:
            return sum(p.n for p in self.policies or []) + sum(p.n for p in self.peers)
        return self.policy.n + sum(p.n for p in self.peers)
