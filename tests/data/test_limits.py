"""Input limits on prompt rows (bytes, nesting, valid Unicode) and CSV records that are bad at
their own line: each a bad row at its file and line, skipped alone under on_bad_row: skip."""

import json
import tracemalloc

import pytest

from grpo_ensemble.data.prompts import Cleaning, DataReport, PromptSampler, load_prompts
from grpo_ensemble.data.rows import ROW_BYTES
from grpo_ensemble.errors import InputFileError

SKIP = Cleaning(on_bad_row="skip")


def _jsonl(path, *lines: str | bytes):
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return str(path)


def _loaded(source, how=None, **kw):
    """(indices kept, skipped by reason) under `how`; or the InputFileError it raised."""
    report = DataReport(str(source))
    try:
        prompts = load_prompts(source, "prompt", how=how or Cleaning(), report=report, **kw)
    except InputFileError as exc:
        return str(exc)
    return [p.index for p in prompts], dict(report.skipped)


def test_a_row_longer_than_row_bytes_is_a_bad_row_at_its_line(tmp_path):
    big = json.dumps({"prompt": "1+" * 5000 + "1=", "answer": "x"})
    path = _jsonl(tmp_path / "p.jsonl", '{"prompt": "1+1="}', big, '{"prompt": "2+2="}')
    small = Cleaning(row_bytes=1000)
    assert _loaded(path, small) == f"{path}:2: longer than 1000 bytes (limits.row_bytes)"
    assert _loaded(path, Cleaning(on_bad_row="skip", row_bytes=1000)) == (
        [1, 3],
        {"too large": 1},
    )
    assert _loaded(path)[0] == [1, 2, 3]  # within the default


def test_a_50_mb_row_is_never_read_whole(tmp_path):
    # the default limit, a row far past it: the line is skipped a block at a time
    path = tmp_path / "p.jsonl"
    with path.open("wb") as fh:
        fh.write(b'{"prompt": "1+1="}\n{"prompt": "')
        for _ in range(50):
            fh.write(b"7" * 2**20)
        fh.write(b'"}\n{"prompt": "2+2="}\n')
    tracemalloc.start()
    try:
        result = _loaded(str(path), SKIP)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result == ([1, 3], {"too large": 1})
    assert peak < 3 * ROW_BYTES, peak  # one bounded line at a time, not 50 MB
    assert _loaded(str(path)) == f"{path}:2: longer than {ROW_BYTES} bytes (limits.row_bytes)"


def test_a_long_csv_line_is_a_bad_row_and_the_next_lines_are_read(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,answer\n1+1=,2\n" + "3+3=," + "6" * 5000 + "\n2+2=,4\n")
    assert _loaded(str(path), Cleaning(on_bad_row="skip", row_bytes=1000)) == (
        [2, 4],
        {"too large": 1},
    )


@pytest.mark.parametrize("kind", ["list", "dataset"])
def test_rows_from_python_objects_are_measured_too(kind):
    rows = [{"prompt": "1+1=", "deep": []}, {"prompt": "x" * 5000, "deep": []}]
    rows.append({"prompt": "2+2=", "deep": [[[[1]]]]})  # 5 levels
    if kind == "dataset":
        from datasets import Dataset

        rows = Dataset.from_list(rows)
    how = Cleaning(row_bytes=1000, row_depth=4)
    assert _loaded(rows, how) == "data.train:2: longer than 1000 bytes (limits.row_bytes)"
    assert _loaded(rows, Cleaning(on_bad_row="skip", row_bytes=1000, row_depth=4)) == (
        [1],
        {"too large": 1, "too deep": 1},
    )


def test_a_row_nested_past_the_parser_is_a_bad_row_not_a_recursion_error(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", '{"prompt": "1+1="}', "[" * 100_000, '{"prompt": "2+2="}')
    assert _loaded(path) == f"{path}:2: nested deeper than 100 levels (limits.row_depth)"
    assert _loaded(path, SKIP) == ([1, 3], {"too deep": 1})


def test_a_row_nested_deeper_than_row_depth_is_a_bad_row(tmp_path):
    deep = json.dumps({"prompt": "1+1=", "meta": [[[["x"]]]]})  # 5 levels
    path = _jsonl(tmp_path / "p.jsonl", '{"prompt": "2+2="}', deep)
    assert _loaded(path, Cleaning(row_depth=4)) == (
        f"{path}:2: nested deeper than 4 levels (limits.row_depth)"
    )
    assert _loaded(path, Cleaning(row_depth=5)) == ([1, 2], {})


def test_a_json_array_nested_past_the_parser_is_one_line_not_a_crash(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('[{"prompt": "1+1=", "x": ' + "[" * 100_000 + "]" * 100_000 + "}]")
    assert _loaded(str(path)) == f"{path}: nested deeper than 100 levels (limits.row_depth)"


@pytest.mark.parametrize(
    "row",
    [
        r'{"prompt": "a\ud800b", "answer": "1"}',
        r'{"prompt": "1+1=", "answer": "1", "meta": {"k": ["\udfff"]}}',
        r'{"prompt": "1+1=", "\ud800": "1"}',
    ],
)
def test_a_lone_surrogate_anywhere_in_a_row_is_not_valid_unicode(tmp_path, row):
    path = _jsonl(tmp_path / "p.jsonl", r'{"prompt": "\ud83d\ude00 2+2="}', row)  # a pair: fine
    assert _loaded(path) == f"{path}:2: not valid Unicode (a lone surrogate)"
    assert _loaded(path, SKIP) == ([1], {"not Unicode": 1})


def test_a_lone_surrogate_from_python_is_a_bad_row_too():
    rows = [{"prompt": "1+1="}, {"prompt": "x\ud800"}]
    assert _loaded(rows) == "data.train:2: not valid Unicode (a lone surrogate)"


def _csv(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_a_csv_row_with_more_or_fewer_fields_than_its_header_is_a_bad_row(tmp_path):
    path = _csv(tmp_path / "p.csv", ["prompt,answer", "1+1=,2", "2+2=,4,extra", "3+3=", "4+4=,8"])
    assert _loaded(path) == f"{path}:3: 3 fields where the header has 2"
    report = DataReport(path)
    prompts = load_prompts(path, "prompt", how=SKIP, report=report)
    assert [p.index for p in prompts] == [2, 5]
    assert dict(report.skipped) == {"wrong field count": 2}
    assert report.first["wrong field count"] == f"{path}:3: 3 fields where the header has 2"
    assert all(None not in p.fields for p in prompts)
    PromptSampler(prompts, seed=0).digest()  # the fingerprint sorts keys: all strings


def test_an_unclosed_quote_is_reported_where_it_opened_and_costs_only_its_row(tmp_path):
    lines = ["prompt,answer"] + [f"{i}+1=,{i + 1}" for i in range(1, 42)]  # lines 2–42
    lines[5] = '5+1=,"6'  # line 6: the quote is never closed
    path = _csv(tmp_path / "p.csv", lines)
    assert _loaded(path) == f"{path}:6: bad CSV: a quoted field opened here is never closed"
    kept, skipped = _loaded(path, SKIP)
    assert kept == [n for n in range(2, 43) if n != 6] and skipped == {"bad CSV": 1}


def test_a_quote_closed_lines_later_with_text_after_it_costs_only_its_row(tmp_path):
    # line 4 opens a quote that line 7 closes, followed by text: not one row of lines 4–7
    lines = [
        "prompt,answer",
        "1+1=,2",
        "2+2=,4",
        '3+3=,"6',
        "4+4=,8",
        "5+5=,10",
        '"x"y,1',
        "7+7=,14",
    ]
    path = _csv(tmp_path / "p.csv", lines)
    assert _loaded(path).startswith(f"{path}:4: bad CSV: ")
    assert _loaded(path, SKIP) == ([2, 3, 5, 6, 8], {"bad CSV": 2})  # 4 and 7


def test_a_quoted_field_over_several_lines_is_one_row(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('prompt,answer\n"Add:\n1+1=",2\n"say ""hi""",x\n2+2=,4\n')
    prompts = load_prompts(str(path), "prompt")
    assert [(p.index, p.text, p.fields["answer"]) for p in prompts] == [
        (2, "Add:\n1+1=", "2"),
        (4, 'say "hi"', "x"),
        (5, "2+2=", "4"),
    ]


def test_a_multi_line_record_with_the_wrong_field_count_is_read_again_from_its_next_line(
    tmp_path,
):
    # the record of lines 3–4 has 3 fields; line 4 alone is a good row (a quote inside an
    # unquoted field is a character)
    lines = ["prompt,answer", "1+1=,2", '2+2=,"4', 'x",y', "5+5=,10"]
    path = _csv(tmp_path / "p.csv", lines)
    assert _loaded(path) == f"{path}:3: 3 fields where the header has 2"
    assert _loaded(path, SKIP) == ([2, 4, 5], {"wrong field count": 1})


def test_a_non_utf8_line_inside_a_quoted_field_is_reported_at_both_lines(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(b'prompt,answer\n1+1=,2\n"2+2=\ncaf\xe9",4\n3+3=,6\n')
    assert _loaded(str(path)) == (
        f"{path}:3: bad CSV: a quoted field opened here runs into line 4: not valid UTF-8"
    )
    assert _loaded(str(path), SKIP) == ([2, 5], {"bad CSV": 1, "not UTF-8": 1})


def test_a_bad_csv_header_is_an_error_of_the_file(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('"prompt,answer\n1+1=,2\n')
    assert _loaded(str(path), SKIP) == (
        f"{path}:1: the header: bad CSV: a quoted field opened here is never closed"
    )
