"""Reading a recipe: YAML (safe, duplicate keys refused, its size with aliases expanded
bounded), `--set key.path=value` overrides, and validation into a `Recipe` whose every problem
is a `RecipeError` naming the field and, where it came from the file, the line.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import InputFileError, RecipeError
from .schema import RECIPE_NODES, Recipe

NODES_SETTING = "limits.recipe_nodes"
_NUMBERS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")  # as validation takes 1e6


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


def apply_overrides(data: dict, overrides: list[str], nodes: int = RECIPE_NODES) -> list[str]:
    """Apply `--set key.path=value` overrides (values parsed as YAML, each holding at most
    `nodes` values with its aliases expanded); returns the keys set."""
    keys = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(item, "expected key.path=value", source="--set")
        _set_path(data, key.strip(), _override_value(key.strip(), raw, nodes))
        keys.append(key.strip())
    return keys


def _override_value(key: str, raw: str, nodes: int) -> Any:
    """An override's value read as YAML (text that is not YAML stays text)."""
    if not raw.strip():
        return ""
    loader = _SizedSafe(raw)
    try:
        root = loader.get_single_node()
        if loader.expanded > nodes:
            raise RecipeError(key, _too_many(nodes), source="--set")
        return loader.construct_document(root) if root is not None else None
    except yaml.YAMLError:
        return raw
    except RecursionError:
        raise RecipeError(key, "nested too deeply to read", source="--set") from None
    finally:
        loader.dispose()


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


class _Sized:
    """A loader that, while composing, counts the values each node would hold with its
    aliases expanded (`expanded`: the whole document's), without expanding them: a node's
    count is kept, so an alias adds it at once. A few lines of anchors and aliases can stand
    for billions of values, which constructing keeps shared but anything that copies the
    recipe (validation, writing the resolved recipe) would expand; counting first lets them
    be refused before that."""

    def __init__(self, stream):
        super().__init__(stream)
        self.expanded = 0
        self._sizes: dict[int, int] = {}  # id(node) → values it holds, aliases expanded
        self.aliases: list[tuple[int, int]] = []  # (values so far, 1-based line) of each alias

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            node = super().compose_node(parent, index)
            if id(node) not in self._sizes:  # its anchor's node is still being composed
                raise yaml.composer.ComposerError(
                    None, None, "an alias inside the value it names (a loop)", mark
                )
            self.expanded += self._sizes[id(node)]
            self.aliases.append((self.expanded, mark.line + 1))
            return node
        before = self.expanded
        self.expanded += 1
        node = super().compose_node(parent, index)
        self._sizes[id(node)] = self.expanded - before
        return node

    def line_past(self, nodes: int) -> int | None:
        """The line of the alias that takes the document past `nodes` values, if one does."""
        return next((line for total, line in self.aliases if total > nodes), None)


class _SizedUniqueKeys(_Sized, _UniqueKeys):
    pass


class _SizedSafe(_Sized, yaml.SafeLoader):
    pass


def _too_many(nodes: int, setting: str | None = NODES_SETTING) -> str:
    raise_it = f"; raise {setting} if this is meant" if setting else ""
    return f"holds more than {nodes} values once its aliases (*name) are expanded{raise_it}"


@contextmanager
def _yaml_problems(path: Path) -> Iterator[None]:
    """A YAML problem as an `InputFileError` on one line, with the line where known."""
    try:
        yield
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise InputFileError(str(path), f"invalid YAML: {problem}", line=line) from None
    except RecursionError:  # the composer and constructor recurse once per level
        raise InputFileError(str(path), "invalid YAML: nested too deeply to read") from None


def _yaml_text(path: Path, what: str) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputFileError(str(path), f"cannot read {what}: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise InputFileError(str(path), f"cannot read {what}: not UTF-8 text", line=line) from None


def read_yaml(
    path: str | Path,
    what: str,
    nodes: int | Callable[[yaml.Node | None], int] = RECIPE_NODES,
    setting: str | None = None,
) -> tuple[Any, yaml.Node | None]:
    """(data, root node) of a YAML (or JSON) file, read with a safe loader that refuses a key
    given twice and a file of more than `nodes` values with its aliases expanded (`nodes` may
    be a function of the composed root, for a limit the file itself sets; `setting` names it
    in the message); any problem is an `InputFileError` on one line, with the line where
    known."""
    path = Path(path)
    loader = _SizedUniqueKeys(_yaml_text(path, what))
    try:
        with _yaml_problems(path):
            root = loader.get_single_node()
        limit = nodes(root) if callable(nodes) else nodes
        if loader.expanded > limit:
            line = loader.line_past(limit)
            raise InputFileError(str(path), _too_many(limit, setting), line=line)
        with _yaml_problems(path):
            data = loader.construct_document(root) if root is not None else None
    finally:
        loader.dispose()
    return data, root


def _nodes_limit(root: yaml.Node | None, overrides: Sequence[str]) -> int:
    """`limits.recipe_nodes`, read before the recipe is constructed: from the last `--set`
    that gives it, else from the file's `limits:` section; a value that is not a whole number
    of at least 1 leaves the default (validation then reports it)."""
    node = _child(_child(root, "limits"), "recipe_nodes")
    for item in overrides:
        key, _, raw = (part.strip() for part in item.partition("="))
        if key in ("limits", NODES_SETTING):
            try:
                given = yaml.compose(raw, Loader=yaml.SafeLoader)
            except (yaml.YAMLError, RecursionError):  # left to apply_overrides to report
                continue
            node = _child(given, "recipe_nodes") if key == "limits" else given
    if not isinstance(node, yaml.ScalarNode) or node.tag not in _NUMBERS:
        return RECIPE_NODES
    value = yaml.constructor.SafeConstructor().construct_object(node)
    return int(value) if value >= 1 and float(value).is_integer() else RECIPE_NODES


def _child(node: yaml.Node | None, key: str) -> yaml.Node | None:
    """The value under `key` of a mapping node (None where there is none)."""
    if not isinstance(node, yaml.MappingNode):
        return None
    return next((v for k, v in node.value if k.value == key), None)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file."""
    path = Path(path)
    overrides = overrides or []
    limit = functools.partial(_nodes_limit, overrides=overrides)
    data, root = read_yaml(path, "recipe", limit, setting=NODES_SETTING)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputFileError(str(path), "a recipe must be a YAML mapping", line=1)
    keys = apply_overrides(data, overrides, limit(root))
    return recipe_from_dict(data, source=str(path), root=root, overridden=keys)


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (every default written out)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
