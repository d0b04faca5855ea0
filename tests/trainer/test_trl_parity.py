"""Our `grpo_loss` against TRL 1.16's `GRPOTrainer._compute_loss`, on the same tiny model.

A real `GRPOTrainer` (built offline, on the CPU, from a `GRPOConfig` carrying the case's
options) computes its loss with its own fused-head forward from a batch we give it; our side
runs `completion_logprobs_entropy` on the same model object and feeds its log-probs, with the
same old/ref log-probs, advantages and mask, to `grpo_loss`. Log-probs, entropies, losses and
gradients (w.r.t. the per-token log-probs and every model parameter) agree to 1e-6.

The options map as `trl_options` below (docs/migrating-from-trl.md): our gspo is TRL's grpo with
`importance_sampling_level="sequence"`; TRL's cispo caps the ratio at `epsilon_high` itself,
ours at 1 + clip_high; `use_bias_correction_kl` True/False is `kl_estimator`
k3_bias_corrected/k3 (TRL has no k1); TRL's off-policy mask takes the old log-probs as the
sampler's when it is given no `sampling_per_token_logps` (no vLLM), as ours does for the
policy's rows. TRL computes in bf16 autocast unless told otherwise (`bf16` defaults to True,
on the CPU too): the comparison runs in float32. TRL's forward passes no position ids (0, 1, …
across the left padding) where ours counts real tokens only: equal for rotary (relative)
positions, as this Llama's, not for absolute ones (GPT-2), which these tests do not cover.

One micro-batch holding the whole step agrees for every case; with gradient accumulation the
loss types whose TRL normaliser is the step's agree too, and `test_known_differences` pins the
exact gap where it is not (bnpo, and the entropy bonus over kept tokens or micro-batches).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from grpo_ensemble.models.logprobs import TokenBatch, completion_logprobs_entropy  # noqa: E402
from grpo_ensemble.models.tiny import build_tokenizer  # noqa: E402
from grpo_ensemble.trainer.loss import (  # noqa: E402
    TYPE_AGGREGATION,
    BatchSize,
    LossSettings,
    entropy_mask,
    grpo_loss,
)
from grpo_ensemble.trainer.update import entropy_threshold  # noqa: E402

TOL = dict(rtol=0.0, atol=1e-6)
MAX_COMPLETION = 8  # TRL's max_completion_length, our max_new_tokens (dr_grpo's constant)
PROMPT_LENGTHS = [4, 2, 5, 3, 5, 1]  # left-padded to 5
COMPLETION_LENGTHS = [6, 3, 6, 1, 4, 5]  # right-padded to 6 (< MAX_COMPLETION)
ADVANTAGES = [1.2, -0.8, 0.5, -1.5, 0.0, -0.4]
# old log-probs = the model's own + ROW_SHIFT + noise in ±0.35: ratios on both sides of the
# clip range. Row 3 (A < 0, mean log μ − log π = 0.6 > OFF_POLICY) is the one off_policy_mask
# drops; row 5 (A < 0, ratios about e^(0.3 ± 0.35)) is where delta caps the ratio; row 2
# (A > 0) where the high clip and cispo's cap act, row 3 the low clip.
ROW_SHIFT = [0.5, 0.05, -0.3, 0.6, 0.0, -0.3]
OFF_POLICY = 0.3
DELTA = 1.5
WHOLE = [list(range(len(ADVANTAGES)))]  # one micro-batch: the whole step
HALVES = [[0, 1, 2], [3, 4, 5]]  # two accumulated micro-batches of 15 and 10 tokens


def trl_options(s: LossSettings) -> dict:
    """TRL's GRPOConfig options for our loss settings."""
    assert s.aggregation is None and s.kl_tokens == "policy"
    assert s.beta == 0 or s.kl_estimator != "k1", "TRL has no k1 KL estimator"
    return dict(
        loss_type="grpo" if s.type == "gspo" else s.type,
        importance_sampling_level="sequence" if s.type == "gspo" else "token",
        epsilon=s.clip_low,
        epsilon_high=1 + s.clip_high if s.type == "cispo" else s.clip_high,
        beta=s.beta,
        use_bias_correction_kl=s.kl_estimator == "k3_bias_corrected",
        delta=s.delta,
        sapo_temperature_pos=s.sapo_temperature_pos,
        sapo_temperature_neg=s.sapo_temperature_neg,
        entropy_coef=s.entropy_coef,
        top_entropy_quantile=s.top_entropy_quantile,
        off_policy_mask_threshold=s.off_policy_mask,
    )


TYPES = list(TYPE_AGGREGATION)
KL = 0.04
CASES = {
    **{t: LossSettings(type=t, beta=0.0) for t in TYPES},
    **{
        f"{t}-kl-{kl}": LossSettings(type=t, beta=KL, kl_estimator=kl)
        for t in TYPES
        for kl in ("k3", "k3_bias_corrected")
    },
    "grpo-delta": LossSettings(type="grpo", beta=0.0, delta=DELTA),
    "dapo-delta-kl": LossSettings(type="dapo", beta=KL, delta=DELTA),
    "dapo-off-policy": LossSettings(type="dapo", beta=0.0, off_policy_mask=OFF_POLICY),
    "grpo-off-policy-kl": LossSettings(type="grpo", beta=KL, off_policy_mask=OFF_POLICY),
    "gspo-off-policy": LossSettings(type="gspo", beta=0.0, off_policy_mask=OFF_POLICY),
    "dapo-entropy": LossSettings(type="dapo", beta=0.0, entropy_coef=0.05),
    "grpo-entropy": LossSettings(type="grpo", beta=0.0, entropy_coef=0.05),
    "dr_grpo-entropy-kl": LossSettings(type="dr_grpo", beta=KL, entropy_coef=0.05),
    "cispo-entropy": LossSettings(type="cispo", beta=0.0, entropy_coef=0.05),
    "dapo-top-entropy": LossSettings(type="dapo", beta=0.0, top_entropy_quantile=0.5),
    "grpo-top-entropy-kl": LossSettings(type="grpo", beta=KL, top_entropy_quantile=0.5),
    "sapo-temperatures": LossSettings(
        type="sapo", beta=0.0, sapo_temperature_pos=0.7, sapo_temperature_neg=2.0
    ),
    "cispo-cap": LossSettings(type="cispo", beta=0.0, clip_high=0.1),
}
# the sampling temperature (TRL's `temperature`, ours `completion_logprobs`'s) where not 1
TEMPERATURE = {"dapo-entropy": 0.7, "gspo-kl-k3_bias_corrected": 0.7}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama (no dropout) and its tokenizer, saved for TRL to load offline."""
    path = tmp_path_factory.mktemp("trl-parity") / "model"
    tok = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_dropout=0.0,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def token_batch(b: dict) -> TokenBatch:
    return TokenBatch(
        input_ids=torch.cat([b["prompt_ids"], b["completion_ids"]], dim=1),
        attention_mask=torch.cat([b["prompt_mask"], b["completion_mask"]], dim=1),
        completion_ids=b["completion_ids"],
        completion_mask=b["completion_mask"].float(),
    )


@pytest.fixture(scope="module")
def batch(model_dir) -> dict:
    """The fixed batch in TRL's layout: ids, masks, advantages and old/ref log-probs (near the
    model's own, zero on padding as TRL's)."""
    g = torch.Generator().manual_seed(0)
    b, p, c = len(PROMPT_LENGTHS), max(PROMPT_LENGTHS), max(COMPLETION_LENGTHS)
    vocab = len(build_tokenizer())
    prompt_mask = (torch.arange(p) >= p - torch.tensor(PROMPT_LENGTHS).unsqueeze(1)).long()
    completion_mask = (torch.arange(c) < torch.tensor(COMPLETION_LENGTHS).unsqueeze(1)).long()
    out = dict(
        prompt_ids=torch.randint(3, vocab, (b, p), generator=g) * prompt_mask,  # pad id 0
        prompt_mask=prompt_mask,
        completion_ids=torch.randint(3, vocab, (b, c), generator=g) * completion_mask,
        completion_mask=completion_mask,
        advantages=torch.tensor(ADVANTAGES),
    )
    model = LlamaForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        current, _ = completion_logprobs_entropy(model, token_batch(out), entropy=None)
    noise = (torch.rand((b, c), generator=g) - 0.5) * 0.7
    ref_noise = (torch.rand((b, c), generator=g) - 0.5) * 0.8
    shift = torch.tensor(ROW_SHIFT).unsqueeze(1)
    out["old_per_token_logps"] = (current + shift + noise) * completion_mask
    out["ref_per_token_logps"] = (current + 0.1 + ref_noise) * completion_mask
    return out


def trl_trainer(model_dir, out_dir, s: LossSettings, rows: int, steps: int, temperature: float):
    """A real GRPOTrainer for the settings, `steps` micro-batches of `rows` per step."""

    def zero_reward(completions, **kwargs):
        return [0.0] * len(completions)

    args = GRPOConfig(
        output_dir=str(out_dir),
        report_to="none",
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=rows,
        gradient_accumulation_steps=steps,  # and so steps_per_generation
        num_generations=rows,
        max_completion_length=MAX_COMPLETION,
        temperature=temperature,
        gradient_checkpointing=False,
        disable_dropout=True,
        save_strategy="no",
        seed=0,
        **trl_options(s),
    )
    trainer = GRPOTrainer(
        model=str(model_dir),
        reward_funcs=[zero_reward],
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "1+2="}] * rows * steps),
        processing_class=build_tokenizer(),
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = steps  # set by Trainer's training loop
    return trainer


def trl_loss(trainer: GRPOTrainer, part: dict, num_items: torch.Tensor, beta: float):
    """TRL's loss on one micro-batch, with the per-token log-probs and entropies it used."""
    inputs = {k: v for k, v in part.items() if k != "ref_per_token_logps" or beta > 0}
    # as _generate_and_score_completions: the completion tokens of the generation batch
    inputs["num_items_in_batch"] = num_items
    seen = {}
    forward = trainer._get_per_token_logps_and_entropies

    def capture(*args, **kwargs):
        logp, entropy, aux = forward(*args, **kwargs)
        seen.update(logp=logp, entropy=entropy)
        return logp, entropy, aux

    trainer._get_per_token_logps_and_entropies = capture
    try:
        loss = trainer._compute_loss(trainer.model, inputs)
    finally:
        del trainer._get_per_token_logps_and_entropies
    return loss, seen["logp"], seen["entropy"]


def run_both(model_dir, tmp_path, batch, s: LossSettings, parts, temperature=1.0) -> list[dict]:
    """TRL's loss and ours on each micro-batch of `parts` (lists of rows) of one step, after
    checking that the log-probs and entropies agree."""
    trainer = trl_trainer(model_dir, tmp_path, s, len(parts[0]), len(parts), temperature)
    model = trainer.model
    whole_mask = batch["completion_mask"].float()
    size = BatchSize(len(ADVANTAGES), int(whole_mask.sum()), MAX_COMPLETION)
    entropy = "grad" if s.entropy_coef != 0 else "value"
    results = []
    for rows in parts:
        part = {k: v[rows] for k, v in batch.items()}
        loss_trl, logp_trl, ent_trl = trl_loss(trainer, part, whole_mask.sum(), s.beta)
        logp, ent = completion_logprobs_entropy(
            model, token_batch(part), temperature, entropy=entropy
        )
        mask = part["completion_mask"].float()
        real = mask.bool()
        torch.testing.assert_close(logp[real], logp_trl[real], **TOL)
        torch.testing.assert_close(ent[real], ent_trl[real], **TOL)
        keep_tokens = None
        if s.top_entropy_quantile < 1:
            cut = entropy_threshold(ent, mask, s.top_entropy_quantile)
            keep_tokens = entropy_mask(ent.detach(), mask, cut)
            assert 0 < int(keep_tokens.sum()) < int(mask.sum())
        out = grpo_loss(
            logp,
            part["old_per_token_logps"],
            part["ref_per_token_logps"] if s.beta > 0 else None,
            part["advantages"],
            mask,
            size,
            s,
            entropy=ent,
            keep_tokens=keep_tokens,
        )
        results.append(
            dict(trl=loss_trl, logp_trl=logp_trl, out=out, logp=logp, ent=ent.detach(), mask=mask)
        )
        results[-1].update(keep=keep_tokens, model=model, tokens=size.tokens)
    return results


def compare(model_dir, tmp_path, batch, s: LossSettings, parts, temperature=1.0) -> list[dict]:
    """Asserts that the step's losses (summed over the micro-batches) and their gradients
    w.r.t. each micro-batch's per-token log-probs and every model parameter agree."""
    results = run_both(model_dir, tmp_path, batch, s, parts, temperature)
    model = results[0]["model"]
    loss = sum(r["out"].loss for r in results)
    loss_trl = sum(r["trl"] for r in results)
    torch.testing.assert_close(loss, loss_trl, **TOL)
    names = [f"logp[{i}]" for i in range(len(parts))] + [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, [r["logp"] for r in results] + params)
    grads_trl = torch.autograd.grad(loss_trl, [r["logp_trl"] for r in results] + params)
    for name, g, g_trl in zip(names, grads, grads_trl, strict=True):
        assert g.abs().max() > 0, name
        torch.testing.assert_close(g, g_trl, **TOL, msg=lambda m, name=name: f"{name}: {m}")
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_loss_equals_trl(case, model_dir, batch, tmp_path):
    s = CASES[case]
    (r,) = compare(model_dir, tmp_path, batch, s, WHOLE, TEMPERATURE.get(case, 1.0))

    # the options acted on this batch: the agreement is not vacuous
    out = r["out"]
    if s.type != "sapo":
        assert out.clipped.any()
    if s.off_policy_mask is not None:
        assert out.dropped.tolist() == [False, False, False, True, False, False]
    if s.delta is not None:
        ratio = torch.exp(r["logp"].detach() - batch["old_per_token_logps"])
        negative = (batch["advantages"] < 0).unsqueeze(1)
        assert ((ratio > s.delta) & negative & r["mask"].bool()).any()


# TRL with gradient accumulation: grpo/sapo/gspo divide each micro-batch's sequence mean by
# the accumulation steps, dr_grpo its sum by rows × max_completion_length × steps, dapo/cispo
# by the generation batch's tokens: with micro-batches of equal rows, each our whole-step share.
@pytest.mark.parametrize("case", ["grpo", "dr_grpo", "dapo-kl-k3", "cispo", "sapo", "gspo-kl-k3"])
def test_accumulated_micro_batches_equal_trl(case, model_dir, batch, tmp_path):
    compare(model_dir, tmp_path, batch, CASES[case], HALVES)


# Where TRL's normaliser is not the step's: the log-probs and entropies still agree, and the
# losses differ by exactly the difference of the normalisers (steps: accumulation steps).
def entropy_bonus_difference(r, coef, steps):
    """TRL − ours: −coef·Σ H·keep·(1/(steps·Σ keep) − 1/tokens). TRL's bonus is a mean over
    the micro-batch's kept tokens divided by the accumulation steps; ours the micro-batch's
    Σ H·keep over all the step's tokens, kept or not."""
    kept = r["mask"] if r["keep"] is None else r["mask"] * r["keep"]
    h = (r["ent"] * kept).sum()
    return -coef * h * (1 / (steps * kept.sum()) - 1 / r["tokens"])


def bnpo_difference(r, steps):
    """TRL − ours: S·(1/(steps·n) − 1/tokens), S the micro-batch's Σ loss·mask, n its tokens:
    TRL's bnpo is the micro-batch's token mean divided by the accumulation steps, ours the
    micro-batch's Σ loss·mask over all the step's tokens (its share of the step's token mean)."""
    s = r["out"].loss.detach() * r["tokens"]
    return s * (1 / (steps * r["mask"].sum()) - 1 / r["tokens"])


@pytest.mark.parametrize(
    "settings,parts,difference",
    [
        pytest.param(  # the entropy bonus with top_entropy_quantile < 1, one micro-batch
            LossSettings(type="dapo", beta=0.0, entropy_coef=0.05, top_entropy_quantile=0.5),
            WHOLE,
            lambda r: entropy_bonus_difference(r, 0.05, 1),
            id="entropy-top-quantile",
        ),
        pytest.param(  # the entropy bonus, micro-batches of 15 and 10 tokens
            LossSettings(type="dapo", beta=0.0, entropy_coef=1.0),
            HALVES,
            lambda r: entropy_bonus_difference(r, 1.0, 2),
            id="entropy-accumulated",
        ),
        pytest.param(  # bnpo, micro-batches of 15 and 10 tokens
            LossSettings(type="bnpo", beta=KL),
            HALVES,
            lambda r: bnpo_difference(r, 2),
            id="bnpo-accumulated",
        ),
    ],
)
def test_known_differences(settings, parts, difference, model_dir, batch, tmp_path):
    results = run_both(model_dir, tmp_path, batch, settings, parts)
    gap = sum(r["trl"] - r["out"].loss for r in results).detach()
    predicted = sum(difference(r) for r in results)
    assert abs(gap) > 1e-5
    torch.testing.assert_close(gap, predicted, **TOL)
