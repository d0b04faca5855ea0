"""The `hf` generator: batched sampling from a transformers causal LM with the lean decoder.

It is the generation engine's face to the trainer: a `Generator` plus the optional
capabilities the trainer can use (weight sync, behaviour log-probs, forward replay).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence

import torch

from .. import dist
from ..errors import UserError
from ..models.adapters import adapters_off
from ..models.chat import render_prompt
from ..models.loading import load_model
from ..models.zero import gathered_params, zero3_managed
from ..plugins.interfaces import Generator, SamplingParams, candidate_seed
from ..types import Candidate, Prompt
from .decode import lean_hook_free
from .recording import BufferPool, Recording, count_update
from .replay import Trace, replay_logprobs, replayable
from .sampling import sample


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Switch off dropout while sampling, then restore the model's mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _adds(special: set[bool]) -> dict:
    """The tokenizer's add_special_tokens keyword where it is off (its default is on)."""
    return {} if True in special else {"add_special_tokens": False}


class HFGenerator(Generator):
    """Batched sampling over the KV cache of a transformers causal LM (see `sampling.py`).

    `model` is a loadable path (or hub id) or an `nn.Module` (the policy shares the module being
    trained, so it always samples with the current weights). Returns each completion's token ids
    (cut after the first EOS, EOS kept) and the per-token log-probs of the distribution actually
    sampled from (after temperature, top-k and top-p).

    Under ZeRO-3 the module's parameters are sharded across ranks. With `gather` (the default)
    they are gathered whole for the duration of a `generate` call: fast, but the whole model is
    in memory for that time. Without it every forward gathers one layer at a time, which keeps
    memory low but makes each token a round of collectives; ranks then step in lockstep.

    `adapters` False: a model with LoRA adapters (PEFT's layers inside it) samples as its base
    model, the adapters switched off while it samples: a peer that is the policy's base shares
    the policy's module instead of holding a copy of the weights.
    """

    name = "hf"

    def __init__(
        self,
        model,
        tokenizer=None,
        batch_size: int = 256,
        trust_remote_code: bool = False,
        gather: bool = True,
        adapters: bool = True,
    ):
        if isinstance(model, str):
            try:
                model, tokenizer = load_model(model, "model", trust_remote_code=trust_remote_code)
            except UserError as exc:
                raise UserError(str(exc).removeprefix("model: ")) from None
            model.requires_grad_(False)
        if tokenizer is None:
            raise UserError("the hf generator needs a tokenizer with a model object")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.gather = bool(gather)
        self.adapters = bool(adapters)
        # inside `recording()`: keep the decode step's products for the update, in buffers used
        # again from one step to the next, and where each candidate's are (`take_traces`)
        self.record = False
        self.buffers = BufferPool()
        self._traces: dict[int, tuple[weakref.ref, Trace]] = {}

    @property
    def collective(self) -> bool:
        """True when generating takes part in collectives (ZeRO-3 sharded weights, >1 rank):
        then every rank must call `generate` at the same points, even with no prompts."""
        return dist.world_size() > 1 and zero3_managed(self.model)

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Sample with `model` from now on. The policy's generator shares the module being
        trained, so nothing is copied; recordings of the weights before are stale."""
        self.model = model
        count_update(model)

    def place_model(self, place) -> None:
        """Put the (frozen) model where the run keeps its models: `place(model)` returns it on
        the run's device and in its precision, or as ZeRO-3 shards."""
        self.model = place(self.model)

    # -- forward replay: the capability the trainer uses through `ReplaysForward` --

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Keep the decode step's products of the samples drawn inside the block."""
        self.record, self._traces = True, {}
        try:
            yield
        finally:
            self.record = False

    def take_traces(self, candidates: Sequence[Candidate]) -> list[Trace | None]:
        """Where each candidate's recorded products are (None for one not recorded). Hands
        them over: the generator forgets every trace, so a recording lives only as long as
        the caller keeps its traces."""
        held, self._traces = self._traces, {}
        out: list[Trace | None] = []
        for c in candidates:
            kept = held.get(id(c))
            out.append(kept[1] if kept is not None and kept[0]() is c else None)
        return out

    def replays_for(self, model: torch.nn.Module) -> bool:
        """True when this generator samples with `model` itself, so its recordings are of it."""
        return self.model is model and self.adapters

    def replay_logprobs(self, model, batch, traces, temperature: float, entropy=None):
        """(B, C) log-probs of `batch` under `model`, with the graph for the backward, from the
        recorded products (see replay.py); None where the recording cannot serve this batch.
        `entropy` "value" or "grad": a pair (log-probs, (B, C) entropy per position)."""
        if not replayable(model, batch, traces):
            return None
        return replay_logprobs(model, batch, traces, temperature, entropy)

    def release_buffers(self) -> None:
        """Free the buffers kept for the next recordings (beside a forward of its own they
        would add to the peak memory)."""
        self.buffers.free.clear()

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[Prompt], n: int, sampling: SamplingParams
    ) -> list[list[Candidate]]:
        rendered = [(render_prompt(p, self.tokenizer), p.messages is None) for p in prompts]
        texts = [r for r in rendered for _ in range(n)]  # each prompt n times, in order
        seeds = None
        if sampling.seeds is not None:
            seeds = [candidate_seed(s, j) for s in sampling.seeds for j in range(n)]
        starts = list(range(0, len(texts), self.batch_size))
        flat: list[Candidate] = []
        context = gathered_params(self.model) if self.gather else contextlib.nullcontext()
        base = contextlib.nullcontext() if self.adapters else adapters_off(self.model)
        with eval_mode(self.model), context, base:
            # ZeRO-3's module hooks take part in collectives at every module call, so ranks
            # step in lockstep unless the weights are gathered and the decode step calls no
            # module (adapters, for one, are called)
            lockstep = self.collective and not (self.gather and lean_hook_free(self.model))
            if lockstep:  # every rank runs as many batches as the rank with the most
                extra = int(dist.all_max([len(starts)])[0]) - len(starts)
                starts += [-1] * extra
            for start in starts:
                if start < 0:  # a batch only to keep this rank in step with the others
                    dummy = (self.tokenizer.eos_token or "0", True)
                    self._batch([dummy], sampling, None, lockstep)
                    continue
                end = start + self.batch_size
                flat.extend(
                    self._batch(texts[start:end], sampling, seeds and seeds[start:end], lockstep)
                )
        return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _encode(self, texts: list[tuple[str, bool]]):
        """Left-padded ids of (text, add special tokens?) pairs: a rendered conversation
        holds its template's special tokens already."""
        tok, special = self.tokenizer, {s for _, s in texts}
        if len(special) == 1:
            return tok([t for t, _ in texts], return_tensors="pt", padding=True, **_adds(special))
        ids = [tok(t, add_special_tokens=s)["input_ids"] for t, s in texts]
        return tok.pad({"input_ids": ids}, return_tensors="pt", padding=True)

    def _batch(self, texts, sampling: SamplingParams, seeds, lockstep: bool) -> list[Candidate]:
        tok = self.tokenizer
        enc = self._encode(texts).to(self.model.device)
        recording = None
        if self.record:
            recording = Recording(max(sampling.max_new_tokens - 1, 0), self.buffers)
        seqs, logps = sample(
            self.model,
            enc["input_ids"],
            enc["attention_mask"],
            sampling.max_new_tokens,
            eos_id=tok.eos_token_id,
            pad_id=tok.pad_token_id,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            seeds=seeds,
            synced=lockstep,
            min_new_tokens=sampling.min_new_tokens,
            recording=recording,
        )
        seqs = seqs.cpu()
        logps = None if logps is None else logps.cpu()
        filled = recording is not None and recording.filled
        out = [
            self._candidate(seqs[i], None if logps is None else logps[i]) for i in range(len(texts))
        ]
        for cand, (text, _) in zip(out, texts, strict=True):
            cand.prompt_text = text
        if filled:
            for i, cand in enumerate(out):
                self._traces[id(cand)] = (weakref.ref(cand), Trace(recording, i))
        return out

    def _candidate(self, ids: torch.Tensor, logp: torch.Tensor | None) -> Candidate:
        eos = self.tokenizer.eos_token_id
        hits = (ids == eos).nonzero()
        finished = len(hits) > 0
        length = int(hits[0]) + 1 if finished else len(ids)
        token_ids = ids[:length].tolist()
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return Candidate(
            text=text,
            token_ids=token_ids,
            source="",
            behaviour_logprobs=None if logp is None else logp[:length].tolist(),
            finished=finished,
        )
