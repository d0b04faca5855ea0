"""LoRA adapters (PEFT) on the policy: only the adapters train, the frozen base is also the
reference model and any peer whose model is the policy's, checkpoints resume bitwise, and
final/ is an adapter folder (plus a merged model on request)."""

import json

import pytest
import torch
from helpers import batches_of, rollout_of, update_inputs
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from grpo_ensemble import train
from grpo_ensemble.cli import main
from grpo_ensemble.models.adapters import adapters_off
from grpo_ensemble.models.loading import load_model, resolve_model
from grpo_ensemble.trainer.setup import build_run
from grpo_ensemble.trainer.update import frozen_logprobs, update

peft = pytest.importorskip("peft")

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
SMALL = "builtin:tiny-arith-small"


def _randomise_adapters(module: torch.nn.Module, seed: int = 0) -> None:
    """New adapters compute nothing (B = 0); nonzero B makes them change the logits. A and B
    both from `seed`: the same adapters in every run built with it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _params_in_memory(run) -> int:
    """Parameters held by every model of the run, each tensor counted once."""
    models = [run.engine.module, run.ref_model]
    models += [getattr(m.generator, "model", None) for m in run.ensemble.members]
    seen, total = set(), 0
    for model in models:
        if not isinstance(model, torch.nn.Module):
            continue
        for p in model.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel()
    return total


def test_only_the_adapters_train_and_only_they_are_in_the_optimizer(small_recipe, tmp_path):
    run = build_run(small_recipe(policy__lora=LORA), tmp_path)
    module = run.engine.module
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    in_optimizer = {id(p) for g in run.engine.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in trainable.values()}
    # by hand: rank 4 on q (hidden → heads × head_dim) and v (hidden → kv heads × head_dim)
    c = module.config
    head = c.hidden_size // c.num_attention_heads
    q_out, v_out = c.num_attention_heads * head, c.num_key_value_heads * head
    per_layer = 4 * c.hidden_size + q_out * 4 + 4 * c.hidden_size + v_out * 4
    assert sum(p.numel() for p in trainable.values()) == c.num_hidden_layers * per_layer
    # a step moves the adapters and nothing else
    _randomise_adapters(module)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    batches = batches_of(run, rollout_of(run))
    update(update_inputs(run), run.settings.update, batches)
    moved = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= set(trainable)


def test_the_reference_is_the_base_with_the_adapters_off(small_recipe, tmp_path):
    recipe = small_recipe(policy__lora=LORA, loss__beta=0.1)
    runs = [build_run(recipe, tmp_path / str(i)) for i in range(2)]
    for run in runs:
        assert run.ref_model is run.engine.module  # no second copy loaded
        _randomise_adapters(run.engine.module)
    base, _ = load_model(SMALL, "policy.model")
    base.requires_grad_(False).eval()
    rollout = rollout_of(runs[0])
    batches = batches_of(runs[0], rollout)
    module, temperature = runs[0].engine.module, runs[0].settings.update.temperature
    with adapters_off(module):
        off = frozen_logprobs(module, batches, temperature)
    plain = frozen_logprobs(base, batches, temperature)
    on = frozen_logprobs(module, batches, temperature)
    for a, b, c in zip(off, plain, on, strict=True):
        assert torch.equal(a, b)
        assert (a - c).abs().max() > 1e-3  # the adapters matter here
    assert all(p.requires_grad for n, p in module.named_parameters() if "lora_" in n)
    # the update with the shared base as reference = the update with a separately loaded base
    other_batches = batches_of(runs[1], rollout)
    shared = update(update_inputs(runs[0]), runs[0].settings.update, batches)
    u = update_inputs(runs[1])
    u.ref_model = base
    separate = update(u, runs[1].settings.update, other_batches)
    assert shared["kl"] > 0
    assert {k: v for k, v in shared.items() if not k.startswith("time")} == {
        k: v for k, v in separate.items() if not k.startswith("time")
    }
    for (n, p), (_, q) in zip(
        runs[0].engine.module.named_parameters(),
        runs[1].engine.module.named_parameters(),
        strict=True,
    ):
        assert torch.equal(p, q), n


def test_a_peer_that_is_the_policys_base_shares_its_weights(small_recipe, tmp_path):
    peer = {"name": "base", "model": "policy_base", "n": 2, "sampling": {"max_new_tokens": 5}}
    lora = build_run(
        small_recipe(policy__lora=LORA, loss__beta=0.1, peers=[peer]), tmp_path / "lora"
    )
    full = build_run(small_recipe(loss__beta=0.1, peers=[peer]), tmp_path / "full")
    base = sum(p.numel() for p in full.engine.module.parameters())
    adapters = sum(p.numel() for p in lora.engine.module.parameters() if p.requires_grad)
    # full fine-tuning: the policy, its reference and the peer, three copies; LoRA: one base
    assert _params_in_memory(full) == 3 * base
    assert _params_in_memory(lora) == base + adapters
    generator = lora.ensemble.members[1].generator
    assert generator.model is lora.engine.module and not generator.adapters
    # it samples what the base model samples, adapters or not
    _randomise_adapters(lora.engine.module)
    prompts = lora.sampler.next(3)
    from grpo_ensemble.engine.hf import HFGenerator
    from grpo_ensemble.plugins.interfaces import SamplingParams

    sampling = SamplingParams(max_new_tokens=5, seeds=(1, 2, 3))
    shared = generator.generate(prompts, 4, sampling)
    alone = HFGenerator(resolve_model(SMALL, "model")).generate(prompts, 4, sampling)
    assert [[c.token_ids for c in g] for g in shared] == [[c.token_ids for c in g] for g in alone]
    policy = lora.ensemble.members[0].generator.generate(prompts, 4, sampling)
    assert [[c.token_ids for c in g] for g in policy] != [[c.token_ids for c in g] for g in alone]


def _adapter_weights(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def test_final_is_an_adapter_folder_and_merged_a_plain_model(small_recipe, tmp_path):
    recipe = small_recipe(
        policy__lora=LORA, train__save_merged=True, train__lr=1e-2, eval__after=False
    )
    result = train(recipe)
    final = result.model_dir
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == resolve_model(SMALL, "policy.model")
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(final).eval()
    merged = AutoModelForCausalLM.from_pretrained(final / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(resolve_model(SMALL, "policy.model")).eval()
    assert not any("lora" in k for k in merged.state_dict())
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits for m in (loaded, merged, base))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert (a - c).abs().max() > 1e-4  # trained


def test_resume_with_adapters_is_bitwise(small_recipe, tmp_path):
    def recipe(out, steps):
        return small_recipe(
            output_dir=str(out),
            policy__lora=LORA,
            loss__beta=0.05,
            loss__mu=2,
            train__steps=steps,
            train__checkpoint_every=2,
            train__lr=1e-2,
            eval__before=False,
            eval__after=False,
        )

    whole = train(recipe(tmp_path / "whole", 4))
    train(recipe(tmp_path / "cut", 2))
    resumed = train(recipe(tmp_path / "cut", 4), resume="auto")
    assert resumed.resumed_from is not None
    a, b = _adapter_weights(whole.model_dir), _adapter_weights(resumed.model_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def rows(result):
        return [{k: v for k, v in m.items() if not k.startswith("time")} for m in result.metrics]

    assert rows(resumed) == rows(whole)[2:]


def test_training_continues_from_an_adapter_folder(small_recipe, tmp_path):
    first = train(small_recipe(output_dir=str(tmp_path / "a"), policy__lora=LORA, train__lr=1e-2))
    again = train(
        small_recipe(
            output_dir=str(tmp_path / "b"),
            policy__adapter=str(first.model_dir),
            train__lr=1e-2,
        )
    )
    # the second run starts where the first ended: its "before" is the first's "after"
    assert again.before.accuracy == first.after.accuracy
    assert json.loads((again.model_dir / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.parametrize(
    "setting, field, says",
    [
        (
            ["policy.lora.target_modules=[q_proj, qproj]"],
            "policy.lora.target_modules.1",
            "'qproj' matches no module of the model (its layers: q_proj, k_proj",
        ),
        (["peers.0.lora.r=4"], "peers.0.lora", "a peer's model is frozen"),
        (["train.save_merged=true"], "train.save_merged", "needs adapters"),
        (
            ["policy.lora.r=4", "policy.adapter=/nowhere/adapter"],
            "policy.adapter",
            "drop policy.lora",
        ),
        (["policy.adapter=/nowhere/adapter"], "policy.adapter", "does not exist"),
        (["policy.lora.r=4", "policy.dtype=bf16"], "policy.dtype", "drop policy.dtype"),
    ],
)
@pytest.mark.parametrize("command", ["validate", "train"])
def test_bad_adapter_settings_are_one_line_before_training(
    command, setting, field, says, tmp_path, capsys
):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"output_dir: {tmp_path / 'run'}\npolicy: {{model: {SMALL}, n: 2}}\n"
        "peers: [{name: strong, model: builtin:tiny-arith-base, n: 2}]\ntrain: {steps: 1}\n"
    )
    args = [command, str(recipe)] + [x for s in setting for x in ("--set", s)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert field in err and says in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_adapter_of_another_base_is_refused(small_recipe, tmp_path, capsys):
    first = train(
        small_recipe(output_dir=str(tmp_path / "a"), policy__lora=LORA, eval__after=False)
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"output_dir: {tmp_path / 'b'}\npolicy: {{model: builtin:tiny-arith-base, n: 2, "
        f"adapter: {first.model_dir}}}\npeers: [{{name: p, model: {SMALL}, n: 2}}]\n"
    )
    for command in ("validate", "train"):
        assert main([command, str(recipe)]) == 2
        err = capsys.readouterr().err
        assert "policy.adapter: the adapter was trained on" in err
        assert "give the adapter's base model as policy.model" in err


def test_the_python_api_takes_a_model_object_plain_or_peft(small_recipe, tmp_path):
    peer = {"name": "base", "model": "policy_base", "n": 2, "sampling": {"max_new_tokens": 5}}
    path = resolve_model(SMALL, "policy.model")
    wrapped = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(path),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"], task_type="CAUSAL_LM"),
    )
    recipe = small_recipe(peers=[peer], loss__beta=0.05, train__lr=1e-2, eval__after=False)
    result = train(recipe, model=wrapped)
    config = json.loads((result.model_dir / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["target_modules"] == ["o_proj"]
    assert (
        float(next(p for n, p in wrapped.named_parameters() if "lora_B" in n).detach().abs().max())
        > 0
    )
    # a plain module: trained whole; the recipe's lora applies to it too
    plain = AutoModelForCausalLM.from_pretrained(path)
    before = plain.model.norm.weight.detach().clone()
    out = tmp_path / "plain"
    result = train(small_recipe(output_dir=str(out), eval__after=False), model=plain)
    assert (result.model_dir / "model.safetensors").is_file()
    assert not torch.equal(plain.model.norm.weight, before)
    with pytest.raises(Exception, match="a PEFT model brings its own adapters"):
        train(small_recipe(output_dir=str(tmp_path / "x"), policy__lora=LORA), model=wrapped)
    with pytest.raises(Exception, match="give a transformers causal LM or a PEFT model"):
        train(small_recipe(output_dir=str(tmp_path / "y")), model="gpt2")


def test_the_merged_weights_are_peft_own_merge_embeddings_included():
    # LoRA on an embedding keeps its adapters in lora_embedding_A/B: merged too, equal to
    # PEFT's merge_and_unload (the reference); the model itself is left as it was
    import copy

    from grpo_ensemble.models.adapters import merged_state_dict

    base = AutoModelForCausalLM.from_pretrained(resolve_model(SMALL, "policy.model"))
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "embed_tokens"], task_type="CAUSAL_LM"
    )
    model = peft.get_peft_model(base, config)
    _randomise_adapters(model)
    ours = merged_state_dict(model.get_base_model())  # the module the engine trains
    theirs = copy.deepcopy(model).merge_and_unload().state_dict()
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.allclose(ours[key], theirs[key], atol=1e-6), key
    embed = "model.embed_tokens.weight"
    assert not torch.equal(ours[embed], model.get_base_model().model.embed_tokens.weight)


def test_only_plain_lora_adapters_are_taken(small_recipe, tmp_path):
    # DoRA, modules trained whole beside the adapters, other adapter types: one line each,
    # from a folder (the recipe's field) and from a PEFT model given in Python
    path = resolve_model(SMALL, "policy.model")
    cases = {
        "use_dora": peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True),
        "modules_to_save": peft.LoraConfig(
            r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]
        ),
        "IA3": peft.IA3Config(
            target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
    }
    for key, config in cases.items():
        wrapped = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(path), config)
        folder = tmp_path / key
        wrapped.save_pretrained(folder)
        recipe = small_recipe(output_dir=str(tmp_path / f"run-{key}"), policy__adapter=str(folder))
        with pytest.raises(Exception, match=rf"^policy\.adapter: .*{key}"):
            build_run(recipe, tmp_path / f"b-{key}")
        with pytest.raises(Exception, match=rf"^model: adapter 'default': .*{key}"):
            train(small_recipe(output_dir=str(tmp_path / f"api-{key}")), model=wrapped)


def test_a_shared_base_peer_takes_the_policys_template_and_a_frozen_module_is_refused(
    small_recipe, tmp_path
):
    peer = {"name": "base", "model": "policy_base", "n": 2, "chat_template": "{{ bos_token }}"}
    with pytest.raises(Exception, match=r"^peers\.0\.chat_template: this peer shares the"):
        build_run(small_recipe(policy__lora=LORA, peers=[peer]), tmp_path / "a")
    frozen = AutoModelForCausalLM.from_pretrained(resolve_model(SMALL, "policy.model"))
    frozen.requires_grad_(False)
    with pytest.raises(Exception, match=r"^model: every weight of the module is frozen"):
        train(small_recipe(output_dir=str(tmp_path / "f")), model=frozen)
