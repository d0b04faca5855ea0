"""The base of every recipe section: unknown keys, NaN and YAML's true-as-a-number refused."""

from __future__ import annotations

from typing import Annotated, Any, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


class _Config(BaseModel):
    # no NaN or infinity in any number: `lr: .inf` would train a model of NaNs
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_true_or_false_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML's `true` is not a number (pydantic would take `steps: true` as 1 step)."""
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and _numeric(annotation):
            raise ValueError(f"give a number, not {str(value).lower()}")
        if isinstance(value, list | tuple) and get_origin(annotation) in (tuple, list):
            for item, kind in zip(value, get_args(annotation), strict=False):
                if isinstance(item, bool) and _numeric(kind):
                    raise ValueError(f"give numbers, not {str(item).lower()}")
        return value


def _numeric(annotation: Any) -> bool:
    """Whether a field's type is a number (int or float, maybe constrained, maybe optional)."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    kinds = set(get_args(annotation) or (annotation,)) - {type(None)}
    return bool(kinds) and kinds <= {int, float}
