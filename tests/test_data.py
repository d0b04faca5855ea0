"""Prompt files in every supported format, bad rows with file and line, and the sampler."""

import csv
import json

import pytest

from grpo_ensemble.data import PromptSampler, load_prompts
from grpo_ensemble.errors import InputFileError, RecipeError
from grpo_ensemble.tasks import arithmetic_rows

ROWS = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "40+2=", "answer": "42"}]


def test_jsonl_csv_parquet_give_the_same_prompts(tmp_path):
    jl = tmp_path / "p.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n")  # blank line skipped
    cs = tmp_path / "p.csv"
    with cs.open("w", newline="") as fh:
        w = csv.DictWriter(fh, ["prompt", "answer"])
        w.writeheader()
        w.writerows(ROWS)
    from datasets import Dataset

    pq = tmp_path / "p.parquet"
    Dataset.from_list(ROWS).to_parquet(str(pq))
    js = tmp_path / "p.json"
    js.write_text(json.dumps(ROWS, indent=1))
    for path in (jl, cs, pq, js):
        prompts = load_prompts(str(path), "prompt")
        assert [(p.text, p.fields["answer"]) for p in prompts] == [("1+2=", "3"), ("40+2=", "42")]


@pytest.mark.parametrize(
    "content, line, fragment",
    [
        (b'{"prompt": "1+1=", "answer": "2"}\n{"prompt": "x"\n', 2, "invalid JSON"),
        (b'{"prompt": "1+1="}\n\xff\xfe\n', 2, "not valid UTF-8"),
        (b'{"prompt": "1+1="}\n{"prompt": "   "}\n', 2, "missing or empty 'prompt'"),
        (b'{"question": "1+1="}\n', 1, "missing or empty 'prompt'"),
        (b"[1, 2]\n", 1, "expected a JSON object"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, content, line, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputFileError) as info:
        load_prompts(str(path), "prompt")
    assert (info.value.path, info.value.line) == (str(path), line)
    assert fragment in str(info.value)


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(RecipeError, match="data.train: prompt file"):
        load_prompts(str(tmp_path / "none.jsonl"), "prompt")
    other = tmp_path / "p.txt"
    other.write_text("1+1=")
    with pytest.raises(InputFileError, match="unsupported prompt file type"):
        load_prompts(str(other), "prompt")


def test_builtin_arithmetic_task():
    train, test = arithmetic_rows("train"), arithmetic_rows("test")
    assert (len(train), len(test)) == (4000, 300)
    for row in train[:50] + test[:50]:
        a, b = row["prompt"].removesuffix("=").split("+")
        assert int(row["answer"]) == int(a) + int(b)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    prompts = load_prompts("builtin:arithmetic/test", "prompt")
    assert prompts[0].text == test[0]["prompt"]
    with pytest.raises(RecipeError, match="unknown split"):
        load_prompts("builtin:arithmetic/val", "prompt")


def test_sampler_sees_every_prompt_once_per_epoch():
    prompts = load_prompts("builtin:arithmetic/test", "prompt")[:10]
    sampler = PromptSampler(prompts, seed=3)
    first = sampler.next(4) + sampler.next(6)
    assert sorted(p.text for p in first) == sorted(p.text for p in prompts)
    assert sampler.state() == {"epoch": 0, "pos": 10}
    second = sampler.next(10)
    assert sorted(p.text for p in second) == sorted(p.text for p in prompts)
    assert [p.text for p in second] != [p.text for p in first]  # reshuffled
    again = PromptSampler(prompts, seed=3)
    assert [p.text for p in again.next(10)] == [p.text for p in first]
