"""The sampling loop's fast paths against the model's own forward: the preallocated cache and
the lean decode step of the Llama family, and the fallback for other models."""

import pytest
import torch
from tiny_llms import SHAPE, LowRank, build, left_padded, use_columns
from transformers.cache_utils import DynamicLayer

import grpo_ensemble.engine.decode as decode_module
import grpo_ensemble.engine.sampling as sampling_module
from grpo_ensemble.engine.decode import LeanDecoder
from grpo_ensemble.engine.sampling import sample
from grpo_ensemble.models.kvcache import GrowingLayer, cache_of, distinct_rows, preallocated_cache


def test_growing_layer_returns_what_concatenation_returns():
    torch.manual_seed(0)
    ours, ref = type("L", (GrowingLayer,), {"room": 5})(), DynamicLayer()
    for length in (3, 1, 1, 2, 1):  # 8 positions: past the room of 5, so it grows once
        k, v = torch.randn(2, 3, length, 4), torch.randn(2, 3, length, 4)
        got, want = ours.update(k, v), ref.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert ours.get_seq_length() == 8


class OtherNorm(torch.nn.Module):
    """A norm the lean step does not compute itself (a LayerNorm in place of the RMS norm)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)

    def forward(self, x):
        return self.norm(x)


def lean_against_forward(model, steps: int = 5, atol: float = 2e-6, static: bool = False):
    """The lean step's logits against the model's forward, over `steps` tokens; the decoder
    (the static one, as a GPU's graph replays it, where `static`)."""
    ids, mask = left_padded()
    full = torch.cat([mask, torch.ones(mask.shape[0], steps, dtype=mask.dtype)], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    new = torch.randint(3, 23, (steps, ids.shape[0]), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = preallocated_cache(model, ids.shape[1] + steps)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **cache)
        lean = LeanDecoder.build(model, cache_of(out), full, static=static)
        assert lean is not None
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        for t in range(steps):
            p = pos[:, -1:] + 1 + t
            got = lean(new[t], p)
            ref = model(
                input_ids=new[t][:, None],
                attention_mask=full[:, : ids.shape[1] + t + 1],
                position_ids=p,
                use_cache=True,
                cache=ref.cache,
            )
            assert got.dtype == ref.logits.dtype
            torch.testing.assert_close(got, ref.logits[:, -1], rtol=0, atol=atol)
    return lean


@pytest.mark.parametrize("columns", [True, False])
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "llama-dynamic"])
def test_lean_step_equals_the_models_forward(kind, fuse, columns, monkeypatch):
    # fused: q/k/v and gate/up stacked into one product each (small models); else the
    # model's own projections
    monkeypatch.setattr(decode_module, "FUSE_MAX_BYTES", 2**40 if fuse else 0)
    use_columns(monkeypatch, columns)
    lean = lean_against_forward(build(kind))
    assert lean.columns == columns
    assert all((qkv is not None) == fuse for qkv, _ in lean.fused)
    assert all((gate_up is not None) == fuse for _, gate_up in lean.fused)
    assert (lean.rope is None) == (kind == "llama-dynamic")


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_static_step_equals_the_models_forward(kind, fuse, monkeypatch):
    # the step a GPU captures as a CUDA graph, run here without one: the cache and position
    # as device tensors, the attention over the cache's whole room with its unwritten
    # positions blocked
    monkeypatch.setattr(decode_module, "FUSE_MAX_BYTES", 2**40 if fuse else 0)
    use_columns(monkeypatch, False)
    model = build(kind)
    lean = lean_against_forward(model, steps=7, static=True)
    assert lean.static and not lean.graphed
    ids, _ = left_padded()
    assert lean.slot.tolist() == [ids.shape[1] + 7]  # it advanced once per token
    # the cache holds what the model's own cache holds, and zeros after it
    kv = lean.cache_layers[0]
    assert kv.key_buf.shape[2] == ids.shape[1] + 7
    assert kv.key_buf[:, :, -1].abs().sum() > 0  # the last token's key, written in place


def test_static_step_only_where_positions_come_from_a_table(monkeypatch):
    # rotary scaling that depends on the length (dynamic) and column layout: the usual step
    use_columns(monkeypatch, False)
    assert not lean_against_forward(build("llama-dynamic"), static=True).static
    use_columns(monkeypatch, True)
    assert not lean_against_forward(build("llama"), static=True).static


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_sampling_with_the_static_step_equals_the_plain_forward_loop(kind, monkeypatch):
    use_columns(monkeypatch, False)
    model = build(kind)
    ids, mask = left_padded()
    kw = dict(temperature=1.0, top_k=0, top_p=0.9, seeds=[11, 12, 13, 14, 15], min_new_tokens=2)
    steps = []
    real = LeanDecoder._step

    def counted(self, tokens, positions):
        if self.static:
            steps.append(self.slot.item())
        return real(self, tokens, positions)

    monkeypatch.setattr(LeanDecoder, "_step", counted)
    monkeypatch.setattr(decode_module, "STATIC_DEVICES", {"cpu"})
    monkeypatch.setattr(decode_module, "STATIC_MIN_TOKENS", 12)
    fast = sample(model, ids, mask, 12, eos_id=2, pad_id=0, **kw)
    assert steps == list(range(ids.shape[1], ids.shape[1] + len(steps)))
    assert len(steps) == fast[0].shape[1] - 1  # every token fed back, through the static step
    steps.clear()
    sample(model, ids, mask, 11, eos_id=2, pad_id=0, **kw)  # below STATIC_MIN_TOKENS
    assert steps == []
    monkeypatch.setattr(sampling_module, "preallocated_cache", lambda model, room: {})
    plain = sample(model, ids, mask, 12, eos_id=2, pad_id=0, **kw)
    assert torch.equal(fast[0], plain[0])
    torch.testing.assert_close(fast[1], plain[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("columns", [True, False])
def test_lean_step_runs_other_modules_through_their_forward(columns, monkeypatch):
    # an adapter on a projection and another norm: the step calls them on rows
    use_columns(monkeypatch, columns)
    model = build("llama")
    torch.manual_seed(3)
    layer = model.model.layers[0]
    layer.self_attn.q_proj = LowRank(layer.self_attn.q_proj)
    layer.mlp.down_proj = LowRank(layer.mlp.down_proj)
    layer.input_layernorm = OtherNorm(SHAPE["hidden_size"])
    torch.nn.init.normal_(layer.input_layernorm.norm.weight)
    for m in (layer.self_attn.q_proj, layer.mlp.down_proj):
        torch.nn.init.normal_(m.up.weight, std=0.5)  # a delta that changes the logits
    lean = lean_against_forward(model.eval())
    assert lean.fused[0][0] is None and lean.fused[1][0] is not None  # q/k/v stack: not layer 0


@pytest.mark.parametrize("columns", [True, False])
def test_lean_step_in_bfloat16(columns, monkeypatch):
    # columns sum in another order: bf16 logits agree to bf16 rounding
    use_columns(monkeypatch, columns)
    model = build("qwen2").to(torch.bfloat16)
    lean_against_forward(model, atol=3e-2)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral-sliding", "gpt2"])
@pytest.mark.parametrize("columns", [True, False])
def test_sampling_equals_the_plain_forward_loop(kind, columns, monkeypatch):
    """Tokens and log-probs of `sample` (fast paths where the model allows) against the same
    loop through the model's own forward and default cache."""
    use_columns(monkeypatch, columns)
    model = build(kind)
    ids, mask = left_padded()
    kw = dict(temperature=1.0, top_k=0, top_p=0.9, seeds=[11, 12, 13, 14, 15], min_new_tokens=2)
    fast = sample(model, ids, mask, 12, eos_id=2, pad_id=0, **kw)
    monkeypatch.setattr(sampling_module, "preallocated_cache", lambda model, room: {})
    plain = sample(model, ids, mask, 12, eos_id=2, pad_id=0, **kw)
    assert torch.equal(fast[0], plain[0])
    torch.testing.assert_close(fast[1], plain[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_repeated_prompts_prefilled_once(kind, monkeypatch):
    """A group's rows share their prompt: the prefill runs once per distinct prompt, and the
    samples are those of the plain loop over every row."""
    model = build(kind)
    ids, mask = left_padded()
    rows = [0, 1, 0, 3, 1, 0]  # prompts 0 and 1 repeated, different padding
    ids, mask = ids[rows], mask[rows]
    first, inverse = distinct_rows(ids, mask)
    assert len(first) == 3 and torch.equal(ids[first][inverse], ids)
    prefill_rows = []
    model.register_forward_pre_hook(
        lambda m, a, kw: prefill_rows.append(kw["input_ids"].shape), with_kwargs=True
    )
    kw = dict(temperature=1.0, top_k=0, top_p=0.9, seeds=[1, 2, 3, 4, 5, 6], min_new_tokens=2)
    fast = sample(model, ids, mask, 10, eos_id=2, pad_id=0, **kw)
    assert prefill_rows[0] == (3, ids.shape[1])  # the prefill: 3 distinct prompts
    monkeypatch.setattr(sampling_module, "preallocated_cache", lambda model, room: {})
    prefill_rows.clear()
    plain = sample(model, ids, mask, 10, eos_id=2, pad_id=0, **kw)
    assert prefill_rows[0] == (6, ids.shape[1])  # transformers' own cache: every row
    assert torch.equal(fast[0], plain[0])
    torch.testing.assert_close(fast[1], plain[1], rtol=0, atol=1e-5)
    # rows with the same prompt and different seeds still differ
    assert not torch.equal(fast[0][0], fast[0][2]) or not torch.equal(fast[0][2], fast[0][5])


def test_fast_paths_apply_only_where_they_fit():
    ids, mask = left_padded()
    used = {}
    for kind in ("llama", "qwen2", "mistral", "mistral-sliding", "gpt2"):
        model = build(kind)
        cache = preallocated_cache(model, 20)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True, **cache)
        used[kind] = (bool(cache), LeanDecoder.build(model, cache_of(out), mask) is not None)
    assert used == {
        "llama": (True, True),
        "qwen2": (True, True),
        "mistral": (True, True),
        "mistral-sliding": (False, False),  # a window: transformers' own cache and forward
        "gpt2": (True, False),  # full attention, so our cache; another layer: its forward
    }
    # weights managed by ZeRO-3 (DeepSpeed marks them with a ds_id and a status): the lean step
    # only where it calls no module (ZeRO-3's hooks at each module call talk to the other
    # ranks) and every weight is gathered whole; else the model's forward.
    # test_distributed's two-rank ZeRO-3 runs cover the real thing (gathered: lean; sharded: not)
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    model = build("llama")
    cache = preallocated_cache(model, 20)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **cache)
    assert LeanDecoder.build(model, cache_of(out), mask) is not None
    for i, p in enumerate(model.parameters()):
        p.ds_id, p.ds_status = i, ZeroParamStatus.AVAILABLE
    assert LeanDecoder.build(model, cache_of(out), mask) is not None  # gathered, no hooks
    model.model.norm.weight.ds_status = ZeroParamStatus.NOT_AVAILABLE
    assert LeanDecoder.build(model, cache_of(out), mask) is None  # a sharded weight
    model.model.norm.weight.ds_status = ZeroParamStatus.AVAILABLE
    attn = model.model.layers[1].self_attn
    attn.v_proj = LowRank(attn.v_proj)  # its forward calls modules: hooks would run
    assert LeanDecoder.build(model, cache_of(out), mask) is None


def test_greedy_sampling_equals_generate_for_every_architecture():
    for kind in ("llama", "qwen2", "mistral", "mistral-sliding", "gpt2"):
        model = build(kind)
        ids, mask = left_padded()
        ours, _ = sample(model, ids, mask, 8, eos_id=2, pad_id=0, temperature=0.0)
        ref = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=8,
            pad_token_id=0,
            eos_token_id=2,
        )[:, ids.shape[1] :]
        assert torch.equal(ours, ref[:, : ours.shape[1]]), kind


def test_where_the_lean_step_stacks_its_projections():
    mb, gb = 2**20, 2**30
    # a CPU: models up to 256 MB (the copy costs memory; measured there)
    assert decode_module.fuse_pays(256 * mb, "cpu") and not decode_module.fuse_pays(257 * mb, "cpu")
    # a GPU: models up to a tenth of its memory (0.63B in fp32, 2.5 GB, on 141 GB: stacked)
    assert decode_module.fuse_pays(2.5 * gb, "cuda", 141 * gb)
    assert decode_module.fuse_pays(8 * gb, "cuda", 80 * gb)
    assert not decode_module.fuse_pays(14 * gb, "cuda", 80 * gb)  # 7B in bf16 on an 80 GB GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
def test_sampling_through_a_cuda_graph_equals_the_lean_step_on_a_gpu(monkeypatch):
    # on a GPU the static step is captured once per `sample` and replayed for the tokens after
    # the first (graphs.GraphedCall); fp32: the same tokens as the usual lean step
    model = build("llama").cuda()
    ids, mask = (t.cuda() for t in left_padded())
    kw = dict(temperature=1.0, top_k=0, top_p=0.9, seeds=[11, 12, 13, 14, 15], min_new_tokens=2)
    built = []
    real = LeanDecoder.build.__func__

    def keep(cls, *a, **k):
        built.append(real(cls, *a, **k))
        return built[-1]

    monkeypatch.setattr(LeanDecoder, "build", classmethod(keep))
    monkeypatch.setattr(decode_module, "STATIC_MIN_TOKENS", 0)
    monkeypatch.setattr(decode_module, "STATIC_DEVICES", {"cuda"})
    graphed = sample(model, ids, mask, 12, eos_id=2, pad_id=0, **kw)
    lean = built[-1]
    assert lean.static and lean.graphed.graph is not None and not lean.graphed.failed
    monkeypatch.setattr(decode_module, "STATIC_DEVICES", set())
    usual = sample(model, ids, mask, 12, eos_id=2, pad_id=0, **kw)
    assert not built[-1].static
    assert torch.equal(graphed[0], usual[0])
    torch.testing.assert_close(graphed[1], usual[1], rtol=0, atol=1e-5)


def _peft_lora(kind: str, targets: list[str]):
    """A tiny model with PEFT's LoRA layers inside it (what the trainer trains), the adapters'
    B matrices made nonzero so that they change the logits."""
    peft = pytest.importorskip("peft")
    model = build(kind)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM")
    inner = peft.get_peft_model(model, config).get_base_model()
    torch.manual_seed(4)
    with torch.no_grad():
        for name, p in inner.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)
    return inner.eval()


@pytest.mark.parametrize("columns", [True, False])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_lean_step_with_peft_adapters_equals_the_peft_models_forward(kind, columns, monkeypatch):
    """The lean step over a model with LoRA adapters (each adapted projection through its own
    forward, the others stacked) equals the PEFT model's forward, with the adapters on and
    with them off (a peer sampling the policy's base)."""
    from grpo_ensemble.models.adapters import adapters_off

    monkeypatch.setattr(decode_module, "FUSE_MAX_BYTES", 2**40)
    use_columns(monkeypatch, columns)
    model = _peft_lora(kind, ["q_proj", "v_proj", "down_proj"])
    lean = lean_against_forward(model)
    assert all(qkv is None and gate_up is not None for qkv, gate_up in lean.fused)
    with adapters_off(model):
        lean_against_forward(model)
    plain = build(kind).eval()  # the same base weights, no adapters
    ids, mask = left_padded()
    with torch.no_grad(), adapters_off(model):
        off = model(input_ids=ids, attention_mask=mask).logits
    on = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(
        off, plain(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0
    )
    assert (on - off).abs().max() > 0.1  # the adapters matter


def test_sampling_with_peft_adapters_equals_the_plain_forward_loop(monkeypatch):
    model = _peft_lora("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"])
    ids, mask = left_padded()
    kw = dict(temperature=1.0, top_k=0, top_p=1.0, seeds=[11, 12, 13, 14, 15])
    fast = sample(model, ids, mask, 10, eos_id=2, pad_id=0, **kw)
    monkeypatch.setattr(sampling_module, "preallocated_cache", lambda model, room: {})
    plain = sample(model, ids, mask, 10, eos_id=2, pad_id=0, **kw)
    assert torch.equal(fast[0], plain[0])
    torch.testing.assert_close(fast[1], plain[1], rtol=0, atol=1e-5)
