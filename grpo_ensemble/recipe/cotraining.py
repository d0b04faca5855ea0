"""Co-training recipes: `policies: [...]` in place of `policy`.

Each policy trains as if under a recipe of its own (`policy_recipes`): its entry is the
`policy`, the other policies come first among its peers (with their `n` and `mode`), then the
recipe's frozen peers; its `train` and `loss` entries override the recipe's sections. Every
check a single-policy recipe gets runs on each of these, and an error names the co-training
recipe's own field (`policies.1.lora.r`, not `policy.lora.r`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..errors import RecipeError
from ..types import POLICY, POLICY_BASE

# what a policy's `train` entry may set: its optimizer's own settings
OPTIMIZER_KEYS = (
    "lr",
    "weight_decay",
    "adam_betas",
    "adam_eps",
    "warmup_steps",
    "schedule",
    "max_grad_norm",
)
# a policy's fields that are not those of the `policy` section
OWN_KEYS = ("name", "mode", "train", "loss")
# a policy's fields its peer entry in another policy's recipe takes
PEER_KEYS = (
    "name",
    "model",
    "generator",
    "params",
    "n",
    "sampling",
    "trust_remote_code",
    "chat_template",
    "mode",
)
POLICIES_DIR = "policies"


def check_policies(recipe) -> None:
    """The co-training fields' own checks, then every policy's recipe validated (raises
    ValueError "field: why", the field the co-training recipe's own)."""
    if recipe.policy is not None:
        raise ValueError("policy: give `policy` (one) or `policies` (several), not both")
    names = [p.name for p in recipe.policies]
    peers = {p.name for p in recipe.peers}
    for i, p in enumerate(recipe.policies):
        if p.name == POLICY or names.index(p.name) != i:
            raise ValueError(
                f"policies.{i}.name: {p.name!r} is taken; give each policy its own name"
            )
        if p.name in peers:
            raise ValueError(
                f"policies.{i}.name: {p.name!r} is also a peer; a policy is every other "
                "policy's peer already: drop it from peers (or rename the frozen copy)"
            )
        for key in p.train:
            if key not in OPTIMIZER_KEYS:
                raise ValueError(
                    f"policies.{i}.train.{key}: a policy's own train settings are its "
                    f"optimizer's ({', '.join(OPTIMIZER_KEYS)}); set the rest in train"
                )
    if recipe.placement == "split" and recipe.train.zero_stage == 3:
        raise ValueError(
            "placement: split gives each policy's engine its own ranks, which ZeRO-3's "
            "world-wide checks do not allow: use zero_stage 0, 1 or 2, or placement: shared"
        )
    if recipe.eval.keep_best:
        raise ValueError("eval.keep_best: not with policies (each policy's evaluations are kept)")
    data = recipe.model_dump(mode="json")
    for i in range(len(recipe.policies)):
        _validated(type(recipe), data, i)


def policy_data(data: dict, i: int) -> dict:
    """The recipe (as plain data) under which policy i trains."""
    policies = data["policies"]
    own = policies[i]
    others = [
        {k: v for k, v in q.items() if k in PEER_KEYS} for j, q in enumerate(policies) if j != i
    ]
    frozen = [dict(p) for p in data["peers"]]
    for p in frozen:  # the frozen peer of `policy_base` samples from this policy's model
        if p.get("model") == POLICY_BASE:
            p["model"] = own["model"]
    out = Path(data["output_dir"]) / POLICIES_DIR / own["name"]
    return {
        **data,
        "policy": {k: v for k, v in own.items() if k not in OWN_KEYS},
        "policies": None,
        "placement": "shared",
        "peers": others + frozen,
        "train": {**data["train"], **own["train"]},
        "loss": {**data["loss"], **own["loss"]},
        "output_dir": str(out),
    }


def policy_recipes(recipe) -> list[tuple[str, Any]]:
    """(name, Recipe) of each policy, in the recipe's order."""
    data = recipe.model_dump(mode="json")
    return [(p.name, _validated(type(recipe), data, i)) for i, p in enumerate(recipe.policies)]


def _validated(kind, data: dict, i: int):
    """Policy i's recipe, a `kind` (the Recipe class)."""
    derived = policy_data(data, i)
    try:
        return kind.model_validate(derived)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(k) for k in err["loc"]]
        msg = err["msg"].removeprefix("Value error, ")
        head, sep, tail = msg.partition(": ")
        if sep and all(part.replace("_", "").isalnum() for part in head.split(".")):
            loc, msg = loc + head.split("."), tail
        raise ValueError(f"{_field(data, i, loc)}: {msg}") from None


@contextlib.contextmanager
def renamed(recipe, i: int):
    """A `RecipeError` raised inside the block about policy i's recipe names the co-training
    recipe's own field (checks that load models and data run on each policy's recipe)."""
    try:
        yield
    except RecipeError as err:
        message = str(err).split(f"{err.field}: ", 1)[-1]
        field = _field(recipe.model_dump(mode="json"), i, err.field.split("."))
        raise RecipeError(field, message, source=err.source) from None


def field_of(recipe, i: int, dotted: str) -> str:
    """The co-training recipe's field for the field `dotted` of policy i's recipe."""
    return _field(recipe.model_dump(mode="json"), i, dotted.split("."))


def _field(data: dict, i: int, loc: list[str]) -> str:
    """The co-training recipe's field for a field `loc` of policy i's recipe."""
    own = data["policies"][i]
    n_others = len(data["policies"]) - 1
    if loc[:1] == ["policy"]:
        return ".".join([f"policies.{i}", *loc[1:]])
    if loc[:1] == ["peers"] and len(loc) > 1 and loc[1].isdigit():
        j = int(loc[1])
        if j < n_others:  # another policy, as this one's peer
            other = j if j < i else j + 1
            return ".".join([f"policies.{other}", *loc[2:]])
        return ".".join(["peers", str(j - n_others), *loc[2:]])
    if loc[:1] in (["train"], ["loss"]) and len(loc) > 1 and loc[1] in own[loc[0]]:
        return ".".join([f"policies.{i}", *loc])
    return ".".join(loc)
