"""Which prompts the peers sample for: every prompt, or (`group.inject: on_failure`, as AMPO
does) only those where none of the policy's own candidates reached `group.success_reward`."""

from __future__ import annotations

from collections.abc import Sequence

from ..types import Group
from .scoring import Scores


def peers_wanted(
    groups: Sequence[Group], scores: Scores | None, inject: str, success_reward: float
) -> list[bool]:
    """Per group: True where the peers sample. `scores` are those of the groups' (policy's)
    candidates, needed for `on_failure` only. A group a skip_group scorer failed on leaves
    the step anyway: it gets no peers. One whose candidates no scorer could score has shown
    no success: it gets them."""
    if inject == "always":
        return [True] * len(groups)
    if scores is None:
        raise ValueError("on_failure injection needs the policy's scores")
    scored = scores.any_scored
    out, k = [], 0
    for g, leaves in zip(groups, scores.skip, strict=True):
        n = len(g.candidates)
        mine = scores.combined[k : k + n][scored[k : k + n]]  # the candidates some scorer scored
        best = float(mine.max()) if len(mine) else None
        out.append(not leaves and (best is None or best < success_reward))
        k += n
    return out
