"""Group evaluators against hand-computed advantages, including ragged groups."""

import math

import torch

from grpo_ensemble.plugins.builtin.evaluators import (
    dr_grpo_advantages,
    grpo_advantages,
    rloo_advantages,
)
from grpo_ensemble.types import Candidate, Group, GroupLayout, Prompt

R = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 3.0, 3.0, 3.0]])
V = torch.ones(2, 4, dtype=torch.bool)


def test_grpo_by_hand():
    adv = grpo_advantages(R, V, V, eps=1e-4)
    std = math.sqrt((4 * 0.25) / 3)  # unbiased std of [1, 0, 0, 1]
    a = 0.5 / (std + 1e-4)
    assert torch.allclose(adv[0], torch.tensor([a, -a, -a, a]))
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # all equal: zero, never NaN


def test_dr_grpo_by_hand():
    adv = dr_grpo_advantages(R, V, V)
    assert adv.tolist() == [[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]


def test_rloo_by_hand():
    adv = rloo_advantages(R, V, V)
    # r=1: baseline (0+0+1)/3; r=0: baseline (1+0+1)/3
    expected = torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3], [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(adv, expected)


def test_ragged_group_ignores_padding():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 99.0], [2.0, 0.0, 1.0, 1.0]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    adv = dr_grpo_advantages(rewards, valid, valid)
    assert torch.allclose(adv[0], torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0]))
    assert torch.allclose(adv[1], torch.tensor([1.0, -1.0, 0.0, 0.0]))
    g = grpo_advantages(rewards, valid, valid, eps=0.0)
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    assert torch.allclose(g[0, :3], torch.tensor([2 / 3, -1 / 3, -1 / 3]) / std)
    assert g[0, 3] == 0


def test_stats_subset_sets_the_baseline_for_everyone():
    rewards = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    stats = torch.tensor([[True, True, False, False]])  # e.g. policy's own candidates only
    assert dr_grpo_advantages(rewards, valid, stats).tolist() == [[-0.5, 0.5, 0.5, 0.5]]


def test_grpo_scales_by_the_groups_std_where_the_statistics_have_none():
    # group.stats: policy with on-failure injection: the policy's two candidates failed alike
    # (std 0), the peer's two succeeded. Before: (1 - 0) / 1e-4 = 10^4 for the peer's
    rewards = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0], [2.0, 2.0, 2.0, 0.0]])
    valid = torch.tensor([[True] * 4, [True] * 4, [True, True, True, False]])
    stats = torch.tensor(
        [[True, True, False, False], [True, True, False, False], valid[2].tolist()]
    )
    eps = 1e-4
    adv = grpo_advantages(rewards, valid, stats, eps)
    pooled = math.sqrt(4 * 0.5**2 / 3)  # the whole group's unbiased std
    peer = 1 / (pooled + eps)
    assert torch.allclose(adv[0], torch.tensor([0.0, 0.0, peer, peer]))
    # the policy's own std where it has one: mean 0.5, std sqrt(0.5)
    own = math.sqrt(0.5)
    assert torch.allclose(adv[1], torch.tensor([-0.5, 0.5, 0.5, -0.5]) / (own + eps))
    assert adv[2].tolist() == [0.0, 0.0, 0.0, 0.0]  # all equal (padding aside): 0
    lone = grpo_advantages(
        torch.tensor([[0.0, 1.0]]),
        torch.ones(1, 2, dtype=torch.bool),
        torch.tensor([[True, False]]),
        eps,
    )  # one statistics candidate
    assert torch.allclose(lone, torch.tensor([[0.0, 1 / (math.sqrt(0.5) + eps)]]))


def test_rloo_lone_statistics_candidate_gets_zero():
    rewards = torch.tensor([[1.0, 0.0]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    stats = torch.tensor([[True, False]])
    # candidate 0 has no other statistics candidate: baseline is itself; candidate 1: 1.0
    assert rloo_advantages(rewards, valid, stats).tolist() == [[0.0, -1.0]]


def test_single_candidate_stats_no_nan():
    rewards = torch.tensor([[1.0, 0.0]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    stats = torch.tensor([[True, False]])
    for fn in (grpo_advantages, dr_grpo_advantages, rloo_advantages):
        assert torch.isfinite(fn(rewards, valid, stats)).all()


def test_group_layout_round_trip():
    p = Prompt("x")
    groups = [Group(p, [Candidate("a", [1], "policy")] * 3), Group(p, [Candidate("b", [2], "s")])]
    layout = GroupLayout.from_groups(groups)
    assert layout.valid.tolist() == [[True, True, True], [True, False, False]]
    assert layout.flat_index.tolist() == [[0, 1, 2], [3, -1, -1]]
    flat = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert layout.to_grid(flat).tolist() == [[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]
    assert layout.to_flat(layout.to_grid(flat)).tolist() == flat.tolist()
