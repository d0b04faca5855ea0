"""The ensemble: each member's candidates pooled into one group per prompt.

The ensemble asks each member for `n_k` candidates per prompt and pools them into one group per
prompt, policy first, each candidate tagged with the member that produced it. A member whose
tokenizer differs from the policy's contributes text, re-tokenized with the policy's tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from .. import dist
from ..errors import PluginError, UserError
from ..models.loading import same_tokenizer
from ..plugins.interfaces import Generator, SamplingParams, mix64
from ..types import POLICY, Candidate, Group, Prompt


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
