"""Per-member modes for peer candidates, against numbers computed by hand."""

import shutil

import pytest
import torch
from helpers import batches_of, injected_rollout, rollout_of

from grpo_ensemble import Candidate, Generator, RewardScorer
from grpo_ensemble.errors import RecipeError
from grpo_ensemble.models.loading import load_tokenizer, resolve_model
from grpo_ensemble.rollout.groups import evaluate_groups
from grpo_ensemble.rollout.scoring import score_groups
from grpo_ensemble.trainer.build import check_recipe
from grpo_ensemble.trainer.loss import (
    MODES,
    BatchSize,
    LossSettings,
    grpo_loss,
    shaped_surrogate,
    tis_surrogate,
)
from grpo_ensemble.trainer.setup import build_run


def test_shaped_loss_and_gradient_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.1]], dtype=torch.float64)).requires_grad_(True)
    loss = shaped_surrogate(logp, torch.tensor([2.0], dtype=torch.float64), gamma=0.1)
    # −A·p/(p+γ): −2·0.5/0.6 and −2·0.1/0.2
    assert torch.allclose(loss, torch.tensor([[-2 * 0.5 / 0.6, -1.0]], dtype=torch.float64))
    loss.sum().backward()
    # dL/dlogp = −A·γp/(p+γ)²
    expected = [[-2 * 0.1 * 0.5 / 0.6**2, -2 * 0.1 * 0.1 / 0.2**2]]
    assert torch.allclose(logp.grad, torch.tensor(expected, dtype=torch.float64))


def test_tis_clamps_and_gradient_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.3]], dtype=torch.float64)).requires_grad_(True)
    mu = torch.log(torch.tensor([[0.25, 0.5, 0.3]], dtype=torch.float64))
    loss, w, hit = tis_surrogate(logp, mu, torch.tensor([1.0], dtype=torch.float64), lo=0.5, hi=1.5)
    # ratios 2.0, 0.4, 1.0 → clamped to 1.5, 0.5, 1.0
    assert torch.allclose(w, torch.tensor([[1.5, 0.5, 1.0]], dtype=torch.float64))
    assert hit.tolist() == [[True, True, False]]
    loss.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[-1.5, -0.5, -1.0]], dtype=torch.float64))


def test_mixed_modes_in_one_batch():
    logp = torch.log(torch.tensor([[0.5], [0.5], [0.5]])).requires_grad_(True)
    mu = torch.log(torch.tensor([[0.0], [0.0], [0.25]]).clamp(min=1e-30))
    adv = torch.tensor([1.0, 1.0, 1.0])
    out = grpo_loss(
        logp,
        logp.detach(),
        None,
        adv,
        torch.ones(3, 1),
        BatchSize(3, 3, 1),
        LossSettings(0.2, 0.2, 0.0, "token_mean", shaped_gamma=0.1, tis_low=0.0, tis_high=1.5),
        torch.tensor([MODES["on_policy"], MODES["shaped"], MODES["tis"]]),
        mu,
    )
    # on_policy: −1; shaped: −0.5/0.6; tis: −1.5·log 0.5; token mean over 3 tokens
    expected = (-1 - 0.5 / 0.6 - 1.5 * torch.log(torch.tensor(0.5)).item()) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.weight[:, 0].tolist() == pytest.approx([1.0, 0.5 / 0.6, 1.5])
    out.loss.backward()
    # d/dlogp: on_policy −A·ρ = −1; shaped −γp/(p+γ)² = −0.05/0.36; tis −w = −1.5; all / 3
    assert logp.grad[:, 0].tolist() == pytest.approx([-1 / 3, -0.05 / 0.36 / 3, -1.5 / 3])


class Oracle(Generator):
    name = "oracle"

    def generate(self, prompts, n, sampling):
        return [[Candidate(p.fields["answer"], [], "") for _ in range(n)] for p in prompts]


def _rollout(small_recipe, tmp_path, **changes):
    recipe = small_recipe(peers=[{"name": "oracle", "n": 2, **changes.pop("peer", {})}], **changes)
    run = build_run(recipe, tmp_path, generators={"oracle": Oracle()})
    torch.manual_seed(0)
    return run, rollout_of(run)


def test_baseline_only_counts_in_stats_but_gets_no_gradient(small_recipe, tmp_path):
    run, ro = _rollout(
        small_recipe, tmp_path, peer={"mode": "baseline_only"}, group__evaluator="dr_grpo"
    )
    rewards = ro.layout.to_grid(ro.rewards)  # (4, 4): 2 policy, then 2 oracle (always 1.0)
    assert rewards[:, 2:].eq(1.0).all()
    # policy candidates' advantage: r − mean of all four (the oracle's 1.0s included)
    expected = rewards[:, :2] - rewards.mean(dim=1, keepdim=True)
    assert torch.allclose(ro.layout.to_grid(ro.advantages)[:, :2], expected)
    sources = [c.source for c in ro.candidates]
    assert [s for s, k in zip(sources, ro.keep.tolist(), strict=True) if k] == ["policy"] * 8
    batches = batches_of(run, ro)
    assert all(s == "policy" for b in batches for s in b.sources)


def test_stats_over_the_policy_only(small_recipe, tmp_path):
    _, ro = _rollout(small_recipe, tmp_path, group__stats="policy", group__evaluator="dr_grpo")
    rewards = ro.layout.to_grid(ro.rewards)
    expected = rewards - rewards[:, :2].mean(dim=1, keepdim=True)
    assert torch.allclose(ro.layout.to_grid(ro.advantages), expected)


def test_tis_needs_the_same_tokenizer(small_recipe, tmp_path):
    other = tmp_path / "other-tokenizer"
    shutil.copytree(resolve_model("builtin:tiny-arith-base", "x"), other)
    tok = load_tokenizer(str(other))
    tok.add_tokens(["@"])  # one more token: the vocabularies now differ
    tok.save_pretrained(other)
    ok = small_recipe(peers=[{"name": "s", "model": "builtin:tiny-arith-base", "mode": "tis"}])
    check_recipe(ok)
    bad = small_recipe(peers=[{"name": "s", "model": str(other), "mode": "tis"}])
    with pytest.raises(RecipeError, match=r"peers\.0\.mode: tis needs .* tokenizer differs"):
        check_recipe(bad)
    with pytest.raises(RecipeError, match=r"peers\.0\.mode"):
        build_run(bad, tmp_path)


@pytest.mark.parametrize("mode", ["shaped", "tis", "baseline_only"])
def test_each_mode_trains_and_logs(small_recipe, mode):
    from grpo_ensemble import train

    r = small_recipe(
        peers=[
            {
                "name": "strong",
                "model": "builtin:tiny-arith-base",
                "n": 2,
                "mode": mode,
                "sampling": {"max_new_tokens": 5},
            }
        ],
        eval__before=False,
        eval__after=False,
    )
    m = train(r).metrics[0]
    if mode == "baseline_only":
        assert m["offpolicy_token_fraction"] == 0.0 and m["trained_candidates"] == 8
    else:
        assert 0 < m["offpolicy_token_fraction"] < 1
        assert m["member/strong/token_fraction"] == pytest.approx(m["offpolicy_token_fraction"])
        assert m["member/policy/token_fraction"] + m["offpolicy_token_fraction"] == pytest.approx(1)
        assert m[f"{mode}/weight_mean"] > 0
        if mode == "tis":
            assert 0 <= m["tis/clamped_fraction"] <= 1


def _on_failure_run(small_recipe, tmp_path, scorer=None):
    """8 prompts, the policy's 2 candidates each, an oracle's 2 where the policy failed."""
    recipe = small_recipe(
        peers=[{"name": "oracle", "n": 2}],
        group__inject="on_failure",
        group__evaluator="dr_grpo",
        train__prompts_per_step=8,
    )
    given = [(scorer, 1.0)] if scorer is not None else None
    return build_run(recipe, tmp_path, generators={"oracle": Oracle()}, reward_scorers=given)


def test_on_failure_injection_gives_ragged_groups(small_recipe, tmp_path):
    from grpo_ensemble.trainer.step import grpo_step

    run = _on_failure_run(small_recipe, tmp_path)
    torch.manual_seed(0)
    own_scores, groups, ro = injected_rollout(run, 8)
    sizes = []
    for g in groups:
        solved = any(c.text.strip() == g.prompt.fields["answer"] for c in g.candidates[:2])
        assert len(g.candidates) == (2 if solved else 4)  # the oracle only where all failed
        sizes.append(len(g.candidates))
    assert 2 in sizes and 4 in sizes  # really ragged
    assert len(own_scores.combined) == 2 * 8  # the policy's candidates, scored for the test
    # scored all at once instead, the same rewards
    once = score_groups(groups, run.scorers)
    assert evaluate_groups(groups, once, run.evaluator, run.settings.group).rewards.tolist() == (
        ro.rewards.tolist()
    )
    k = 0
    for g in groups:  # each group's advantages: r − mean over that group only, by hand
        r = ro.rewards[k : k + len(g.candidates)]
        assert torch.allclose(ro.advantages[k : k + len(g.candidates)], r - r.mean())
        k += len(g.candidates)
    m = grpo_step(run, 1)
    failed = m["candidates"] - 2 * 8  # oracle candidates injected this step
    assert m.get("member/oracle/candidates", 0) == failed
    assert m["member/policy/best_share"] + m.get("member/oracle/best_share", 0) == pytest.approx(1)


class CountingScorer(RewardScorer):
    """Exact match plus a different small amount at every call of every candidate (so that
    scoring a candidate twice would give it two rewards); counts the calls per candidate."""

    name = "counting"

    def __init__(self):
        self.calls: dict[int, int] = {}
        self.n = 0

    def score(self, samples):
        out = []
        for s in samples:
            self.calls[id(s.candidate)] = self.calls.get(id(s.candidate), 0) + 1
            self.n += 1
            out.append(float(s.completion.strip() == s.row["answer"]) + self.n / 1000)
        return out


def test_on_failure_scores_each_candidate_once(small_recipe, tmp_path):
    from grpo_ensemble.trainer.step import grpo_step

    scorer = CountingScorer()
    run = _on_failure_run(small_recipe, tmp_path, scorer)
    torch.manual_seed(0)
    own_scores, groups, ro = injected_rollout(run, 8)
    seen = own_scores.combined.tolist()  # what decided the injection
    assert len(seen) == 16
    sizes = [len(g.candidates) for g in groups]
    assert 2 in sizes and 4 in sizes  # peers sampled for some prompts only
    assert sorted(scorer.calls.values()) == [1] * sum(sizes)  # each candidate scored once
    k = j = 0
    for g in groups:  # the policy's rewards are those the test saw; the oracle's were new calls
        assert ro.rewards[k : k + 2].tolist() == seen[j : j + 2]
        for c, r in zip(g.candidates[2:], ro.rewards[k + 2 : k + len(g.candidates)], strict=True):
            assert c.source == "oracle" and r.item() > 1.0  # exact match + a later call's amount
        k, j = k + len(g.candidates), j + 2
    scorer.calls.clear()
    m = grpo_step(run, 1)  # a whole step: each of its candidates scored once too
    assert sorted(scorer.calls.values()) == [1] * int(m["candidates"])


class FailsOnFirstPrompt(RewardScorer):
    """Exact match, but every call holding the first prompt it was ever given raises."""

    name = "fails_on_first"
    bad = None

    def score(self, samples):
        self.bad = self.bad or samples[0].prompt.text
        if any(s.prompt.text == self.bad for s in samples):
            raise ValueError("cannot parse")
        return [float(s.completion.strip() == s.row["answer"]) for s in samples]


def test_on_failure_samples_no_peers_for_a_group_that_leaves_the_step(small_recipe, tmp_path):
    recipe = small_recipe(
        peers=[{"name": "oracle", "n": 2}],
        group__inject="on_failure",
        train__prompts_per_step=8,
    )
    scorer = FailsOnFirstPrompt()
    given = [(scorer, 1.0, {"on_error": "skip_group"})]
    run = build_run(recipe, tmp_path, generators={"oracle": Oracle()}, reward_scorers=given)
    torch.manual_seed(0)
    own_scores, groups, ro = injected_rollout(run, 8)
    bad = [g for g in groups if g.prompt.text == scorer.bad]
    assert len(bad) == 1 and [c.source for c in bad[0].candidates] == ["policy"] * 2
    assert own_scores.skip.count(True) == 1
    assert ro.skipped_groups == 1 and bad[0] not in ro.groups
    assert any(len(g.candidates) == 4 for g in ro.groups)  # the others did get peers


def test_on_failure_decides_once_for_every_peer(small_recipe, tmp_path):
    # two peers, and a policy that fails everywhere: both peers sample for every prompt (the
    # decision is taken once, on the policy's candidates; it used to be taken again before the
    # second peer whenever the first decision had marked every prompt, which also scored the
    # policy's candidates twice and, on several ranks, ran a collective on some ranks only)
    class PolicyFails(RewardScorer):
        name = "policy_fails"

        def __init__(self):
            self.calls = []

        def score(self, samples):
            self.calls.append(sorted({s.candidate.source for s in samples}))
            return [float(s.candidate.source != "policy") for s in samples]

    peers = [{"name": "a", "n": 2}, {"name": "b", "n": 2}]
    recipe = small_recipe(peers=peers, group__inject="on_failure")
    scorer = PolicyFails()
    run = build_run(
        recipe,
        tmp_path,
        generators={"a": Oracle(), "b": Oracle()},
        reward_scorers=[(scorer, 1.0)],
    )
    _, groups, _ = injected_rollout(run, 4)
    assert [[c.source for c in g.candidates] for g in groups] == [
        ["policy"] * 2 + ["a"] * 2 + ["b"] * 2
    ] * 4
    assert scorer.calls == [["policy"], ["a", "b"]]


def test_best_share_by_hand():
    from grpo_ensemble.rollout.groups import Rollout
    from grpo_ensemble.trainer.metrics import best_candidates
    from grpo_ensemble.types import Group, GroupLayout, Prompt

    p = Prompt("x")
    groups = [Group(p, [Candidate("a", [], "policy")] * 3), Group(p, [Candidate("b", [], "s")] * 2)]
    layout = GroupLayout.from_groups(groups)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.2])  # ties in group 0; 0.5 wins group 1
    ro = Rollout(groups, layout, [], rewards, {}, rewards, layout.to_flat(layout.valid), 0)
    assert best_candidates(ro).tolist() == [True, False, True, True, False]


def _permuted_vocab_copy(src: str, dst) -> None:
    """The same model under another vocabulary: every non-special token gets another id
    (embedding rows moved along), so text behaviour is unchanged but token ids differ."""
    import json

    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = load_tokenizer(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    plain = sorted(i for t, i in vocab.items() if not t.startswith("<"))
    new_id = dict(zip(plain, reversed(plain), strict=True))
    spec["model"]["vocab"] = {t: new_id.get(i, i) for t, i in vocab.items()}
    backend = Tokenizer.from_str(json.dumps(spec))
    new_tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    emb = model.get_input_embeddings().weight.data
    order = torch.arange(emb.shape[0])
    for old, new in new_id.items():
        order[new] = old
    emb.copy_(emb[order].clone())  # row `new` now holds what row `old` held
    model.save_pretrained(dst)
    new_tok.save_pretrained(dst)


def test_peer_with_another_vocabulary_is_retokenized(small_recipe, tmp_path):
    from grpo_ensemble.engine.hf import HFGenerator
    from grpo_ensemble.plugins.interfaces import SamplingParams
    from grpo_ensemble.types import Prompt

    base = resolve_model("builtin:tiny-arith-base", "x")
    other = tmp_path / "permuted"
    _permuted_vocab_copy(base, other)
    prompts = [Prompt("12+7=", {"answer": "19"}), Prompt("99+99=", {"answer": "198"})]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=5)
    same = HFGenerator(base).generate(prompts, 1, greedy)
    moved = HFGenerator(str(other)).generate(prompts, 1, greedy)
    assert [c[0].text for c in same] == [c[0].text for c in moved]  # same model, other ids
    assert [c[0].token_ids for c in same] != [c[0].token_ids for c in moved]
    recipe = small_recipe(
        peers=[
            {
                "name": "other",
                "model": str(other),
                "n": 2,
                "mode": "shaped",
                "sampling": {"max_new_tokens": 5},
            }
        ],
        eval__before=False,
        eval__after=False,
        train__steps=1,
    )
    run = build_run(recipe, tmp_path)
    assert run.ensemble.shares_tokens == {"policy": True, "other": False}
    torch.manual_seed(0)
    groups = run.ensemble.generate(run.sampler.next(4))
    for g in groups:
        for c in g.candidates[2:]:
            ids = run.tokenizer(c.text, add_special_tokens=False)["input_ids"]
            assert c.token_ids == ids + ([run.tokenizer.eos_token_id] if c.finished else [])
            assert c.behaviour_logprobs is None


def test_baseline_only_with_policy_stats_is_refused(small_recipe, tmp_path):
    # the policy's own statistics leave the peer's scores out, and its candidates get no
    # gradient: the peer would cost sampling and scoring and change nothing
    with pytest.raises(RecipeError, match="peers.0.mode: baseline_only changes nothing"):
        small_recipe(peers__0__mode="baseline_only", group__stats="policy")


@pytest.mark.parametrize("constant_tokens, expected", [("policy", 5), ("longest", 9)])
def test_the_constant_normaliser_takes_the_policys_own_length(
    small_recipe, tmp_path, constant_tokens, expected
):
    from grpo_ensemble.trainer.setup import build_run

    r = small_recipe(
        peers__0__sampling__max_new_tokens=9,
        loss__aggregation="constant",
        loss__constant_tokens=constant_tokens,
    )
    run = build_run(r, tmp_path)
    assert run.settings.update.max_new_tokens == expected
