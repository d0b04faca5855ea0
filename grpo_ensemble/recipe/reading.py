"""Reading a recipe: YAML (safe, duplicate keys refused), `--set key.path=value` overrides,
and validation into a `Recipe` whose every problem is a `RecipeError` naming the field and,
where it came from the file, the line.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import InputFileError, RecipeError
from .schema import Recipe


def _line_of(node: yaml.Node | None, loc: tuple) -> int | None:
    """1-based line of the deepest YAML node along the pydantic error location `loc`."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == str(key)), None)
            if node is None:
                break
            line = node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _set_path(data: dict, dotted: str, value: Any) -> None:
    """Set `a.b.0.c` in nested dicts/lists, creating dicts on the way."""
    keys = dotted.split(".")
    cur: Any = data
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(cur, list):
            if not key.isdigit() or int(key) >= len(cur):
                raise RecipeError(dotted, f"no list item {key!r}", source="--set")
            key = int(key)
        elif not isinstance(cur, dict):
            raise RecipeError(dotted, f"{'.'.join(keys[:i])} is not a mapping", source="--set")
        if last:
            cur[key] = value
        else:
            if isinstance(cur, dict) and not isinstance(cur.get(key), dict | list):
                cur[key] = {}
            cur = cur[key]


def apply_overrides(data: dict, overrides: list[str]) -> list[str]:
    """Apply `--set key.path=value` overrides (values parsed as YAML); returns the keys set."""
    keys = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(item, "expected key.path=value", source="--set")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_path(data, key.strip(), value)
        keys.append(key.strip())
    return keys


def _format_loc(loc: tuple) -> str:
    return ".".join(str(k) for k in loc)


def recipe_from_dict(
    data: dict,
    source: str = "recipe",
    root: yaml.Node | None = None,
    overridden: Sequence[str] = (),
) -> Recipe:
    """Validate a mapping into a Recipe; errors name the field (and line, given the YAML node).

    An error inside a field set by `--set` (listed in `overridden`) is blamed on `--set`.
    """
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        msg = err["msg"]
        if msg.startswith("Value error, "):  # a cross-field check names its own field,
            msg = msg.removeprefix("Value error, ")  # relative to its model ("a.b: why")
            head, sep, tail = msg.partition(": ")
            if sep and re.fullmatch(r"[A-Za-z_][\w.]*", head):
                loc += tuple(int(k) if k.isdigit() else k for k in head.split("."))
                msg = tail
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        field = _format_loc(loc)
        # blamed on --set where an override set the field, a part of it, or a key below it
        if any(
            field == k or field.startswith(k + ".") or k.startswith(field + ".") for k in overridden
        ):
            raise RecipeError(field, msg, source="--set") from None
        line = _line_of(root, loc) if root is not None else None
        where = f"{source}:{line}" if line is not None else source
        raise RecipeError(field, msg, source=where) from None


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (the
    safe loader keeps the last silently: a second `train:` section would drop the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool):
                continue  # not hashable as such: the schema rejects it anyway
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path, what: str) -> tuple[Any, yaml.Node | None]:
    """(data, root node) of a YAML (or JSON) file, read with a safe loader that refuses a key
    given twice; any problem is an `InputFileError` on one line, with the line where known."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputFileError(str(path), f"cannot read {what}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise InputFileError(str(path), f"cannot read {what}: not UTF-8 text", line=line) from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.load(text, Loader=_UniqueKeys)  # noqa: S506 — a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise InputFileError(str(path), f"invalid YAML: {problem}", line=line) from None
    return data, root


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file."""
    path = Path(path)
    data, root = read_yaml(path, "recipe")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputFileError(str(path), "a recipe must be a YAML mapping", line=1)
    keys = apply_overrides(data, overrides or [])
    return recipe_from_dict(data, source=str(path), root=root, overridden=keys)


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (every default written out)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
