"""The ensemble: each member's candidates pooled into one group per prompt.

The policy samples first (`sample_policy`); peers then sample for the prompts the step chose
(`sample_peers`: every prompt, or only those where the policy failed). Each group holds the
policy's candidates first, then each peer's in recipe order, each tagged with the member that
produced it. A member whose tokenizer differs from the policy's contributes text, re-tokenized
with the policy's tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

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


@dataclass
class Sampled:
    """What a sampling phase returns: the groups so far, and per member its seconds and the
    calls that failed and were skipped (`on_error: skip`)."""

    groups: list[Group]
    seconds: dict[str, float] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)


class Ensemble:
    """The policy and its peers; the first member is the policy."""

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

    @property
    def policy(self) -> Member:
        return self.members[0]

    def sample_policy(self, prompts: Sequence[Prompt], seeds: Sequence[int] | None) -> Sampled:
        """One group per prompt, holding the policy's candidates. `seeds` (one per prompt) make
        each member's candidates of a prompt reproducible."""
        groups = [Group(prompt=p, candidates=[]) for p in prompts]
        out = Sampled(groups)
        self._sample_into(out, 0, list(range(len(prompts))), seeds)
        return out

    def sample_peers(
        self, groups: Sequence[Group], wanted: Sequence[bool], seeds: Sequence[int] | None
    ) -> Sampled:
        """The groups with each peer's candidates added for the prompts marked in `wanted`
        (groups become ragged where some are not)."""
        pooled = [Group(g.prompt, list(g.candidates)) for g in groups]
        out = Sampled(pooled)
        targets = [i for i, w in enumerate(wanted) if w]
        for k in range(1, len(self.members)):
            self._sample_into(out, k, targets, seeds)
        return out

    def generate(
        self, prompts: Sequence[Prompt], seeds: Sequence[int] | None = None
    ) -> list[Group]:
        """Every member's candidates for every prompt, pooled (the policy's, then the peers')."""
        own = self.sample_policy(prompts, seeds)
        return self.sample_peers(own.groups, [True] * len(prompts), seeds).groups

    def _sample_into(
        self, out: Sampled, k: int, targets: list[int], seeds: Sequence[int] | None
    ) -> None:
        """Member k samples for the groups `targets` of `out`; its candidates are appended."""
        m = self.members[k]
        # a generator with sharded weights must be called on every rank, even with nothing
        if m.n == 0 or (not targets and not getattr(m.generator, "collective", False)):
            return
        sampling = m.sampling
        if seeds is not None:
            member_seeds = tuple(mix64(seeds[i] * 31 + k) for i in targets)
            sampling = replace(m.sampling, seeds=member_seeds)
        start = dist.now()
        per_prompt = self._call(m, [out.groups[i].prompt for i in targets], sampling, out)
        if per_prompt is None:
            return
        out.seconds[m.name] = dist.now() - start
        limit = m.sampling.max_new_tokens
        for i, cands in zip(targets, per_prompt, strict=True):
            out.groups[i].candidates.extend(self._adopt(c, m.name, limit) for c in cands)

    def _call(
        self, m: Member, prompts: list[Prompt], sampling: SamplingParams, out: Sampled
    ) -> list[list[Candidate]] | None:
        """The member's candidates, checked; None when it failed and may be skipped."""
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
                out.faults[m.name] = out.faults.get(m.name, 0) + 1
                return None
            if isinstance(exc, PluginError):
                raise
            raise PluginError(m.generator.name, f"generator of {m.name!r} failed: {exc}") from exc
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
