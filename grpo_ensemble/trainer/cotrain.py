"""Co-training: several policies trained together, each a peer of the others.

Each policy is an ordinary run (`build_run`) under its own recipe (`recipe.cotraining`), in
which every other policy is a peer whose generator is a `CoPolicy`: it samples nothing, but
hands over copies of that policy's own candidates of the same step. A step therefore first
lets every policy sample and score its own candidates (`sample_own`, all with the weights of
the step before), then finishes each policy's step in turn (`finish_step`: the other
policies' candidates join its groups by their peer mode and the injection rule, then its
advantages, loss and update). The other policies' behaviour log-probs are their sampling
log-probs, so `tis` and the off-policy mask work as for a frozen peer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import dist
from ..data.prompts import PromptSampler
from ..errors import RecipeError, UserError
from ..models.loading import load_field_tokenizer
from ..plugins.interfaces import Generator, SamplingParams, mix64
from ..recipe import Recipe
from ..recipe.cotraining import POLICIES_DIR, policy_recipes, renamed
from ..rollout.groups import Rollout
from ..types import POLICY, Candidate, Prompt
from .build import set_chat_template
from .deepspeed import GroupMPU, place_engines
from .setup import Run, build_run
from .step import Own, finish_step, sample_own


class CoPolicy(Generator):
    """Another policy, as a peer of the policy whose ensemble holds it: its candidates are
    copies of that policy's own of the step (`offer`), found by their prompt's seed."""

    name = "co-policy"

    def __init__(self, policy: str, tokenizer):
        self.policy = policy
        self.tokenizer = tokenizer
        self.k = 0  # its place among the holder's ensemble members (member seeds depend on it)
        self._offered: dict[int, list[Candidate]] = {}

    def offer(self, seeds: Sequence[int], candidates: Sequence[list[Candidate]]) -> None:
        """The other policy's candidates of this step, for each prompt of the holder's
        `seeds`."""
        self._offered = {
            mix64(s * 31 + self.k): list(c) for s, c in zip(seeds, candidates, strict=True)
        }

    def generate(
        self, prompts: Sequence[Prompt], n: int, sampling: SamplingParams
    ) -> list[list[Candidate]]:
        if sampling.seeds is None or len(sampling.seeds) != len(prompts):
            raise RuntimeError("a co-trained policy's candidates are found by their seeds")
        # copies: the holder's ensemble tags and may re-tokenize what it takes
        return [[_copy(c) for c in self._offered[s][:n]] for s in sampling.seeds]


def _copy(c: Candidate) -> Candidate:
    logprobs = None if c.behaviour_logprobs is None else list(c.behaviour_logprobs)
    return dataclasses.replace(
        c, token_ids=list(c.token_ids), behaviour_logprobs=logprobs, extra=dict(c.extra)
    )


@dataclass
class Team:
    """The co-trained policies: the runs this process holds (each with its own engine and run
    directory `<output_dir>/policies/<name>`; every policy with `placement: shared`, its own
    with `split`), in each the other policies' `CoPolicy` peers, and every policy's recipe
    and group of ranks (None: all of them)."""

    recipe: Recipe
    run_dir: Path
    names: list[str]
    recipes: dict[str, Recipe]
    groups: dict[str, Any]
    runs: dict[str, Run] = field(default_factory=dict)
    views: dict[str, dict[str, CoPolicy]] = field(default_factory=dict)

    @property
    def split(self) -> bool:
        return any(g is not None for g in self.groups.values())

    def each(self, fn) -> dict[str, Any]:
        """`fn(name, run)` for every policy this process holds, among that policy's ranks;
        returns every policy's value (the first of its ranks'), on every rank."""

        def mine() -> dict[str, Any]:
            local = {}
            for name, run in self.runs.items():
                with dist.within(self.groups[name]):
                    local[name] = fn(name, run)
            return local

        if not self.split:
            return mine()
        # a failure among one policy's ranks stops the other policies' too
        local = dist.agree(mine)
        found: dict[str, Any] = {}
        for values in dist.all_gather_objects(local):
            for name, value in values.items():
                found.setdefault(name, value)
        return {name: found[name] for name in self.names}

    # what the loop's checkpoints take of a run: every policy's engine (None where another
    # process holds it), the one prompt order
    @property
    def engine(self) -> dict[str, Any]:
        return {n: self.runs[n].engine if n in self.runs else None for n in self.names}

    @property
    def sampler(self) -> PromptSampler:
        return next(iter(self.runs.values())).sampler

    def restored(self, checkpoint: Path, step: int) -> None:
        """After a resume loaded the engines, a sampler and the RNGs: the other samplers, and
        each run's own state."""
        state = self.sampler.state()

        def restore(name: str, run: Run) -> None:
            run.sampler.restore(state)
            run.restored(checkpoint / POLICIES_DIR / name, step)

        self.each(restore)


def build_team(recipe: Recipe, run_dir: Path, given: Mapping[str, Any], note=None) -> Team:
    """Every policy's run this process holds. `given`: the Python objects `train` takes
    (scorers, evaluator, data, eval scorer) that every policy shares."""
    for key in ("generators", "model"):
        if given.get(key) is not None:
            raise UserError(f"{key}: not with policies (each policy is built from its entry)")
    recipes = dict(policy_recipes(recipe))
    names = list(recipes)
    team = Team(recipe, run_dir, names, recipes, place(recipe, names))
    tokenizers = dist.agree(lambda: _tokenizers(recipe))

    def mine() -> None:
        for i, name in enumerate(names):
            if not team.split or dist.global_rank() in _ranks(team.groups[name]):
                _build(team, i, name, tokenizers, given, note)

    if team.split:  # a failure among one policy's ranks stops the other policies' too
        dist.agree(mine)
    else:
        mine()
    _same_prompts(team)
    return team


def _tokenizers(recipe: Recipe) -> dict[str, Any]:
    """Every policy's tokenizer, with its chat template: the other policies' peers in a
    policy's ensemble need theirs, wherever the policy is placed."""
    out = {}
    for i, p in enumerate(recipe.policies):
        tok = load_field_tokenizer(p.model, f"policies.{i}.model", p.trust_remote_code)
        set_chat_template(tok, p, f"policies.{i}")
        out[p.name] = tok
    return out


def _build(team: Team, i: int, name: str, tokenizers: dict, given: Mapping, note) -> None:
    """Policy i's run, among its ranks, its peers of the other policies in it."""
    recipe, names = team.recipe, team.names
    views = {other: CoPolicy(other, tokenizers[other]) for other in names if other != name}
    with dist.within(team.groups[name]), renamed(recipe, i):
        run = build_run(
            team.recipes[name],
            team.run_dir / POLICIES_DIR / name,
            dict(views),
            given.get("reward_scorers"),
            given.get("group_evaluator"),
            given.get("data"),
            note,
            given.get("eval_scorer"),
        )
    for k, m in enumerate(run.ensemble.members):
        if m.name in views:
            views[m.name].k = k
    # each policy samples from its own random streams: two copies of one model would
    # otherwise sample the very same candidates
    seed = recipe.seed if i == 0 else mix64(recipe.seed * 31 + i)
    run.settings = dataclasses.replace(run.settings, seed=seed)
    team.runs[name], team.views[name] = run, views


def place(recipe: Recipe, names: list[str]) -> dict[str, Any]:
    """Each policy's group of ranks: None (every rank) with `placement: shared`; with `split`
    an equal share of consecutive ranks each, this process's engines built on its share."""
    if recipe.placement == "shared":
        return dict.fromkeys(names)
    world, n = dist.world_size(), len(names)
    if world % n:
        exc = RecipeError(
            "placement",
            f"split puts each of the {n} policies on an equal share of the ranks, and "
            f"{world} rank{'s' if world > 1 else ''} cannot be shared {n} ways: run on a "
            f"multiple of {n} ranks, or use placement: shared",
        )
        exc.agreed = True  # every rank finds it; rank 0 prints it
        raise exc
    per = world // n
    # every rank creates every group, in the same order, as torch.distributed requires
    groups = [torch.distributed.new_group(list(range(i * per, (i + 1) * per))) for i in range(n)]
    singles = [torch.distributed.new_group([r]) for r in range(world)]
    me = dist.global_rank()
    place_engines(GroupMPU(groups[me // per], singles[me]))
    return dict(zip(names, groups, strict=True))


def _ranks(group) -> list[int]:
    return torch.distributed.get_process_group_ranks(group)


def _same_prompts(team: Team) -> None:
    """Every policy draws the same prompts in a step: the training prompts are those every
    policy kept (a prompt too long for one policy's context is left out for all)."""

    def key(p: Prompt):
        return p.index, p.text

    kept_here = [{key(p) for p in r.sampler.prompts} for r in team.runs.values()]
    everywhere = [s for here in dist.all_gather_objects(kept_here) for s in here]
    kept = set.intersection(*everywhere)
    if not kept:
        raise UserError("data.train: no training prompt fits every policy's context")
    for r in team.runs.values():
        prompts = [p for p in r.sampler.prompts if key(p) in kept]
        if len(prompts) != len(r.sampler.prompts):
            r.sampler = PromptSampler(prompts, r.sampler.seed, r.sampler.shuffle)


@dataclass
class TeamStep:
    merged: dict  # the run's metrics row
    rows: dict[str, dict]  # each policy's own
    logged: dict[str, Any]  # what `on_rollout` returned for each policy's rollout


def team_step(team: Team, step: int, on_rollout=None) -> TeamStep:
    """One step of every policy. `on_rollout(name, rollout)`: called with each policy's
    scored rollout (its ranks' groups); what it returns comes back in `logged`."""
    owns = {}
    for name, run in team.runs.items():
        with dist.within(team.groups[name]):
            owns[name] = sample_own(run, step)
    _exchange(team, owns)

    def finish(name: str, run: Run):
        seen: dict[str, Any] = {}

        def look(ro: Rollout) -> None:
            seen["wins"] = [x for o in team.views[name] for x in win_counts(ro, o)]
            seen["logged"] = on_rollout(name, ro) if on_rollout is not None else None

        row = finish_step(run, step, owns[name], look)
        wins = dist.all_sum(seen["wins"])  # over this policy's ranks
        pairs = {o: (wins[2 * j], wins[2 * j + 1]) for j, o in enumerate(team.views[name])}
        return row, pairs, seen["logged"]

    done = team.each(finish)
    rows = {name: row for name, (row, _, _) in done.items()}
    wins = {name: pairs for name, (_, pairs, _) in done.items()}
    logged = {name: value for name, (_, _, value) in done.items()}
    return TeamStep(merged_row(step, rows, wins), rows, logged)


def _exchange(team: Team, owns: dict[str, Own]) -> None:
    """Each policy's peers of the other policies offered those policies' candidates for its
    prompts. With `split` they were sampled on other ranks: every rank's are gathered."""
    # policy → slot in the step's prompts → its candidates for that prompt
    table = {
        name: {i: g.candidates for i, g in zip(o.slots, o.sampled.groups, strict=True)}
        for name, o in owns.items()
    }
    if team.split:
        for theirs in dist.all_gather_objects(table):
            for name, slots in theirs.items():
                table.setdefault(name, {}).update(slots)
    for name, views in team.views.items():
        for other, view in views.items():
            view.offer(owns[name].seeds, [table[other][i] for i in owns[name].slots])


def win_counts(ro: Rollout, member: str) -> tuple[float, float]:
    """(wins, pairs) on this rank: over the groups holding candidates of both `member` and the
    policy itself, the pairs (one of each, both scored) and how many of them `member`'s
    candidate won (a tie counts half)."""
    wins = pairs = 0.0
    rewards, scored = ro.rewards.double(), ro.any_scored
    at = 0
    for g in ro.groups:
        idx = range(at, at + len(g.candidates))
        at += len(g.candidates)
        theirs = [rewards[i] for i in idx if scored[i] and ro.candidates[i].source == member]
        ours = [rewards[i] for i in idx if scored[i] and ro.candidates[i].source == POLICY]
        if theirs and ours:
            a, b = torch.stack(theirs)[:, None], torch.stack(ours)[None, :]
            wins += float((a > b).sum()) + 0.5 * float((a == b).sum())
            pairs += float(a.numel() * b.numel())
    return wins, pairs


def merged_row(step: int, rows: dict[str, dict], wins: dict[str, dict]) -> dict:
    """The run's metrics row: each policy's row under `policy/<name>/`, and for each pair
    `pair/<A>/<B>/win_rate`: how often A's candidates beat B's own in B's groups (`wins`:
    per policy B, per other policy A, (wins, pairs) over all of B's groups)."""
    out: dict[str, Any] = {"step": step}
    for name, row in rows.items():
        out.update({f"policy/{name}/{k}": v for k, v in row.items() if k != "step"})
    for holder, pairs in wins.items():
        for other, (won, count) in pairs.items():
            if count:
                out[f"pair/{other}/{holder}/win_rate"] = won / count
    return out
