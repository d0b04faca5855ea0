"""The update's first forward replayed from sampling's recorded products (replay.py) against
the plain forward and backward: the same log-probs and gradients, for every layout the decode
step records in, shared prompts or not, rows in any order, from one recording or several; and
no replay where it would not be the same computation."""

import pytest
import torch
from tiny_llms import LowRank, build, left_padded, use_columns

import grpo_ensemble.engine.decode as decode_module
import grpo_ensemble.engine.recording as recording_module
import grpo_ensemble.models.logprobs as logprobs_module
from grpo_ensemble.engine.recording import BufferPool, Recording, count_update
from grpo_ensemble.engine.replay import Trace, replay_logprobs, replayable
from grpo_ensemble.engine.sampling import sample
from grpo_ensemble.models.logprobs import TokenBatch, completion_logprobs

NEW = 12


@pytest.fixture(autouse=True)
def replay_any_size(monkeypatch):
    """Record and replay whatever the size (the tests' models are below the size where the
    replay pays, `recording.REPLAY_MIN`)."""
    monkeypatch.setattr(recording_module, "REPLAY_MIN", 0)


def sampled(model, copies: int = 1, seed: int = 0, temperature: float = 1.0):
    """Prompts (each `copies` times, as a group), completions cut after EOS, and the
    recording of the sampling that made them."""
    ids, mask = left_padded()
    ids, mask = ids.repeat_interleave(copies, 0), mask.repeat_interleave(copies, 0)
    rec = Recording(NEW - 1)
    seeds = [seed * 100 + i for i in range(ids.shape[0])]
    with torch.no_grad():
        seq, _ = sample(
            model, ids, mask, NEW, 2, 0, temperature=temperature, seeds=seeds, recording=rec
        )
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
    completions = [r[: r.index(2) + 1] if 2 in r else r for r in seq.tolist()]
    return prompts, completions, rec


def logprobs_and_grads(model, fn, batch: TokenBatch):
    """The log-probs of `fn()` and the gradient of a loss over them, per parameter."""
    model.zero_grad(set_to_none=True)
    logp = fn()
    weights = torch.linspace(-1.0, 1.0, logp.shape[0])[:, None] * batch.completion_mask
    (logp * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return logp.detach(), grads


def assert_same(model, batch, traces, temperature: float = 1.0):
    model.train()
    assert replayable(model, batch, traces)
    want, want_g = logprobs_and_grads(
        model, lambda: completion_logprobs(model, batch, temperature), batch
    )
    got, got_g = logprobs_and_grads(
        model, lambda: replay_logprobs(model, batch, traces, temperature), batch
    )
    real = batch.completion_mask.bool()
    assert real.sum() > 2 * batch.input_ids.shape[0]  # completions longer than a token
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=2e-6)
    for name, g in want_g.items():
        scale = g.abs().max()
        assert scale > 0, name  # every weight takes part in the loss
        torch.testing.assert_close(got_g[name] / scale, g / scale, rtol=0, atol=3e-6)


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("columns", [True, False])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_replay_equals_the_plain_forward_and_gradient(kind, columns, fuse, share, monkeypatch):
    # columns: the recording is (out, tokens, B), else (tokens, B, out); fused: one product
    # for q/k/v and one for gate/up, else each projection's own; share: each distinct prompt
    # runs once in both computations (forced on: the model is below the size where it pays)
    use_columns(monkeypatch, columns)
    monkeypatch.setattr(decode_module, "FUSE_MAX_BYTES", 2**40 if fuse else 0)
    threshold = 0 if share else float("inf")
    monkeypatch.setattr(logprobs_module, "SHARE_MIN", {"cpu": threshold, "cuda": threshold})
    model = build(kind)
    prompts, completions, rec = sampled(model, copies=2)
    assert rec.filled and rec.columns == columns
    assert set(rec.layers[0]) == (
        {"qkv", "o", "gate_up", "down"} if fuse else {"q", "k", "v", "o", "gate", "up", "down"}
    )
    lengths = {len(c) for c in completions}
    assert max(lengths) == NEW and min(lengths) < NEW  # rows that stopped early, padded after
    assert rec.steps == NEW - 1  # every token fed to the step but the last
    batch = TokenBatch.build(prompts, completions, 0)
    assert_same(model, batch, [Trace(rec, i) for i in range(len(prompts))])


@pytest.mark.parametrize("fuse", [True, False])
def test_replay_of_a_recording_by_the_static_step(fuse, monkeypatch):
    # the static step (a GPU's CUDA graph) copies each product into the recording at a token
    # index held on the device: the same recording, and the same replay
    use_columns(monkeypatch, False)
    monkeypatch.setattr(decode_module, "FUSE_MAX_BYTES", 2**40 if fuse else 0)
    model = build("llama")
    prompts, completions, usual = sampled(model)
    monkeypatch.setattr(decode_module, "STATIC_DEVICES", {"cpu"})
    monkeypatch.setattr(decode_module, "STATIC_MIN_TOKENS", 0)
    again, completions_again, rec = sampled(model)
    assert (again, completions_again) == (prompts, completions)
    assert rec.steps == usual.steps == NEW - 1
    for mine, theirs in zip(rec.layers, usual.layers, strict=True):
        assert mine.keys() == theirs.keys()
        for name, buf in mine.items():
            torch.testing.assert_close(buf, theirs[name], rtol=0, atol=1e-6)
    batch = TokenBatch.build(prompts, completions, 0)
    assert_same(model, batch, [Trace(rec, i) for i in range(len(prompts))])


@pytest.mark.parametrize("columns", [True, False])
def test_replay_of_rows_in_another_order_from_two_recordings(columns, monkeypatch):
    # a micro-batch sorted by length, some candidates dropped, from two sampling calls (two
    # generator batches): the rows are gathered from both recordings
    use_columns(monkeypatch, columns)
    model = build("llama")
    p1, c1, r1 = sampled(model, seed=0)
    p2, c2, r2 = sampled(model, seed=1)
    rows = [(p1, c1, r1, i) for i in range(len(p1))] + [(p2, c2, r2, i) for i in range(len(p2))]
    rows = [rows[i] for i in (7, 0, 3, 9, 5, 1, 8)]  # 2, 4 and 6 dropped
    rows.sort(key=lambda x: -len(x[1][x[3]]))
    batch = TokenBatch.build([p[i] for p, _, _, i in rows], [c[i] for _, c, _, i in rows], 0)
    assert_same(model, batch, [Trace(r, i) for _, _, r, i in rows])


def test_replay_at_a_sampling_temperature_and_in_a_shorter_batch(monkeypatch):
    # log-probs at temperature 0.7, as the loss takes them; a micro-batch whose longest
    # completion is shorter than the recording (its rows stopped early)
    use_columns(monkeypatch, True)
    model = build("qwen2")
    prompts, completions, rec = sampled(model, copies=2, temperature=0.7)
    keep = [i for i, c in enumerate(completions) if len(c) < NEW]
    assert len(keep) >= 2
    batch = TokenBatch.build([prompts[i] for i in keep], [completions[i] for i in keep], 0)
    assert batch.completion_ids.shape[1] < NEW
    assert_same(model, batch, [Trace(rec, i) for i in keep], temperature=0.7)


def test_no_replay_once_a_weight_moved_or_without_every_rows_trace():
    model = build("llama")
    prompts, completions, rec = sampled(model)
    batch = TokenBatch.build(prompts, completions, 0)
    traces = [Trace(rec, i) for i in range(len(prompts))]
    assert replayable(model, batch, traces)
    assert not replayable(model, batch, traces[:-1] + [None])  # a peer's candidate
    assert not replayable(model, batch, None)
    other = build("llama")  # the same weights, another module
    assert not replayable(other, batch, traces)
    longer = TokenBatch.build(prompts, [c + [5, 6] for c in completions], 0)
    assert not replayable(model, longer, traces)  # more tokens than were decoded
    count_update(model)  # as the training loop does at an optimizer step
    assert not replayable(model, batch, traces)


@pytest.mark.parametrize("kind", ["llama-dynamic", "mistral-sliding", "gpt2", "adapter"])
def test_nothing_recorded_where_replay_would_differ(kind):
    # a rotary embedding that depends on the length so far, a model the lean step does not
    # decode, a projection that is not a plain Linear (an adapter)
    model = build("llama" if kind == "adapter" else kind)
    if kind == "adapter":
        layer = model.model.layers[1]
        layer.mlp.up_proj = LowRank(layer.mlp.up_proj)
    _, _, rec = sampled(model)
    assert not rec.filled and rec.layers == []


@pytest.mark.parametrize("bound, records", [(1_020_800, True), (1_020_801, False)])
def test_recorded_only_where_the_saved_products_reach_the_bound(bound, records, monkeypatch):
    # 5 rows × 11 replayed tokens × 2 layers of 2·32·32 (q, o) + 2·32·16 (k, v: 2 key/value
    # heads of 8) + 3·32·64 (MLP) + 2·32 (norms) = 9280 parameters: 1 020 800 multiply-adds
    monkeypatch.setattr(recording_module, "REPLAY_MIN", bound)
    model = build("llama")
    prompts, completions, rec = sampled(model)
    assert rec.filled is records
    if records:  # and replayed only from that bound, counting the micro-batch's own rows
        batch = TokenBatch.build(prompts, completions, 0)
        traces = [Trace(rec, i) for i in range(5)]
        assert batch.completion_ids.shape[1] == NEW and replayable(model, batch, traces)
        assert not replayable(model, TokenBatch.build(prompts[1:], completions[1:], 0), traces[1:])


@pytest.mark.parametrize("columns", [True, False])
def test_replay_in_bfloat16(columns, monkeypatch):
    # a bf16 policy (train.precision: bf16) records in bf16; the replayed log-probs agree with
    # the plain forward's to bf16 rounding, the gradients closely
    use_columns(monkeypatch, columns)
    model = build("llama").to(torch.bfloat16)
    prompts, completions, rec = sampled(model, copies=2)
    assert rec.filled and rec.layers[0]["o"].dtype == torch.bfloat16
    batch = TokenBatch.build(prompts, completions, 0)
    traces = [Trace(rec, i) for i in range(len(prompts))]
    model.train()
    assert replayable(model, batch, traces)
    want, want_g = logprobs_and_grads(model, lambda: completion_logprobs(model, batch), batch)
    got, got_g = logprobs_and_grads(model, lambda: replay_logprobs(model, batch, traces), batch)
    real = batch.completion_mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=0.05)
    for name, g in want_g.items():
        cos = torch.nn.functional.cosine_similarity(
            got_g[name].flatten().float(), g.flatten().float(), dim=0
        )
        assert cos > 0.99, name


@pytest.mark.parametrize("fuse", [True, False])
def test_a_recordings_mlp_buffers_serve_the_next_one_once_it_ends(fuse, monkeypatch):
    # the pool gives an ended recording's gate and up buffers (the products the update's
    # backward holds anyway) to the next of the same shapes (no fresh pages to map); a live
    # recording's stay its own; the other products' buffers are not kept
    monkeypatch.setattr(decode_module, "FUSE_MAX_BYTES", 2**40 if fuse else 0)
    model = build("llama")
    ids, mask = left_padded()
    pool = BufferPool()
    kept = ["gate_up"] if fuse else ["gate", "up"]

    def record(seed: int) -> Recording:
        rec = Recording(NEW - 1, pool)
        with torch.no_grad():
            sample(model, ids, mask, NEW, 2, 0, seeds=[seed] * 5, recording=rec)
        return rec

    def pooled() -> int:
        return sum(len(v) for v in pool.free.values())

    first = record(0)
    ptrs = {b.data_ptr() for b in first.buffers}
    mlp = {first.layers[i][name].data_ptr() for i in (0, 1) for name in kept}
    assert ptrs == mlp and len(ptrs) == 2 * len(kept) and pooled() == 0
    second = record(1)  # the first is alive: new buffers
    assert not ptrs & {b.data_ptr() for b in second.buffers}
    del first
    assert pooled() == 2 * len(kept)
    third = record(2)
    assert {b.data_ptr() for b in third.buffers} == ptrs and pooled() == 0
    del second, third
    assert pooled() == 4 * len(kept)
