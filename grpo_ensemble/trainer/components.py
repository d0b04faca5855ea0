"""A registered component built from its recipe entry, its `params` checked first: against
the constructor's signature and type hints, or its own pydantic `Params` model, so that a
wrong value is a recipe error (FILE:LINE, the field) before any model loads."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Mapping

from pydantic import BaseModel, TypeAdapter, ValidationError

from ..errors import RecipeError, UserError
from ..plugins import registry as plugins


def construct(kind: str, name: str, params: Mapping, field: str, **extra) -> object:
    """Instantiate a registered component; bad parameters are a recipe error on the entry's
    `params` (e.g. `rewards.0.params`)."""
    cls = plugins.get_component(kind, name, field)
    params_field = f"{field.rsplit('.', 1)[0]}.params"
    check_params(cls, params, params_field, **extra)
    try:
        return cls(**extra, **params)
    except (TypeError, ValueError, UserError) as exc:
        raise RecipeError(params_field, f"{name!r} rejected its parameters: {exc}") from None


def check_params(cls: type, params: Mapping, field: str, **extra) -> None:
    """The parameters fit the component's constructor (checked without building it): their
    names, and their values against the constructor's type hints (pydantic's lax mode: "2"
    is an int, "two" is not), so that a wrong value is a recipe error before anything loads."""
    try:
        inspect.signature(cls).bind(**extra, **params)
    except TypeError as exc:
        raise RecipeError(field, str(exc)) from None
    except ValueError:  # no signature to inspect (e.g. a builtin): let construction tell
        return
    model = getattr(cls, "Params", None)  # a component's own pydantic model, richer checks
    if isinstance(model, type) and issubclass(model, BaseModel):
        try:
            model.model_validate(dict(params))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err.get("loc", ()))
            raise RecipeError(f"{field}.{where}" if where else field, err["msg"]) from None
        return
    hints = _init_hints(cls)
    for name, value in params.items():
        hint = hints.get(name)
        if hint is None or hint is typing.Any:
            continue
        try:
            TypeAdapter(hint).validate_python(value)
        except ValidationError as exc:
            why = exc.errors()[0].get("msg", str(exc))
            raise RecipeError(
                f"{field}.{name}", f"{value!r} does not fit {_hint_name(hint)}: {why}"
            ) from None
        except Exception:  # noqa: BLE001 — a hint pydantic cannot check: construction tells
            continue


def _init_hints(cls: type) -> dict:
    """The type hints of a component's constructor; none where they cannot be resolved."""
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 — forward references of a plugin's own: not checked
        return {}


def _hint_name(hint) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
