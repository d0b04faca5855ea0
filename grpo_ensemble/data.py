"""Prompt sources: .jsonl/.json/.csv/.parquet files and built-in tasks (`builtin:TASK/SPLIT`).

Every bad row is reported with its file and line. The step sampler walks seeded, shuffled
epochs so that a run sees every prompt once before it sees any twice.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import InputFileError, RecipeError
from .types import Prompt

BUILTIN = "builtin:"


def _builtin_rows(source: str, field: str) -> list[dict[str, Any]]:
    from .tasks import TASKS

    task, _, split = source.removeprefix(BUILTIN).partition("/")
    if task not in TASKS:
        known = ", ".join(f"{BUILTIN}{t}/train" for t in sorted(TASKS))
        raise RecipeError(field, f"unknown built-in task {source!r} (known: {known})")
    try:
        return TASKS[task](split or "train")
    except ValueError as exc:
        raise RecipeError(field, str(exc)) from None


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputFileError(str(path), "not valid UTF-8", line=line_no) from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InputFileError(str(path), f"invalid JSON: {exc.msg}", line=line_no) from None
            if not isinstance(row, dict):
                raise InputFileError(str(path), "expected a JSON object", line=line_no)
            yield line_no, row


def _json_array_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """A .json file holding one array of objects; rows are numbered from 1."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputFileError(str(path), "not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise InputFileError(str(path), f"invalid JSON: {exc.msg}", line=exc.lineno) from None
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise InputFileError(str(path), f"item {i} is not a JSON object")
        yield i, row


def _file_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix == ".json" and path.read_bytes().lstrip()[:1] == b"[":
        yield from _json_array_rows(path)
    elif suffix in (".jsonl", ".json"):
        yield from _jsonl_rows(path)
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            try:
                for row in reader:
                    yield reader.line_num, row
            except UnicodeDecodeError:
                raise InputFileError(str(path), "not valid UTF-8", reader.line_num + 1) from None
            except csv.Error as exc:
                raise InputFileError(str(path), f"bad CSV: {exc}", line=reader.line_num) from None
    elif suffix == ".parquet":
        from datasets import Dataset

        try:
            ds = Dataset.from_parquet(str(path))
        except Exception as exc:  # pyarrow raises many types for a corrupt file
            raise InputFileError(str(path), f"cannot read parquet: {exc}") from None
        for i, row in enumerate(ds, start=1):  # row number (parquet has no lines)
            yield i, dict(row)
    else:
        raise InputFileError(str(path), "unsupported prompt file type (use jsonl, csv or parquet)")


def load_prompts(source: str, prompt_field: str, field: str = "data.train") -> list[Prompt]:
    """Read prompts from a file or built-in task; each row must have a non-empty prompt."""
    if source.startswith(BUILTIN):
        rows = list(enumerate(_builtin_rows(source, field), start=1))
        where = source
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise RecipeError(field, f"prompt file {source!r} does not exist")
        try:
            rows = list(_file_rows(path))
        except OSError as exc:
            raise InputFileError(source, f"cannot read: {exc.strerror or exc}") from None
        where = source
    prompts = []
    for line, row in rows:
        text = row.get(prompt_field)
        if not isinstance(text, str) or not text.strip():
            raise InputFileError(where, f"missing or empty {prompt_field!r} field", line=line)
        prompts.append(Prompt(text=text, fields=row, index=line))
    if not prompts:
        raise InputFileError(where, "no prompts")
    return prompts


class PromptSampler:
    """Draws `k` prompts per step from seeded, shuffled epochs; its position can be saved."""

    def __init__(self, prompts: list[Prompt], seed: int, shuffle: bool = True):
        self.prompts = prompts
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.pos = 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(len(self.prompts)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def next(self, k: int) -> list[Prompt]:
        out = []
        while len(out) < k:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._make_order()
            out.append(self.prompts[self._order[self.pos]])
            self.pos += 1
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}
