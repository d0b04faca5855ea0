"""The README's promise: the quickstart raises held-out accuracy by at least 15 points."""

from pathlib import Path

import pytest

from grpo_ensemble import load_recipe, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_improves_heldout_accuracy_by_15_points(tmp_path):
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml", [f"output_dir={tmp_path}", "log.progress=false"]
    )
    result = train(recipe)
    assert result.before is not None and result.after is not None
    assert result.before.n == result.after.n == 300
    assert result.after.accuracy - result.before.accuracy >= 0.15, (
        result.before.accuracy,
        result.after.accuracy,
    )
