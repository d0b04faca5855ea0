"""Prompt sources beyond files: folders written by `datasets`' `save_to_disk` (a Dataset, or a
DatasetDict's split), Python objects (a `datasets.Dataset`, a list of dicts), and columns read
under other names (`data.rename`)."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset, DatasetDict

from grpo_ensemble import InputFileError, RecipeError, train
from grpo_ensemble.cli import main
from grpo_ensemble.data.prompts import Cleaning, load_prompts

ROWS = [{"prompt": "1+2=", "answer": "3", "id": 1}, {"prompt": "40+2=", "answer": "42", "id": 7}]


def _as_loaded(prompts):
    return [(p.text, dict(p.fields), p.index) for p in prompts]


def test_a_save_to_disk_folder_reads_as_the_same_rows_in_a_file(tmp_path):
    folder = tmp_path / "saved"
    Dataset.from_list(ROWS).save_to_disk(str(folder))
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    from_folder = load_prompts(str(folder), "prompt")
    assert _as_loaded(from_folder) == [
        ("1+2=", {"prompt": "1+2=", "answer": "3", "id": 1}, 1),
        ("40+2=", {"prompt": "40+2=", "answer": "42", "id": 7}, 2),
    ]
    assert _as_loaded(load_prompts(str(jsonl), "prompt")) == _as_loaded(from_folder)


def test_a_dataset_dicts_split_is_named(tmp_path):
    folder = tmp_path / "dd"
    dd = DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS[:1])})
    dd.save_to_disk(str(folder))
    assert [p.text for p in load_prompts(str(folder), "prompt", split="test")] == ["1+2="]
    with pytest.raises(RecipeError) as info:
        load_prompts(str(folder), "prompt", "data.train")
    assert str(info.value) == (
        f"data.train_split: {str(folder)!r} holds the splits test, train: name one"
    )
    with pytest.raises(RecipeError, match=r"data.eval_split: .* it has no split 'dev'"):
        load_prompts(str(folder), "prompt", "data.eval", split="dev")


def test_columns_read_under_other_names(tmp_path):
    rows = [{"question": "5+5=", "solution": "10"}]
    how = Cleaning(
        required_fields=("answer",), rename=(("question", "prompt"), ("solution", "answer"))
    )
    (p,) = load_prompts(rows, "prompt", "train_data", how)
    assert (p.text, dict(p.fields)) == ("5+5=", {"prompt": "5+5=", "answer": "10"})


def test_python_objects_and_their_bad_rows():
    prompts = load_prompts(Dataset.from_list(ROWS), "prompt", "train_data")
    assert [p.text for p in prompts] == ["1+2=", "40+2="]
    assert [p.text for p in load_prompts(ROWS, "prompt", "eval_data")] == ["1+2=", "40+2="]
    with pytest.raises(InputFileError) as info:
        load_prompts([ROWS[0], {"question": "x"}], "prompt", "train_data")
    assert str(info.value) == "train_data:2: missing or empty 'prompt' field"
    with pytest.raises(InputFileError, match=r"^train_data:1: not a mapping"):
        load_prompts(["1+2="], "prompt", "train_data")


def test_validate_and_train_from_a_saved_folder_and_from_objects(tmp_path, small_recipe):
    rows = [{"q": f"{a}+{b}=", "a": str(a + b)} for a in range(3) for b in range(4)]
    folder = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(folder))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "policy: {model: 'builtin:tiny-arith-small'}\n"
        f"data: {{train: '{folder}', train_split: train, eval: null,"
        " rename: {q: prompt, a: answer}}\n"
    )
    assert main(["validate", str(recipe)]) == 0
    # the Python API: a Dataset to train on, a list of dicts to evaluate on
    result = train(
        small_recipe(data__rename={"q": "prompt", "a": "answer"}),
        train_data=Dataset.from_list(rows),
        eval_data=rows[:5],
    )
    assert len(result.metrics) == 2 and result.before.n == result.after.n == 5
    report = json.loads((result.run_dir / "data_report.json").read_text())
    assert [(r["source"], r["kept"]) for r in report] == [("train_data", 12), ("eval_data", 5)]


@pytest.fixture
def offline(monkeypatch):
    """The hub unreachable at once, as HF_HUB_OFFLINE=1 makes it (read when imported)."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.usefixtures("offline")
def test_a_hub_data_set_without_a_network_is_a_recipe_error(tmp_path, capsys):
    with pytest.raises(RecipeError) as info:
        load_prompts("trl-lib/tldr", "prompt", "data.train", split="train")
    assert str(info.value).startswith(
        "data.train: 'trl-lib/tldr' is no local file or folder, and the hub cannot be reached "
        "for it (Couldn't reach 'trl-lib/tldr' on the Hub (OfflineModeIsEnabled)); download it"
    )
    with pytest.raises(RecipeError, match=r"prompt file 'data/p.jsonl' does not exist"):
        load_prompts("data/p.jsonl", "prompt")  # a file name is never taken for a hub id
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "policy: {model: 'builtin:tiny-arith-small'}\n"
        "data: {train: trl-lib/tldr, train_config: default, train_split: train}\n"
    )
    assert main(["validate", str(recipe)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {recipe}:2: data.train: 'trl-lib/tldr'")
