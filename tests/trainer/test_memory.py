"""train.micro_batch_tokens: auto — the back-off after an out-of-memory error (simulated on a
CPU by a limit on the positions of a training forward, raised as torch's own error from inside
the model's forward) and the CPU budget from train.memory_limit_gb."""

import pytest
import torch

from grpo_ensemble.cli import main
from grpo_ensemble.trainer.memory import GIB
from grpo_ensemble.trainer.setup import build_run
from grpo_ensemble.trainer.step import grpo_step

LIMIT = 40  # token positions a training forward may hold before "running out of memory"


def _limit_training_forwards(model: torch.nn.Module, seen: list) -> None:
    """Training forwards (with a graph for the backward) of more than LIMIT positions raise
    torch.OutOfMemoryError, as a GPU's allocator does; sampling and the no-grad log-prob
    passes are left alone."""

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if torch.is_grad_enabled() and ids is not None:
            seen.append(ids.numel())
            if ids.numel() > LIMIT:
                raise torch.OutOfMemoryError("simulated: CUDA out of memory")

    model.register_forward_pre_hook(hook, with_kwargs=True)


def _train(run, steps: int) -> list[dict]:
    torch.manual_seed(0)
    return [grpo_step(run, step) for step in range(1, steps + 1)]


def _drop_times(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time")} for r in rows]


@pytest.mark.parametrize("stage", [0, 1])
def test_out_of_memory_backs_off_to_the_update_of_the_smaller_budget(
    small_recipe, tmp_path, stage, capsys
):
    changes = dict(loss__beta=0.05, loss__mu=2, train__zero_stage=stage, train__lr=1e-3)
    auto = build_run(small_recipe(train__micro_batch_tokens="auto", **changes), tmp_path / "a")
    assert auto.budget.auto and auto.budget.tokens is None  # unlimited until memory runs out
    seen: list[int] = []
    _limit_training_forwards(auto.engine.module, seen)
    rows = _train(auto, 3)
    chosen = auto.budget.tokens
    assert chosen is not None and chosen <= LIMIT
    assert max(seen) > LIMIT  # it did run out, and then every forward fit
    assert [r["micro_batch_tokens"] for r in rows] == [chosen] * 3
    err = capsys.readouterr().err
    assert f"now at most {chosen}" in err and "train.micro_batch_tokens auto" in err
    # the run with that budget from the start computes exactly the same
    fixed = build_run(small_recipe(train__micro_batch_tokens=chosen, **changes), tmp_path / "f")
    expected = _train(fixed, 3)
    got = [{k: v for k, v in r.items() if k != "micro_batch_tokens"} for r in rows]
    assert _drop_times(got) == _drop_times(expected)
    for (name, a), (_, b) in zip(
        auto.engine.module.named_parameters(),
        fixed.engine.module.named_parameters(),
        strict=True,
    ):
        assert torch.equal(a, b), name


def test_a_single_candidate_that_does_not_fit_stops_with_one_line(small_recipe, tmp_path):
    from grpo_ensemble.errors import RunError

    run = build_run(small_recipe(train__micro_batch_tokens="auto"), tmp_path)
    run.engine.module.register_forward_pre_hook(
        lambda m, a, k: (
            (_ for _ in ()).throw(torch.OutOfMemoryError("simulated"))
            if torch.is_grad_enabled()
            else None
        ),
        with_kwargs=True,
    )
    with pytest.raises(RunError, match="out of memory with a micro-batch of one candidate"):
        _train(run, 1)


def test_memory_limit_sets_the_budget_on_a_cpu(small_recipe, tmp_path, capsys):
    run = build_run(
        small_recipe(train__micro_batch_tokens="auto", train__memory_limit_gb=0.01), tmp_path
    )
    m = run.engine.module
    c = m.config
    # by hand: fp32 weights + (gradient + two fp32 moments) of every trained weight, and the
    # frozen peer's fp32 weights (no reference: beta 0)
    params = sum(p.numel() for p in m.parameters())
    peer = sum(p.numel() for p in run.ensemble.members[1].generator.model.parameters())
    assert run.ref_model is None and peer > 0
    fixed = params * 4 + params * (4 + 8) + peer * 4
    width = max(len(run.prompt_ids(p)) for p in run.sampler.prompts) + 5
    per_layer = 12 * c.hidden_size + 3 * c.intermediate_size + 2 * c.num_attention_heads * width
    per_position = 4 * (c.num_hidden_layers * per_layer + 3 * c.vocab_size)
    assert run.budget.tokens == int((0.01 * GIB - fixed) // per_position)
    assert f"at most {run.budget.tokens} token positions" in capsys.readouterr().err
    assert run.settings.update.back_off is False  # a CPU's budget is set, not found


@pytest.mark.parametrize(
    "setting, field, says",
    [
        (
            ["train.micro_batch_tokens=auto", "train.memory_limit_gb=0.0001"],
            "train.memory_limit_gb",
            "does not hold the model",
        ),
        (["train.memory_limit_gb=4"], "train.memory_limit_gb", "applies to"),
        (
            ["train.micro_batch_tokens=auto", "train.zero_stage=2"],
            "train.micro_batch_tokens",
            "use zero_stage 0 or 1",
        ),
        (["train.micro_batch_tokens=most"], "train.micro_batch_tokens", ""),
    ],
)
def test_bad_budget_settings_are_one_line(setting, field, says, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"output_dir: {tmp_path / 'run'}\npolicy: {{model: builtin:tiny-arith-small, n: 2}}\n"
        "train: {steps: 1}\neval: {before: false, after: false}\n"
    )
    args = ["train", str(recipe)] + [x for s in setting for x in ("--set", s)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert field in err and says in err


def test_a_resumed_run_keeps_the_budget_it_had_backed_off_to(tmp_path):
    # the checkpoint's metrics rows say the size by its step; later rows (of the run before a
    # resume from an earlier checkpoint) do not count, and a fixed budget is left alone
    import json

    from grpo_ensemble.trainer.memory import TokenBudget, restore_budget

    rows = [{"step": 1}, {"step": 2, "micro_batch_tokens": 64}]
    rows += [{"step": 3, "micro_batch_tokens": 32}, {"step": 4, "micro_batch_tokens": 16}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for step, want in [(1, None), (2, 64), (3, 32), (4, 16)]:
        budget = TokenBudget(None, auto=True)
        restore_budget(budget, tmp_path, step)
        assert budget.tokens == want, step
    fixed = TokenBudget(128)
    restore_budget(fixed, tmp_path, 4)
    assert fixed.tokens == 128


def test_out_of_memory_in_the_reference_pass_backs_off_too(small_recipe, tmp_path):
    # the no-grad reference pass runs before any gradient: one that does not fit halves the
    # budget as the training pass does, and the step is the smaller budget's
    changes = dict(loss__beta=0.05, train__lr=1e-3)
    auto = build_run(small_recipe(train__micro_batch_tokens="auto", **changes), tmp_path / "a")
    seen: list[int] = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if not torch.is_grad_enabled() and ids is not None:
            seen.append(ids.numel())
            if ids.numel() > LIMIT:
                raise torch.OutOfMemoryError("simulated: CUDA out of memory")

    auto.ref_model.register_forward_pre_hook(hook, with_kwargs=True)
    rows = _train(auto, 2)
    chosen = auto.budget.tokens
    assert chosen is not None and chosen <= LIMIT and max(seen) > LIMIT
    fixed = build_run(small_recipe(train__micro_batch_tokens=chosen, **changes), tmp_path / "f")
    expected = _train(fixed, 2)
    got = [{k: v for k, v in r.items() if k != "micro_batch_tokens"} for r in rows]
    assert _drop_times(got) == _drop_times(expected)
