"""The plugin's own tests, with grpo-ensemble's kit (grpo_ensemble.testing)."""

import grpo_ensemble_plain_generate as plugin

from grpo_ensemble.models.loading import resolve_model
from grpo_ensemble.testing import check_generator, run_steps


def test_the_contract():
    out = check_generator(plugin.PlainGenerate(resolve_model("builtin:tiny-arith-base", "m")))
    assert all(c.token_ids for cs in out for c in cs)  # it returns the policy's tokens


def test_two_steps_as_a_peer(tmp_path):
    peer = {"name": "plain", "generator": "plain_generate", "n": 2}
    peer["model"] = "builtin:tiny-arith-base"
    result = run_steps(tmp_path, plugins=[plugin], peers=[peer])
    assert all(m["member/plain/candidates"] == 8 for m in result.metrics)
