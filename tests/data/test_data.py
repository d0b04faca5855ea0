"""Prompt files in every supported format, bad rows with file and line, and the sampler."""

import csv
import hashlib
import json

import pytest

from grpo_ensemble.data.prompts import (
    Cleaning,
    DataReport,
    PromptSampler,
    clean_text,
    load_prompts,
    too_long,
)
from grpo_ensemble.data.tasks import arithmetic_rows
from grpo_ensemble.errors import InputFileError, RecipeError
from grpo_ensemble.types import Prompt

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
    rows = "".join(json.dumps([p.text, p.fields], sort_keys=True) + "\n" for p in prompts)
    digest = hashlib.sha256(rows.encode()).hexdigest()  # of the prompts and their fields, in order
    assert sampler.state() == {"epoch": 0, "pos": 10, "prompts": 10, "digest": digest}
    assert sampler.differs(sampler.state()) is None
    assert sampler.differs({"epoch": 0, "pos": 10}) is None  # a checkpoint without one
    assert sampler.differs({"digest": "0", "prompts": 11}) == "11 prompts then, 10 now"
    # taken when the sampler is made: a scorer that writes into a row's fields later does not
    # change what a checkpoint keeps (a resumed run reads the rows afresh)
    prompts[0].fields["cached_by_a_scorer"] = 1
    assert sampler.state()["digest"] == digest
    second = sampler.next(10)
    assert sorted(p.text for p in second) == sorted(p.text for p in prompts)
    assert [p.text for p in second] != [p.text for p in first]  # reshuffled
    again = PromptSampler(prompts, seed=3)
    assert [p.text for p in again.next(10)] == [p.text for p in first]


def test_the_prompts_fingerprint_is_the_same_in_every_process_that_reads_the_data():
    """Field values JSON cannot write: numpy values by value, bytes by hash, objects whose text
    holds a memory address (an image from a parquet column) by type: two readings of the same
    data give the same fingerprint; other values give another."""
    import numpy as np

    class Image:  # str() like PIL's: "<Image ... at 0x7f...>"
        pass

    def read(answer):
        fields = {"answer": np.int64(answer), "raw": b"\x00\x01", "image": Image()}
        return [Prompt("1+1=", fields, 1)]

    assert PromptSampler(read(2), 0).digest() == PromptSampler(read(2), 0).digest()
    assert PromptSampler(read(2), 0).digest() != PromptSampler(read(3), 0).digest()


MIXED = (
    b'{"prompt": "1+1=", "answer": "2"}\n'  # 1 good
    b'{"prompt": "x"\n'  # 2 invalid JSON
    b"\xff\xfe\n"  # 3 not UTF-8
    b'{"prompt": "   ", "answer": "0"}\n'  # 4 empty prompt
    b'{"prompt": "2+2="}\n'  # 5 no answer
    b'{"prompt": "1+1=", "answer": "2"}\n'  # 6 duplicate of 1
    b'{"prompt": "3\\u0007+\\uff14=", "answer": "7"}\n'  # 7 control char, fullwidth 4
)


def test_csv_line_that_is_not_utf8_is_a_bad_row_at_its_own_line(tmp_path):
    # 3000 rows; line 2002 holds a Latin-1 byte (decoding the file in blocks reported an
    # earlier line, and such a row could not be skipped); a long field is no CSV error
    path = tmp_path / "p.csv"
    lines = [b"prompt,answer\n"] + [f"{i}+1=,{i + 1}\n".encode() for i in range(3000)]
    lines[2001] = b"caf\xe9=,1\n"
    lines[5] = b"5+1=," + b"6" * 200_000 + b"\n"
    path.write_bytes(b"".join(lines))
    with pytest.raises(InputFileError) as info:
        load_prompts(str(path), "prompt")
    assert str(info.value) == f"{path}:2002: not valid UTF-8"
    report = DataReport(str(path))
    kept = load_prompts(str(path), "prompt", how=Cleaning(on_bad_row="skip"), report=report)
    assert len(kept) == 2999 and dict(report.skipped) == {"not UTF-8": 1}
    assert kept[4].fields["answer"] == "6" * 200_000
    assert [p.index for p in kept[2000:2001]] == [2003]  # line numbers of the rows after it


def test_a_directory_not_written_by_save_to_disk(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_prompts(str(tmp_path), "prompt")
    assert str(info.value) == (
        f"data.train: {str(tmp_path)!r} is a directory but not one written by save_to_disk"
    )


def test_skip_bad_rows_counts_each_reason_and_keeps_the_rest(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(MIXED)
    how = Cleaning(on_bad_row="skip", required_fields=("answer",), dedupe=True)
    report = DataReport(str(path))
    prompts = load_prompts(str(path), "prompt", how=how, report=report)
    assert [(p.text, p.index) for p in prompts] == [("1+1=", 1), ("3\u0007+\uff14=", 7)]
    assert dict(report.skipped) == {
        "invalid JSON": 1,
        "not UTF-8": 1,
        "empty prompt": 1,
        "no answer": 1,
    }
    assert report.duplicates == 1 and report.kept == 2
    assert report.first["no answer"] == f"{path}:5: missing 'answer' field"
    assert report.summary() == (
        f"{path}: 2 prompts; skipped 4 bad rows (1 empty prompt, 1 invalid JSON, 1 no answer, "
        f"1 not UTF-8; first: {path}:2: invalid JSON: Expecting ',' delimiter); "
        "dropped 1 duplicates"
    )


def test_fail_on_a_missing_required_field_names_file_and_line(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(MIXED.split(b"\n", 1)[0] + b'\n{"prompt": "2+2="}\n')
    with pytest.raises(InputFileError) as info:
        load_prompts(str(path), "prompt", how=Cleaning(required_fields=("answer",)))
    assert str(info.value) == f"{path}:2: missing 'answer' field"


def test_cleaning_normalises_and_strips_control_characters(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(MIXED.splitlines()[-1] + b"\n")
    how = Cleaning(normalize="NFKC", strip_control=True)
    (p,) = load_prompts(str(path), "prompt", how=how)
    assert p.text == "3+4=" and p.fields["prompt"] == "3+4="
    assert clean_text("a\tb\nc\x00d\x1b", Cleaning(strip_control=True)) == "a\tb\ncd"


def test_prompts_too_long_for_the_context(tmp_path):
    from grpo_ensemble.models.loading import load_model

    _, tok = load_model("builtin:tiny-arith-small", "policy.model")
    prompts = [Prompt("1+1=", {}, 1), Prompt("123456789+987654321=", {}, 2)]
    report = DataReport("p.jsonl")
    kept = too_long(prompts, tok, 10, Cleaning(on_bad_row="skip"), report)
    assert [p.index for p in kept] == [1] and dict(report.skipped) == {"too long": 1}
    n = len(tok(prompts[1].text)["input_ids"])
    with pytest.raises(InputFileError) as info:
        too_long(prompts, tok, 10, Cleaning(), DataReport("p.jsonl"))
    assert str(info.value) == (
        f"p.jsonl:2: prompt has {n} tokens; the model's context leaves room for 10 beside the "
        "longest completion (sampling.max_new_tokens)"
    )
    with pytest.raises(InputFileError) as info:  # held-out prompts: the evaluation's length
        too_long(prompts, tok, 10, Cleaning(), DataReport("e.jsonl"), "eval.max_new_tokens")
    assert str(info.value).endswith("beside the longest completion (eval.max_new_tokens)")


def test_a_run_reports_skipped_rows_in_the_run_directory(tmp_path, small_recipe):
    import json

    from grpo_ensemble.trainer.loop import train

    path = tmp_path / "mixed.jsonl"
    path.write_bytes(
        MIXED + b'{"prompt": "5+5=", "answer": "10"}\n{"prompt": "6+1=", "answer": "7"}\n'
    )
    r = small_recipe(
        data__train=str(path), data__on_bad_row="skip", data__eval=None, train__steps=1
    )
    result = train(r)
    (train_report,) = json.loads((result.run_dir / "data_report.json").read_text())
    # exact_match reads `answer`: the row without one is reported, not met mid-run
    assert train_report["skipped"] == {
        "invalid JSON": 1,
        "not UTF-8": 1,
        "empty prompt": 1,
        "no answer": 1,
    }
    assert train_report["kept"] == 5 and train_report["duplicates"] == 0


def test_held_out_rows_need_the_field_the_eval_scorer_reads(tmp_path, capsys):
    # found at load time (validate), not by the evaluation after training
    from grpo_ensemble.cli import main

    held = tmp_path / "held.jsonl"
    held.write_text('{"prompt": "1+1=", "solution": "2"}\n{"prompt": "2+2=", "answer": "4"}\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"output_dir: {tmp_path / 'run'}\npolicy: {{model: builtin:tiny-arith-small}}\n"
        f"data: {{eval: {held}}}\neval: {{params: {{field: solution}}}}\n"
    )
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {held}:2: missing 'solution' field", err


def test_on_long_prompt_cuts_skips_or_refuses_whatever_on_bad_row_says(tmp_path):
    from grpo_ensemble.models.loading import load_model

    _, tok = load_model("builtin:tiny-arith-small", "policy.model")  # one token a character
    long = Prompt("123456789+987654321=", {"prompt": "123456789+987654321=", "answer": "1"}, 2)
    prompts = [Prompt("1+1=", {"prompt": "1+1="}, 1), long]
    report = DataReport("p.jsonl")
    cut = too_long(prompts, tok, 10, Cleaning(on_long_prompt="truncate_left"), report)
    # <bos> and the last 9 characters: the end of a prompt is what the completion continues
    assert [(p.text, p.index) for p in cut] == [("1+1=", 1), ("87654321=", 2)]
    assert cut[1].fields == {"prompt": "87654321=", "answer": "1"}
    assert len(tok(cut[1].text)["input_ids"]) == 10 and tok(cut[1].text)["input_ids"][0] == 1
    assert (report.truncated, report.kept, dict(report.skipped)) == (1, 2, {})
    assert report.summary() == "p.jsonl: 2 prompts; cut 1 long prompts from the left"
    # skip despite on_bad_row: fail, and fail despite on_bad_row: skip
    skip = Cleaning(on_bad_row="fail", on_long_prompt="skip")
    assert [p.index for p in too_long(prompts, tok, 10, skip, DataReport("p.jsonl"))] == [1]
    refuse = Cleaning(on_bad_row="skip", on_long_prompt="fail")
    with pytest.raises(InputFileError, match=r"^p\.jsonl:2: prompt has 21 tokens"):
        too_long(prompts, tok, 10, refuse, DataReport("p.jsonl"))


def test_a_run_cuts_long_prompts_and_reports_it(tmp_path, small_recipe):
    import json

    from grpo_ensemble.trainer.loop import train

    path = tmp_path / "long.jsonl"
    rows = [{"prompt": "0" * 80 + f"{a}+{a}=", "answer": str(2 * a)} for a in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = small_recipe(data__train=str(path), data__on_long_prompt="truncate_left", data__eval=None)
    result = train(r)  # the tiny models' context is 64 positions: 5 new tokens leave 59
    (report,) = json.loads((result.run_dir / "data_report.json").read_text())
    assert (report["kept"], report["truncated"]) == (4, 4)
    assert len(result.metrics) == 2


def test_truncate_left_drops_a_conversations_oldest_turns(tmp_path):
    from grpo_ensemble.models.loading import load_model

    # its template renders <bos> and the user messages' contents: one token a character
    _, tok = load_model("builtin:tiny-arith-small", "policy.model")
    sys_ = {"role": "system", "content": "be brief"}
    u1, u2 = {"role": "user", "content": "11+11="}, {"role": "user", "content": "1234+4321="}
    a1, a2 = {"role": "assistant", "content": "22"}, {"role": "assistant", "content": "5555"}
    u3 = {"role": "user", "content": "3+4="}
    talk = (sys_, u1, a1, u2, a2, u3)  # 1 + 6 + 10 + 4 = 21 tokens as the policy renders it

    def cut(limit):
        p = Prompt(json.dumps(talk), {"prompt": [dict(m) for m in talk], "answer": "7"}, 3, talk)
        report = DataReport("c.jsonl")
        how = Cleaning(on_long_prompt="truncate_left")
        try:
            out = too_long([p], tok, limit, how, report)
        except InputFileError:  # no prompt left
            return None, report
        return out[0], report

    p, report = cut(21)  # fits: as it is
    assert p.messages == talk and report.truncated == 0
    p, report = cut(16)  # the first exchange goes: 1 + 10 + 4 tokens
    assert p.messages == (sys_, u2, a2, u3) and report.truncated == 1
    assert p.fields == {"prompt": [sys_, u2, a2, u3], "answer": "7"}
    assert json.loads(p.text) == [sys_, u2, a2, u3]  # the text is the kept messages
    p, _ = cut(10)  # down to the last question, the system message kept: 1 + 4 tokens
    assert p.messages == (sys_, u3)
    # a system message later in the conversation stays where it is, or moves up with the
    # first one when its part is dropped
    late = {"role": "system", "content": "8"}
    talk = (sys_, u1, a1, u2, late, a2, u3)
    p, _ = cut(16)
    assert p.messages == (sys_, u2, late, a2, u3)
    p, _ = cut(10)
    assert p.messages == (sys_, late, u3)
    talk = (sys_, u1, a1, u2, a2, u3)
    p, report = cut(4)  # the last message alone does not fit: left out, said why
    assert p is None and report.skipped["too long"] == 1
    assert report.first["too long"] == (
        "c.jsonl:3: prompt has 21 tokens; the model's context leaves room for 4 beside the "
        "longest completion (sampling.max_new_tokens); its system messages and last turn "
        "alone do not fit: left out"
    )
