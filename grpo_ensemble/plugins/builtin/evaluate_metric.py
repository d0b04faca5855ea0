"""`evaluate_metric`: a Hugging Face `evaluate` metric as a reward, or as the held-out metric.

`evaluate.load("name")` fetches the metric's script from the hub and fails offline; a metric
given by its local path (a folder holding `NAME.py`, or the script itself) loads anywhere.
The metrics the project uses ship with it as such folders and are named by their name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...errors import UserError
from ...types import Sample
from ..interfaces import RewardScorer

SHIPPED = {"exact_match": Path(__file__).parent / "metrics" / "exact_match"}


class EvaluateMetric(RewardScorer):
    """Each sample's score is `metric` computed on that one (completion, `field` answer)
    pair, its result `key` (default: the metric's name), with `options` passed to compute."""

    name = "evaluate_metric"

    def __init__(
        self,
        metric: str = "exact_match",
        field: str = "answer",
        key: str | None = None,
        options: Mapping[str, Any] | None = None,
    ):
        import evaluate

        path = SHIPPED.get(metric) or Path(metric).expanduser()
        if not path.exists():
            shipped = ", ".join(sorted(SHIPPED))
            raise UserError(
                f"evaluate metric {metric!r}: neither a shipped metric ({shipped}) nor a local "
                "path (a folder holding NAME.py, or the script): hub metrics need a network"
            )
        try:
            self.metric = evaluate.load(str(path))
        except Exception as exc:  # a script that does not import or define a metric
            text = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            raise UserError(f"evaluate metric {metric!r} did not load: {text}") from None
        if not isinstance(field, str):
            raise TypeError(f"field must be the name of a prompt field, got {field!r}")
        self.field = field
        self.key = key or path.stem
        self.options = dict(options or {})

    def score(self, samples: Sequence[Sample]) -> list[float]:
        out = []
        for s in samples:
            if self.field not in s.row:
                raise UserError(f"prompt {s.prompt.index}: no {self.field!r} field for the reward")
            result = self.metric.compute(
                predictions=[s.completion], references=[str(s.row[self.field])], **self.options
            )
            if self.key not in result:
                raise UserError(f"evaluate metric gave {sorted(result)}, not {self.key!r}")
            out.append(float(result[self.key]))
        return out
