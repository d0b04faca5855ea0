"""Input limits end to end: a YAML alias bomb is refused before the recipe is built, and bad
rows (too large, too deep, not valid Unicode, a CSV record that does not fit its header) stop
`validate` and `train` alike with exit 2 naming the file and line."""

import json
import textwrap

import pytest

from grpo_ensemble.cli import main
from grpo_ensemble.data.rows import ROW_BYTES
from grpo_ensemble.errors import InputFileError, RecipeError
from grpo_ensemble.recipe import load_recipe

RECIPE = """\
output_dir: {out}
policy:
  model: builtin:tiny-arith-small
  n: 2
train:
  steps: 1
"""


def _bomb(levels: int, indent: str = "    ") -> str:
    """Billion laughs: each of `levels` lines holds ten aliases of the one before it, so the
    last expands to 10**levels values from a few hundred bytes."""
    lines = [f"{indent}l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"{indent}l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]")
    return "\n".join(lines) + "\n"


def _recipe(tmp_path, extra: str = "", name: str = "r.yaml"):
    path = tmp_path / name
    path.write_text(RECIPE.format(out=tmp_path / "run") + textwrap.dedent(extra))
    return path


def test_an_alias_bomb_is_refused_at_the_alias_before_anything_is_built(tmp_path, capsys):
    # in policy.params, l0 on line 6: l4 (line 10, 111111 values) is the first past 100000
    path = _recipe(tmp_path)
    text = path.read_text().replace("  n: 2\n", "  n: 2\n  params:\n" + _bomb(9))
    path.write_text(text)
    assert len(text) < 1000  # 10**9 values once expanded
    with pytest.raises(InputFileError) as info:
        load_recipe(path)
    message = (
        f"{path}:10: holds more than 100000 values once its aliases (*name) are expanded; "
        "raise limits.recipe_nodes if this is meant"
    )
    assert str(info.value) == message
    for command in ("validate", "train"):
        assert main([command, str(path)]) == 2
        assert capsys.readouterr().err.strip() == f"error: {message}"


def test_recipe_nodes_is_read_from_the_recipe_and_from_set(tmp_path):
    # l0..l2: 11 + 111 + 1111 values, and the rest of the recipe
    path = _recipe(tmp_path, "eval:\n  params:\n" + _bomb(3))
    assert load_recipe(path).eval.params["l2"][0][0] == ["x"] * 10  # within the default
    with pytest.raises(InputFileError, match=r":11: holds more than 1000 values"):
        load_recipe(path, ["limits.recipe_nodes=1000"])
    with pytest.raises(InputFileError, match=r":11: holds more than 1000 values"):
        load_recipe(path, ["limits={recipe_nodes: 1000}"])
    limited = _recipe(tmp_path, "limits: {recipe_nodes: 1000}\neval:\n  params:\n" + _bomb(3))
    with pytest.raises(InputFileError, match=r":12: holds more than 1000 values"):
        load_recipe(limited)
    assert load_recipe(limited, ["limits.recipe_nodes=2000"]).limits.recipe_nodes == 2000
    assert load_recipe(limited, ["limits.recipe_nodes=1.0e+4"]).limits.recipe_nodes == 10_000


def test_an_alias_inside_the_value_it_names_is_refused(tmp_path):
    path = _recipe(tmp_path, "eval:\n  params: &p {again: *p}\n")
    with pytest.raises(InputFileError) as info:
        load_recipe(path)
    assert str(info.value) == f"{path}:8: invalid YAML: an alias inside the value it names (a loop)"


def test_an_alias_bomb_given_with_set_is_blamed_on_set(tmp_path):
    value = "{" + _bomb(7, indent="").replace("\n", ", ").rstrip(", ") + "}"
    with pytest.raises(RecipeError) as info:
        load_recipe(_recipe(tmp_path), [f"eval.params={value}"])
    assert str(info.value).startswith("--set: eval.params: holds more than 100000 values")


def test_a_recipe_nested_past_the_parser_is_exit_2(tmp_path, capsys):
    path = _recipe(tmp_path, "eval:\n  params: {x: " + "[" * 5000 + "]" * 5000 + "}\n")
    assert main(["validate", str(path)]) == 2
    assert (
        capsys.readouterr().err.strip() == f"error: {path}: invalid YAML: nested too deeply to read"
    )


def test_limits_are_checked_like_every_field(tmp_path, capsys):
    path = _recipe(tmp_path)
    assert main(["validate", str(path), "--set", "limits.row_depth=0"]) == 2
    assert "limits.row_depth: Input should be greater than or equal to 1" in capsys.readouterr().err


def _bad_rows(tmp_path) -> dict:
    """name → (file, its bad line, the message), each a row past a default limit."""
    good = '{"prompt": "1+1=", "answer": "2"}\n'
    files = {
        "deep.jsonl": (
            good + "[" * 100_000 + "\n",
            2,
            "nested deeper than 100 levels (limits.row_depth)",
        ),
        "surrogate.jsonl": (
            good + '{"prompt": "a\\ud800b", "answer": "1"}\n',
            2,
            "not valid Unicode (a lone surrogate)",
        ),
        "huge.jsonl": (
            good + json.dumps({"prompt": "1" * ROW_BYTES, "answer": "1"}) + "\n" + good,
            2,
            f"longer than {ROW_BYTES} bytes (limits.row_bytes)",
        ),
        "extra.csv": (
            "prompt,answer\n1+1=,2\n2+2=,4,extra\n",
            3,
            "3 fields where the header has 2",
        ),
        "quote.csv": (
            "prompt,answer\n1+1=,2\n"
            + '2+2=,"4\n'
            + "".join(f"{i}+1=,{i + 1}\n" for i in range(40)),
            3,
            "bad CSV: a quoted field opened here is never closed",
        ),
    }
    out = {}
    for name, (content, line, message) in files.items():
        (tmp_path / name).write_text(content)
        out[name] = (tmp_path / name, line, message)
    return out


@pytest.mark.parametrize(
    "name", ["deep.jsonl", "surrogate.jsonl", "huge.jsonl", "extra.csv", "quote.csv"]
)
def test_validate_and_train_stop_at_the_same_bad_row(tmp_path, capsys, name):
    data, line, message = _bad_rows(tmp_path)[name]
    path = _recipe(tmp_path, f"data: {{train: {data}, eval: null}}\n")
    for command in ("validate", "train"):
        assert main([command, str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: {data}:{line}: {message}", err
    assert main(["validate", str(path), "--set", "data.on_bad_row=skip"]) == 0


def test_the_recipes_row_limits_reach_the_loading_code(tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text(
        '{"prompt": "1+1=", "answer": "2"}\n'
        + json.dumps({"prompt": "1" * 300, "answer": "1", "meta": [1]})
        + "\n"
    )
    path = _recipe(tmp_path, f"data: {{train: {data}, eval: null}}\n")
    assert main(["validate", str(path)]) == 0
    assert main(["validate", str(path), "--set", "limits.row_bytes=200"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {data}:2: longer than 200 bytes (limits.row_bytes)", err
    assert main(["validate", str(path), "--set", "limits.row_depth=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {data}:2: nested deeper than 1 levels (limits.row_depth)", err
