"""Prompt sources: .jsonl/.json/.csv/.parquet files, folders written by `datasets`'
`save_to_disk`, built-in tasks (`builtin:TASK/SPLIT`), and from Python a `datasets.Dataset` or
a list of dicts.

Every bad row is reported with its file and line (files are read in `rows`, within the
limits `Cleaning` sets: a row's bytes and nesting). The step sampler walks seeded, shuffled
epochs so that a run sees every prompt once before it sees any twice.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputFileError, RecipeError
from ..types import Prompt
from .rows import ROW_BYTES, ROW_DEPTH, BadRow, checked, file_rows

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


def _folder_rows(path: Path, split: str | None, field: str) -> Iterator[tuple[int, dict]]:
    """The rows of a folder written by `Dataset.save_to_disk` (or a `DatasetDict`'s, whose
    `split` the recipe names), numbered from 1."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise RecipeError(
            field, f"{str(path)!r} is a directory but not one written by save_to_disk"
        ) from None
    except Exception as exc:  # a damaged folder: arrow raises many types
        raise InputFileError(str(path), f"cannot read the saved dataset: {exc}") from None
    yield from _split_rows(ds, split, field, str(path))


def _split_rows(ds, split: str | None, field: str, source: str) -> Iterator[tuple[int, dict]]:
    """The rows of a Dataset, or of the `split` of a DatasetDict (named by the recipe)."""
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        splits = ", ".join(sorted(ds))
        if split is None or split not in ds:
            what = "name one" if split is None else f"it has no split {split!r}"
            raise RecipeError(f"{field}_split", f"{source!r} holds the splits {splits}: {what}")
        ds = ds[split]
    yield from _object_rows(ds, source)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def _hub_rows(source: str, config: str | None, split: str | None, field: str) -> list:
    """The rows of a data set on the Hugging Face hub (`datasets.load_dataset`); without a
    network (or with HF_DATASETS_OFFLINE=1) a recipe error before anything trains."""
    import datasets

    try:
        ds = datasets.load_dataset(source, config, split=split)
    except (ConnectionError, OSError) as exc:
        why = " ".join(str(exc).split())[:200]
        raise RecipeError(
            field,
            f"{source!r} is no local file or folder, and the hub cannot be reached for it "
            f"({why}); download it where the network allows (save_to_disk) and give that folder",
        ) from None
    except ValueError as exc:  # an unknown config or split
        raise RecipeError(
            field, f"data set {source!r}: {' '.join(str(exc).split())[:300]}"
        ) from None
    return list(_split_rows(ds, split, field, source))


def _object_rows(rows: Iterable, source: str) -> Iterator[tuple[int, dict | BadRow]]:
    """The rows of a `datasets.Dataset` or an iterable of mappings, numbered from 1."""
    for i, row in enumerate(rows, start=1):
        yield i, dict(row) if isinstance(row, Mapping) else BadRow("malformed", "not a mapping")


def _renamed(row: dict | BadRow, rename: Mapping[str, str]) -> dict | BadRow:
    """The row with its columns renamed (`data.rename`: column → field)."""
    if not rename or isinstance(row, BadRow):
        return row
    return {rename.get(k, k): v for k, v in row.items()}


@dataclass(frozen=True)
class Cleaning:
    """How rows are checked and cleaned (the recipe's `data` section)."""

    on_bad_row: str = "fail"  # fail | skip
    required_fields: tuple[str, ...] = ()
    normalize: str = "none"  # none | NFC | NFKC
    strip_control: bool = False
    dedupe: bool = False
    rename: tuple[tuple[str, str], ...] = ()  # (column, field): read the column as the field
    # a prompt too long for the context: None (a bad row), skip, truncate_left or fail
    on_long_prompt: str | None = None
    system_prompt: str | None = None  # a system message before each conversation without one
    row_bytes: int = ROW_BYTES  # a longer row is a bad row (the recipe's limits.row_bytes)
    row_depth: int = ROW_DEPTH  # a row nested deeper is a bad row (limits.row_depth)


@dataclass
class DataReport:
    """What loading did to a source: rows kept, skipped by reason, duplicates dropped."""

    source: str
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason → rows
    first: dict[str, str] = field(default_factory=dict)  # reason → "file:line: message"
    duplicates: int = 0
    truncated: int = 0  # prompts cut to fit the context (data.on_long_prompt: truncate_left)

    def summary(self) -> str:
        parts = [f"{self.source}: {self.kept} prompts"]
        if self.skipped:
            reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items()))
            first = next(iter(self.first.values()))
            parts.append(
                f"skipped {sum(self.skipped.values())} bad rows ({reasons}; first: {first})"
            )
        if self.duplicates:
            parts.append(f"dropped {self.duplicates} duplicates")
        if self.truncated:
            parts.append(f"cut {self.truncated} long prompts from the left")
        return "; ".join(parts)


def clean_text(text: str, how: Cleaning) -> str:
    if how.normalize != "none":
        text = unicodedata.normalize(how.normalize, text)
    if how.strip_control:  # control characters other than newline and tab
        text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) != "Cc")
    return text


def load_prompts(
    source: str | Iterable,
    prompt_field: str,
    field: str = "data.train",
    how: Cleaning = Cleaning(),
    report: DataReport | None = None,
    split: str | None = None,
    config: str | None = None,
) -> list[Prompt]:
    """Read prompts from a file, a `save_to_disk` folder (`split`: of a DatasetDict's), a
    built-in task, or a Python object (a `datasets.Dataset` or an iterable of mappings, named
    `field` in messages). A bad row (malformed, not UTF-8 or Unicode, longer or nested deeper
    than `how`'s limits, empty prompt, missing required field) stops with its file and line,
    or with `on_bad_row: skip` is counted in `report` and left out. A source that is no local
    path but a hub id (`org/name`) is loaded with `datasets.load_dataset(source, config,
    split=split)` where a network allows."""
    if not isinstance(source, str):
        rows: list = list(checked(_object_rows(source, field), how.row_bytes, how.row_depth))
        source = field
    elif source.startswith(BUILTIN):
        rows = list(enumerate(_builtin_rows(source, field), start=1))
    else:
        rows = _path_rows(source, split, field, config, how)
    report = report if report is not None else DataReport(source)
    rename = dict(how.rename)
    prompts, seen = [], set()
    for line, row in rows:
        row = _renamed(row, rename)
        try:
            text, messages = _checked(row, prompt_field, how)
        except BadRow as bad:
            if how.on_bad_row == "fail":
                raise InputFileError(source, str(bad), line=line) from None
            report.skipped[bad.reason] += 1
            report.first.setdefault(bad.reason, f"{source}:{line}: {bad}")
            continue
        if how.dedupe:
            if text in seen:
                report.duplicates += 1
                continue
            seen.add(text)
        value = list(messages) if messages is not None else text
        fields = {**row, prompt_field: value}
        prompts.append(Prompt(text=text, fields=fields, index=line, messages=messages))
    report.kept = len(prompts)
    if not prompts:
        raise InputFileError(source, "no prompts" + (f" ({report.summary()})" if rows else ""))
    return prompts


def _path_rows(
    source: str, split: str | None, field: str, config: str | None, how: Cleaning
) -> list:
    path = Path(source).expanduser()
    limits = how.row_bytes, how.row_depth
    if not path.exists():
        local = source.lower().endswith(_FILE_SUFFIXES) or source.startswith((".", "/", "~"))
        if local or not _HUB_ID.fullmatch(source):
            raise RecipeError(field, f"prompt file {source!r} does not exist")
        return list(checked(_hub_rows(source, config, split, field), *limits))
    try:
        if path.is_dir():
            return list(checked(_folder_rows(path, split, field), *limits))
        return list(file_rows(path, *limits))
    except OSError as exc:
        raise InputFileError(source, f"cannot read: {exc.strerror or exc}") from None


def _checked(row: dict | BadRow, prompt_field: str, how: Cleaning):
    """The row's cleaned prompt: (text, None) for a string, (canonical text, messages) for a
    conversation; or BadRow."""
    if isinstance(row, BadRow):
        raise row
    text = row.get(prompt_field)
    if isinstance(text, list | tuple) or (how.system_prompt and isinstance(text, str)):
        return _conversation(row, text, prompt_field, how)
    if not isinstance(text, str) or not text.strip():
        raise BadRow("empty prompt", f"missing or empty {prompt_field!r} field")
    missing = [f for f in how.required_fields if row.get(f) in (None, "")]
    if missing:
        raise BadRow(f"no {missing[0]}", f"missing {missing[0]!r} field")
    text = clean_text(text, how)
    if not text.strip():
        raise BadRow("empty prompt", f"{prompt_field!r} is empty after cleaning")
    return text, None


def _conversation(row: dict, value, prompt_field: str, how: Cleaning):
    """A prompt given as messages (or a string made one by `data.system_prompt`), checked,
    each content cleaned, the system prompt put first where the conversation has none."""
    from ..models.chat import conversation_problem, conversation_text

    if isinstance(value, str):
        if not value.strip():
            raise BadRow("empty prompt", f"missing or empty {prompt_field!r} field")
        value = [{"role": "user", "content": value}]
    problem = conversation_problem(value)
    if problem:
        raise BadRow("bad conversation", f"{prompt_field!r}: {problem}")
    messages = [{"role": m["role"], "content": clean_text(m["content"], how)} for m in value]
    if how.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": how.system_prompt})
    missing = [f for f in how.required_fields if row.get(f) in (None, "")]
    if missing:
        raise BadRow(f"no {missing[0]}", f"missing {missing[0]!r} field")
    return conversation_text(messages), tuple(messages)


def too_long(
    prompts: list[Prompt],
    tokenizer,
    limit: int,
    how: Cleaning,
    report: DataReport,
    budget: str | None = None,
):
    """Prompts with more than `limit` tokens would not fit the model's context with
    `max_new_tokens` more: by `how.on_long_prompt`, cut from the left to fit (the end of a
    prompt is what the completion continues), left out (counted), or refused; None treats them
    as bad rows (`on_bad_row`). A conversation is cut by whole turns: its oldest messages after
    the system messages go first, so that it starts again at a user message; one whose system
    messages and last message alone do not fit is left out. `budget` names the field that sets
    the completion's length, for the message."""
    from ..models.chat import prompt_token_ids

    out = []
    policy = how.on_long_prompt or ("fail" if how.on_bad_row == "fail" else "skip")
    for p in prompts:
        n = len(prompt_token_ids(p, tokenizer))  # as the policy is given it
        if n <= limit:
            out.append(p)
            continue
        if policy == "truncate_left":
            cut = (
                _cut_left(p, tokenizer, limit)
                if p.messages is None
                else _drop_turns(p, tokenizer, limit)
            )
            if cut is not None:
                out.append(cut)
                report.truncated += 1
                continue
        message = (
            f"prompt has {n} tokens; the model's context leaves room for {limit} beside the "
            f"longest completion ({budget or 'sampling.max_new_tokens'})"
        )
        if policy == "fail":
            raise InputFileError(report.source, message, line=p.index)
        if policy == "truncate_left":
            message += "; its system messages and last turn alone do not fit: left out"
        report.skipped["too long"] += 1
        report.first.setdefault("too long", f"{report.source}:{p.index}: {message}")
    report.kept = len(out)
    if not out:
        raise InputFileError(report.source, f"no prompts ({report.summary()})")
    return out


def _cut_left(p: Prompt, tokenizer, limit: int) -> Prompt:
    """The prompt's last tokens that fit `limit` (special tokens such as BOS included) as
    text. Decoding and encoding again may merge tokens differently: cut until it fits."""
    special = len(tokenizer("", verbose=False)["input_ids"])  # what encoding adds (BOS, …)
    ids = tokenizer(p.text, add_special_tokens=False, verbose=False)["input_ids"]
    keep = max(limit - special, 0)
    while True:
        text = tokenizer.decode(ids[len(ids) - keep :] if keep else [], skip_special_tokens=True)
        if keep == 0 or len(tokenizer(text, verbose=False)["input_ids"]) <= limit:
            break
        keep -= 1
    fields = dict(p.fields)
    for key, value in p.fields.items():  # the prompt's own column holds the cut text too
        if value == p.text:
            fields[key] = text
    return Prompt(text=text, fields=fields, index=p.index)


def _drop_turns(p: Prompt, tokenizer, limit: int) -> Prompt | None:
    """The conversation without its oldest turns, as few dropped as make it fit `limit`
    tokens as the policy renders it: the system messages stay, and what is kept starts at a
    user message (chat templates expect it). None: not even the last message fits."""
    from ..models.chat import conversation_text, prompt_token_ids

    messages = list(p.messages or ())
    first = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    for start in range(first + 1, len(messages)):
        if messages[start]["role"] != "user":
            continue
        # the system messages of the dropped part stay, those later stay where they are
        dropped_system = [m for m in messages[:start] if m["role"] == "system"]
        kept = (*dropped_system, *messages[start:])
        cut = Prompt(conversation_text(kept), p.fields, p.index, kept)
        if len(prompt_token_ids(cut, tokenizer)) <= limit:
            fields = dict(p.fields)
            for key, value in p.fields.items():  # the prompt's own column holds the messages
                if isinstance(value, list | tuple) and [dict(m) for m in value] == messages:
                    fields[key] = [dict(m) for m in kept]
            return Prompt(cut.text, fields, p.index, kept)
    return None


def _plain(value: Any) -> Any:
    """A field value JSON cannot write, as something that is the same in every process that
    reads the same data (numpy and pandas values as lists, bytes as their hash; an object whose
    text holds a memory address, such as an image, by its type alone)."""
    if isinstance(value, bytes | bytearray):
        return hashlib.sha256(value).hexdigest()
    if hasattr(value, "tolist"):
        return value.tolist()
    text = str(value)
    return type(value).__qualname__ if " at 0x" in text else text


class PromptSampler:
    """Draws `k` prompts per step from seeded, shuffled epochs; its position can be saved."""

    def __init__(self, prompts: list[Prompt], seed: int, shuffle: bool = True):
        self.prompts = prompts
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.pos = 0
        self._order = self._make_order()
        # now, before any step: a scorer that writes into a prompt's fields (`Sample.row`)
        # must not change the fingerprint a checkpoint keeps
        self._digest: str | None = None
        self.digest()

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

    def digest(self) -> str:
        """A fingerprint of the prompts and their fields, in order (computed once)."""
        if self._digest is None:
            h = hashlib.sha256()
            for p in self.prompts:
                row = json.dumps([p.text, p.fields], sort_keys=True, default=_plain)
                h.update(row.encode("utf-8", "surrogatepass") + b"\n")
            self._digest = h.hexdigest()
        return self._digest

    def state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "pos": self.pos,
            "prompts": len(self.prompts),
            "digest": self.digest(),
        }

    def differs(self, state: dict[str, Any]) -> str | None:
        """Why a saved `state()` is not of these prompts (None when it is, or when it was saved
        without a fingerprint)."""
        if "digest" not in state or state["digest"] == self.digest():
            return None
        then, now = state.get("prompts"), len(self.prompts)
        return f"{then} prompts then, {now} now" if then != now else f"{now} prompts, not the same"

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a saved `state()`: the same prompts follow, in the same order."""
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._make_order()
