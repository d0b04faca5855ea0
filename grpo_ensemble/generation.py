"""Sampling: the `hf` generator over a transformers causal LM, and the ensemble that pools groups.

The ensemble asks each member for `n_k` candidates per prompt and pools them into one group per
prompt, policy first, each candidate tagged with the member that produced it. A member whose
tokenizer differs from the policy's contributes text, re-tokenized with the policy's tokenizer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from . import dist
from .components import Generator, SamplingParams, candidate_seed, mix64
from .decode import zero3_managed
from .engine import gathered_params
from .errors import PluginError, UserError
from .models import load_model, same_tokenizer
from .recording import BufferPool, Recording
from .replay import Trace
from .sampling import sample
from .types import POLICY, Candidate, Group, Prompt


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Switch off dropout while sampling, then restore the model's mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def recording(generator, on: bool):
    """`generator` (an `HFGenerator`) keeps its decode products for the update while inside
    (replay.py): set by the training step around its own sampling, so that no other sampling
    (evaluation) keeps any."""
    if not on or not isinstance(generator, HFGenerator):
        yield
        return
    generator.record = True
    try:
        yield
    finally:
        generator.record = False


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
    """

    name = "hf"

    def __init__(
        self,
        model,
        tokenizer=None,
        batch_size: int = 256,
        trust_remote_code: bool = False,
        gather: bool = True,
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
        # keep the decode step's products for the update (set by the training step for the
        # policy: `recording`), in buffers used again from one step to the next
        self.record = False
        self.buffers = BufferPool()

    @property
    def collective(self) -> bool:
        """True when generating takes part in collectives (ZeRO-3 sharded weights, >1 rank):
        then every rank must call `generate` at the same points, even with no prompts."""
        return dist.world_size() > 1 and zero3_managed(self.model)

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.model = model  # same module object: nothing to copy

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[Prompt], n: int, sampling: SamplingParams
    ) -> list[list[Candidate]]:
        texts = [p.text for p in prompts for _ in range(n)]  # each prompt n times, in order
        seeds = None
        if sampling.seeds is not None:
            seeds = [candidate_seed(s, j) for s in sampling.seeds for j in range(n)]
        starts = list(range(0, len(texts), self.batch_size))
        lockstep = self.collective and not self.gather
        if lockstep:  # every rank runs as many batches as the rank with the most
            extra = int(dist.all_max([len(starts)])[0]) - len(starts)
            starts += [-1] * extra
        flat: list[Candidate] = []
        context = gathered_params(self.model) if self.gather else contextlib.nullcontext()
        with eval_mode(self.model), context:
            for start in starts:
                if start < 0:  # a batch only to keep this rank in step with the others
                    self._batch([self.tokenizer.eos_token or "0"], sampling, None, lockstep)
                    continue
                end = start + self.batch_size
                flat.extend(
                    self._batch(texts[start:end], sampling, seeds and seeds[start:end], lockstep)
                )
        return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _batch(self, texts, sampling: SamplingParams, seeds, lockstep: bool) -> list[Candidate]:
        tok = self.tokenizer
        enc = tok(texts, return_tensors="pt", padding=True).to(self.model.device)
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
        return [
            self._candidate(
                seqs[i],
                None if logps is None else logps[i],
                Trace(recording, i) if filled else None,
            )
            for i in range(len(texts))
        ]

    def _candidate(self, ids: torch.Tensor, logp: torch.Tensor | None, trace=None) -> Candidate:
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
            trace=trace,
        )


@dataclass
class Member:
    """One ensemble member: who samples, how many candidates, and how they enter the loss."""

    name: str
    generator: Generator
    n: int
    sampling: SamplingParams
    mode: str = "on_policy"
    on_error: str = "fail"  # fail | skip: go on without this member's candidates for the step


class EnsembleGenerator:
    """Pools each prompt's group from all members; the first member is the policy."""

    def __init__(self, members: list[Member], policy_tokenizer):
        if not members or members[0].name != POLICY:
            raise ValueError("the first ensemble member must be the policy")
        self.members = members
        self.tokenizer = policy_tokenizer
        self.shares_tokens = {
            m.name: m.generator.tokenizer is not None
            and same_tokenizer(m.generator.tokenizer, policy_tokenizer)
            for m in members
        }
        self.seconds: dict[str, float] = {}  # generation time per member, last call
        self.faults: dict[str, int] = {}  # calls that failed and were skipped, last call

    def generate(
        self,
        prompts: Sequence[Prompt],
        needs_peers: Callable[[list[Group]], list[bool]] | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[Group]:
        """Pool each prompt's group. With `needs_peers`, the policy samples first and peers
        sample only for the prompts it marks (on-failure injection): groups become ragged.
        `seeds` (one per prompt) make each member's candidates of a prompt reproducible."""
        self.seconds, self.faults = {}, {}
        groups = [Group(prompt=p, candidates=[]) for p in prompts]
        wanted = list(range(len(prompts)))
        decided = needs_peers is None
        for k, m in enumerate(self.members):
            if m.name != POLICY and not decided:  # once, on the policy's candidates alone
                flags = needs_peers(groups)
                wanted = [i for i, f in enumerate(flags) if f]
                decided = True
            targets = wanted if m.name != POLICY else list(range(len(prompts)))
            # a generator with sharded weights must be called on every rank, even with nothing
            if m.n == 0 or (not targets and not getattr(m.generator, "collective", False)):
                continue
            sampling = m.sampling
            if seeds is not None:
                member_seeds = tuple(mix64(seeds[i] * 31 + k) for i in targets)
                sampling = replace(m.sampling, seeds=member_seeds)
            per_prompt = self._sample(m, [prompts[i] for i in targets], sampling)
            for i, cands in zip(targets, per_prompt, strict=True):
                limit = m.sampling.max_new_tokens
                groups[i].candidates.extend(self._adopt(c, m.name, limit) for c in cands)
        return groups

    def _sample(
        self, m: Member, prompts: list[Prompt], sampling: SamplingParams
    ) -> list[list[Candidate]]:
        start = dist.now()
        try:
            per_prompt = m.generator.generate(prompts, m.n, sampling)
            if len(per_prompt) != len(prompts) or any(len(c) != m.n for c in per_prompt):
                raise PluginError(
                    m.generator.name, f"{m.name!r} did not return {m.n} candidates per prompt"
                )
        except UserError:
            raise
        except Exception as exc:
            if m.on_error == "skip" and m.name != POLICY:  # the step goes on without it
                self.faults[m.name] = self.faults.get(m.name, 0) + 1
                return [[] for _ in prompts]
            if isinstance(exc, PluginError):
                raise
            raise PluginError(m.generator.name, f"generator of {m.name!r} failed: {exc}") from exc
        self.seconds[m.name] = dist.now() - start
        return per_prompt

    def _adopt(self, cand: Candidate, source: str, limit: int) -> Candidate:
        """Tag the candidate; re-tokenize text from a member with another tokenizer. A
        completion longer than `limit` (the member's max_new_tokens) policy tokens is cut there,
        as the policy's own would be: re-tokenized text can be longer than its writer's count,
        and the context check and the `constant` normaliser count on that bound."""
        cand.source = source
        if not self.shares_tokens[source]:
            ids = self.tokenizer(cand.text, add_special_tokens=False)["input_ids"]
            if cand.finished:
                ids = ids + [self.tokenizer.eos_token_id]
            cand.token_ids = ids
            cand.behaviour_logprobs = None  # the peer's own probabilities are over other tokens
        if len(cand.token_ids) > limit:
            cand.token_ids = list(cand.token_ids[:limit])
            if cand.behaviour_logprobs is not None:
                cand.behaviour_logprobs = list(cand.behaviour_logprobs[:limit])
            cand.text = self.tokenizer.decode(cand.token_ids, skip_special_tokens=True)
            cand.finished = False
        return cand
