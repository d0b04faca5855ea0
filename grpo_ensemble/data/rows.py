"""Rows of prompt files (.jsonl, .json, .csv, .parquet), read within limits.

A line is read with a bounded `readline`, so that one enormous row never sits whole in memory:
a row longer than `row_bytes` is a bad row at its own line, as is one that is not UTF-8, not
valid Unicode, or nested deeper than `row_depth`. A CSV record is read one at a time, so that a
bad one (the wrong number of fields, a quote never closed) is reported at the line where it
began and reading starts again on the line after it.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import InputFileError

ROW_BYTES = 4 * 2**20  # past any model's context as text, yet cheap to hold and tokenize
ROW_DEPTH = 100  # far below Python's recursion limit, which JSON and hashing code share
_BLOCK = 2**16  # bytes read at a time while skipping the rest of an over-long line
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how JSON text can hold one


class BadRow(Exception):
    """A row that cannot be used; `reason` is a short category for the counts."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


def too_large(row_bytes: int) -> BadRow:
    return BadRow("too large", f"longer than {row_bytes} bytes (limits.row_bytes)")


def too_deep(row_depth: int) -> BadRow:
    return BadRow("too deep", f"nested deeper than {row_depth} levels (limits.row_depth)")


def row_problem(row: Mapping, row_bytes: int, row_depth: int) -> BadRow | None:
    """Why a row cannot be used (None when it can): nested deeper than `row_depth`, holding a
    lone surrogate (not valid Unicode: no tokenizer or file takes it), a key that is not a
    string, or larger than `row_bytes` (its strings' UTF-8 bytes, one byte a number: never
    more than its JSON). Walked a level at a time, without recursion."""
    size, depth, level = 0, 1, [row]
    while level:
        if depth > row_depth:
            return too_deep(row_depth)
        inner = []
        for container in level:
            values = container
            if isinstance(container, Mapping):
                odd = next((k for k in container if not isinstance(k, str)), None)
                if odd is not None:  # the prompts' fingerprint sorts keys: str with str
                    return BadRow("malformed", f"a key that is not a string: {odd!r}")
                values = itertools.chain(container, container.values())
            size += 2
            for value in values:
                if isinstance(value, str):
                    if value.isascii():  # no surrogate, one byte a character
                        size += len(value)
                    elif len(value) > row_bytes:  # before work in proportion to its length
                        return too_large(row_bytes)
                    elif _SURROGATE.search(value):
                        return BadRow("not Unicode", "not valid Unicode (a lone surrogate)")
                    else:
                        size += len(value.encode("utf-8"))
                elif isinstance(value, Mapping | list | tuple):
                    inner.append(value)
                else:
                    size += len(value) if isinstance(value, bytes | bytearray) else 1
            if size > row_bytes:
                return too_large(row_bytes)
        level, depth = inner, depth + 1
    return None


def checked(rows: Iterable[tuple[int, Any]], row_bytes: int, row_depth: int) -> Iterator:
    """The rows, each that `row_problem` finds a problem in replaced by its BadRow."""
    for line, row in rows:
        if isinstance(row, Mapping):
            row = row_problem(row, row_bytes, row_depth) or row
        yield line, row


def _lines(path: Path, row_bytes: int) -> Iterator[tuple[int, str | BadRow]]:
    """Each line decoded (its line ending kept), numbered from 1; a line longer than
    `row_bytes` (its ending aside) is a BadRow, and no more than that of it is ever held."""
    with path.open("rb") as fh:
        line_no = 0
        while raw := fh.readline(row_bytes + 2):
            line_no += 1
            ending = 2 if raw.endswith(b"\r\n") else 1 if raw.endswith(b"\n") else 0
            if len(raw) - ending > row_bytes:
                while raw and not raw.endswith(b"\n"):  # the rest of it, unread
                    raw = fh.readline(_BLOCK)
                yield line_no, too_large(row_bytes)
                continue
            try:
                yield line_no, raw.decode("utf-8")
            except UnicodeDecodeError:
                yield line_no, BadRow("not UTF-8", "not valid UTF-8")


def _json_row(text: str, row_bytes: int, row_depth: int) -> dict[str, Any] | BadRow:
    """A JSON line's object. Its size is the line's, already bounded; it is walked for
    surrogates and depth only where its text could hold them (an escape of one, more
    brackets than the depth allowed)."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        return BadRow("invalid JSON", f"invalid JSON: {exc.msg}")
    except RecursionError:  # nested past what the parser can follow
        return too_deep(row_depth)
    if not isinstance(row, dict):
        return BadRow("not an object", "expected a JSON object")
    if _SURROGATE_ESCAPE.search(text) or text.count("[") + text.count("{") > row_depth:
        return row_problem(row, row_bytes, row_depth) or row
    return row


def jsonl_rows(path: Path, row_bytes: int, row_depth: int) -> Iterator[tuple[int, Any]]:
    for line_no, text in _lines(path, row_bytes):
        if isinstance(text, BadRow):
            yield line_no, text
        elif text.strip():
            yield line_no, _json_row(text, row_bytes, row_depth)


def json_array_rows(path: Path, row_depth: int) -> Iterator[tuple[int, Any]]:
    """A .json file holding one array of objects; rows are numbered from 1."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputFileError(str(path), "not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise InputFileError(str(path), f"invalid JSON: {exc.msg}", line=exc.lineno) from None
    except RecursionError:
        raise InputFileError(str(path), str(too_deep(row_depth))) from None
    for i, row in enumerate(rows, start=1):
        yield i, row if isinstance(row, dict) else BadRow("not an object", "not a JSON object")


class _Pushback:
    """An iterator of lines that can be given lines back, to be read again next."""

    def __init__(self, lines: Iterator):
        self._lines = lines
        self._back: list = []

    def __iter__(self):
        return self

    def __next__(self):
        return self._back.pop() if self._back else next(self._lines)

    def give_back(self, items: list) -> None:
        self._back.extend(reversed(items))


class _Broken(Exception):
    """A line of a record that cannot be read (too long, not UTF-8)."""

    def __init__(self, row: BadRow):
        self.row = row


class _Records:
    """CSV records one at a time, each with the lines it took. One `csv.reader` reads on from
    record to record (it takes no line before it needs it), and a new one starts after an
    error. Strict quoting: a quote never closed, or text after a closing quote, is an error
    rather than a field that swallows the lines after it."""

    def __init__(self, lines: _Pushback, row_bytes: int):
        self.lines = lines
        self.row_bytes = row_bytes
        self.taken: list = []  # (line, text) of the record being read
        self.size = 0
        self.reader = None

    def _feed(self) -> Iterator[str]:
        for item in self.lines:
            self.taken.append(item)
            text = item[1]
            if isinstance(text, BadRow):
                raise _Broken(text)
            self.size += len(text) if text.isascii() else len(text.encode())
            if self.size > self.row_bytes:
                raise _Broken(too_large(self.row_bytes))
            yield text

    def next(self) -> tuple[int, list[str] | BadRow, list] | None:
        """(first line, fields or BadRow, the lines after the first that it took); None at
        the end of the file."""
        self.taken, self.size = [], 0
        if self.reader is None:
            self.reader = csv.reader(self._feed(), strict=True)
        try:
            fields: list[str] | BadRow = next(self.reader)
        except StopIteration:
            return None
        except (_Broken, csv.Error) as exc:
            self.reader = None
            fields = self._bad(exc)
        return self.taken[0][0], fields, self.taken[1:]

    def _bad(self, exc: _Broken | csv.Error) -> BadRow:
        if isinstance(exc, _Broken):
            if len(self.taken) == 1:
                return exc.row
            # what broke is a later line of a quoted field begun on the record's first line
            why = f"a quoted field opened here runs into line {self.taken[-1][0]}: {exc.row}"
            return BadRow("bad CSV", f"bad CSV: {why}")
        if str(exc) == "unexpected end of data":
            return BadRow("bad CSV", "bad CSV: a quoted field opened here is never closed")
        return BadRow("bad CSV", f"bad CSV: {exc}")


def csv_rows(path: Path, row_bytes: int) -> Iterator[tuple[int, Any]]:
    """CSV rows with a header, each a mapping of the header's names to its fields. A bad record
    (a line not UTF-8 or too long, a quote error, more or fewer fields than the header) is a
    BadRow at the line where it began; reading goes on from the line after that one, so a
    stray quote costs its own row only."""
    csv.field_size_limit(row_bytes + 1)  # a field may be as long as a row
    lines = _Pushback(_lines(path, row_bytes))
    records = _Records(lines, row_bytes)
    header: list[str] | None = None
    while (record := records.next()) is not None:
        line, fields, rest = record
        if fields == []:  # a blank line
            continue
        if not isinstance(fields, BadRow) and header is not None and len(fields) != len(header):
            fields = BadRow(
                "wrong field count", f"{len(fields)} fields where the header has {len(header)}"
            )
        if isinstance(fields, BadRow):
            if header is None:
                raise InputFileError(str(path), f"the header: {fields}", line=line)
            lines.give_back(rest)
            yield line, fields
        elif header is None:
            header = fields
        else:
            yield line, dict(zip(header, fields, strict=True))


def _first_byte(path: Path) -> bytes:
    """The file's first byte other than whitespace (b"" for none), without reading it all."""
    with path.open("rb") as fh:
        while block := fh.read(_BLOCK):
            if block := block.lstrip():
                return block[:1]
    return b""


def file_rows(path: Path, row_bytes: int, row_depth: int) -> Iterator[tuple[int, Any]]:
    """(line, row or BadRow) of a .jsonl, .json (lines or one array), .csv or .parquet file,
    each checked against the limits; parquet and JSON-array rows are numbered from 1 (they
    have no lines of their own)."""
    suffix = path.suffix.lower()
    if suffix == ".json" and _first_byte(path) == b"[":
        yield from checked(json_array_rows(path, row_depth), row_bytes, row_depth)
    elif suffix in (".jsonl", ".json"):
        yield from jsonl_rows(path, row_bytes, row_depth)
    elif suffix == ".csv":
        yield from csv_rows(path, row_bytes)
    elif suffix == ".parquet":
        from datasets import Dataset

        try:
            ds = Dataset.from_parquet(str(path))
        except Exception as exc:  # pyarrow raises many types for a corrupt file
            raise InputFileError(str(path), f"cannot read parquet: {exc}") from None
        yield from checked(enumerate(ds, start=1), row_bytes, row_depth)
    else:
        raise InputFileError(
            str(path),
            "unsupported prompt file type (use jsonl, json, csv, parquet or a save_to_disk folder)",
        )
