"""The DeepSpeed-facing pieces that are plain functions: schedule, config, precision."""

import math

import pytest
import torch

from grpo_ensemble.models.loading import load_model
from grpo_ensemble.trainer.deepspeed import (
    build_engine,
    deepspeed_config,
    fastest_adamw,
    lr_lambda,
    resolve_dtype,
)
from grpo_ensemble.trainer.update import optimizer_step


def test_warmup_then_constant(small_recipe):
    f = lr_lambda(small_recipe(train__warmup_steps=3, train__steps=10))
    assert [f(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_warmup_then_cosine_over_optimizer_steps(small_recipe):
    # 4 GRPO steps × μ 2 = 8 optimizer steps; 2 of warmup, cosine over the other 6
    f = lr_lambda(
        small_recipe(train__warmup_steps=2, train__steps=4, train__schedule="cosine", loss__mu=2)
    )
    assert f(0) == pytest.approx(1 / 3) and f(1) == pytest.approx(2 / 3)
    assert f(2) == 1.0
    assert f(5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert f(8) == pytest.approx(0.0)


def test_deepspeed_config_from_recipe(small_recipe):
    r = small_recipe(train__zero_stage=3, train__max_grad_norm=0.5)
    cfg = deepspeed_config(r, micro_batch=8, dtype=torch.float32)
    assert cfg["zero_optimization"] == {"stage": 3}
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"] == {"enabled": False}
    assert cfg["train_micro_batch_size_per_gpu"] == 8


def test_precision_auto_is_fp32_on_cpu_and_bf16_there_is_said(small_recipe, capsys, monkeypatch):
    from grpo_ensemble import dist

    monkeypatch.setattr(dist, "warned", set())  # as in a fresh process
    assert not torch.cuda.is_available()
    assert resolve_dtype(small_recipe()) == torch.float32
    assert capsys.readouterr().err == ""
    assert resolve_dtype(small_recipe(train__precision="bf16")) == torch.bfloat16
    assert capsys.readouterr().err == (
        "warning: train.precision: bf16 without a GPU: matrix products run far slower than in "
        "fp32 on most CPUs, and the final model is saved in bf16; use auto or fp32 for a CPU "
        "run\n"
    )
    assert resolve_dtype(small_recipe(train__precision="bf16")) == torch.bfloat16
    assert capsys.readouterr().err == ""  # once per process


def test_every_model_of_a_run_takes_its_precision(small_recipe, tmp_path):
    """train.precision bf16: the policy, the reference and a peer loaded from the recipe are
    all bf16 (a peer stayed fp32 before: twice the memory and slow next to a bf16 policy)."""
    from grpo_ensemble.trainer.setup import build_run

    run = build_run(small_recipe(train__precision="bf16", loss__beta=0.04), tmp_path)
    models = {m.name: m.generator.model for m in run.ensemble.members}
    models.update(engine=run.engine.module, reference=run.ref_model)
    assert set(models) == {"policy", "strong", "engine", "reference"}
    assert {k: {p.dtype for p in m.parameters()} for k, m in models.items()} == {
        k: {torch.bfloat16} for k in models
    }


def test_engine_step_equals_plain_torch_adamw(small_recipe):
    """One optimizer step of our engine (fused AdamW, DeepSpeed's clipping, no all-reduce copy
    on one rank) against torch's reference AdamW loop with the same clipping."""
    # an epsilon far from the default, so that the recipe's reaching AdamW shows
    recipe = small_recipe(
        train__lr=1e-2, train__max_grad_norm=0.5, train__weight_decay=0.1, train__adam_eps=1e-3
    )
    model, _ = load_model("builtin:tiny-arith-small", "policy.model")
    reference, _ = load_model("builtin:tiny-arith-small", "policy.model")
    engine = build_engine(recipe, model, torch.float32)
    assert fastest_adamw(list(model.parameters())) == {"fused": True}
    ids = torch.tensor([[1, 5, 6, 7, 8, 9], [1, 9, 8, 7, 6, 5]])

    def loss_of(m):
        return m(input_ids=ids, use_cache=False).logits.square().mean()

    for _ in range(2):
        engine.backward(loss_of(engine))
        engine.step()
    initial = {n: p.detach().clone() for n, p in reference.named_parameters()}
    opt = torch.optim.AdamW(
        reference.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-3, foreach=False
    )
    for _ in range(2):
        opt.zero_grad()
        loss_of(reference).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        opt.step()
    moved = 0.0
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=name)  # steps: ~1e-2
        moved = max(moved, float((q.detach() - initial[name]).abs().max()))
    assert moved > 1e-3  # the steps did move the weights


def test_bf16_engine_step_equals_adamw_on_fp32_master_weights(small_recipe):
    """bf16 without ZeRO: DeepSpeed keeps fp32 master weights and steps AdamW on them. The first
    step equals torch's AdamW from fresh state on fp32 copies of the bf16 weights, given the
    same (bf16) gradient. (DeepSpeed's own set-up step had left AdamW's step count at 1 and the
    masters decayed once: the first update was about 0.74× as large.)"""
    recipe = small_recipe(
        train__lr=1e-2, train__max_grad_norm=0.5, train__weight_decay=0.1, train__precision="bf16"
    )
    model, _ = load_model("builtin:tiny-arith-small", "policy.model", torch.bfloat16)
    masters = [p.detach().float().clone() for p in model.parameters()]
    engine = build_engine(recipe, model, torch.bfloat16)
    assert not engine.optimizer.optimizer.state  # no step taken yet
    for master, kept in zip(masters, engine.optimizer.fp32_groups[0], strict=True):
        assert torch.equal(master, kept)
    ids = torch.tensor([[1, 5, 6, 7, 8, 9], [1, 9, 8, 7, 6, 5]])
    engine.backward(engine(input_ids=ids, use_cache=False).logits.float().square().mean())
    for master, p in zip(masters, model.parameters(), strict=True):
        master.grad = p.grad.float()
    norm = torch.linalg.vector_norm(torch.cat([m.grad.double().flatten() for m in masters]))
    assert optimizer_step(engine) == pytest.approx(float(norm), rel=1e-6)  # in fp32, not bf16
    torch.nn.utils.clip_grad_norm_(masters, 0.5)
    torch.optim.AdamW(masters, lr=1e-2, weight_decay=0.1, eps=1e-8, foreach=False).step()
    (kept,) = engine.optimizer.fp32_groups
    assert {float(s["step"]) for s in engine.optimizer.optimizer.state.values()} == {1.0}
    for i, (want, got) in enumerate(zip(masters, kept, strict=True)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=f"parameter {i}")
        assert torch.equal(list(model.parameters())[i], got.to(torch.bfloat16))


def test_the_lr_metric_is_the_rate_the_steps_optimizer_steps_used(small_recipe):
    # warmup 3, μ 2: GRPO step 1 takes optimizer steps 0 and 1 (rates 1/4 and 2/4 of lr),
    # step 2 takes 2 and 3 (3/4 and 1); the metric was read after the schedule had moved on
    from grpo_ensemble.trainer.loop import train

    recipe = small_recipe(train__warmup_steps=3, train__steps=2, loss__mu=2, peers=[])
    rows = train(recipe, overrides=["eval.before=false", "eval.after=false"]).metrics
    lr = recipe.train.lr
    assert [r["lr"] for r in rows] == pytest.approx([lr * 0.375, lr * 0.875])


def test_rendezvous_folders_of_processes_gone_are_removed(tmp_path):
    """A lone run's rendezvous folder is `grpo-ensemble-PID-…`; a run killed with SIGKILL
    cannot remove its own, so the next run removes those whose process no longer runs."""
    import os
    import subprocess
    import sys

    from grpo_ensemble.trainer.deepspeed import remove_stale_stores

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    ).stdout.strip()
    dead = tmp_path / f"grpo-ensemble-{gone}-abc"
    alive = tmp_path / f"grpo-ensemble-{os.getpid()}-def"
    other = tmp_path / "grpo-ensemble-digits"  # not a rendezvous folder
    for folder in (dead, alive, other):
        (folder / "store").mkdir(parents=True)
    assert remove_stale_stores(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other.name])


def test_frozen_members_take_their_own_precision(small_recipe, tmp_path):
    # an fp32 policy beside a bf16 reference (policy.dtype) and a bf16 peer (peers[i].dtype)
    import math

    from grpo_ensemble.trainer.setup import build_run
    from grpo_ensemble.trainer.step import grpo_step

    recipe = small_recipe(loss__beta=0.05, policy__dtype="bf16", peers__0__dtype="bf16")
    run = build_run(recipe, tmp_path)
    peer = next(m.generator for m in run.ensemble.members if m.name == "strong")
    assert {p.dtype for p in run.engine.module.parameters()} == {torch.float32}
    assert {p.dtype for p in run.ref_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in peer.model.parameters()} == {torch.bfloat16}
    row = grpo_step(run, 1)
    assert math.isfinite(row["loss"]) and row["kl"] >= 0 and row["member/strong/candidates"] == 8
