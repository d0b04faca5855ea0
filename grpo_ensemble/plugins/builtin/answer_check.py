"""`math_verify`: a completion's final answer checked against the row's with the math-verify
library (an optional extra: `pip install 'grpo-ensemble[math]'`): LaTeX or plain expressions
parsed and compared symbolically and numerically, `\\frac{1}{2}` equal to `0.5`."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from ...errors import UserError
from ...types import Sample
from ..interfaces import RewardScorer


class MathVerify(RewardScorer):
    """1.0 when the completion's answer equals the `field` answer, 0.0 when it does not (or
    none can be found), None when parsing or comparing it ran past `timeout_s` seconds (no
    score: a sample that hangs the checker says nothing about the policy).

    math-verify bounds a sample's time with SIGALRM, which only the main thread can use: in
    a scorer call run in a thread (`rewards[i].timeout_s`), only that bound on the whole call
    applies."""

    name = "math_verify"

    def __init__(self, field: str = "answer", timeout_s: int = 5):
        try:
            import math_verify
            from math_verify.errors import TimeoutException
        except ImportError:
            raise UserError(
                "math_verify needs the math-verify package: pip install 'grpo-ensemble[math]'"
            ) from None
        if not isinstance(field, str):
            raise TypeError(f"field must be the name of a prompt field, got {field!r}")
        self.field = field
        self.timeout_s = int(timeout_s)
        self._lib, self._timeout = math_verify, TimeoutException

    def score(self, samples: Sequence[Sample]) -> list[float | None]:
        main = threading.current_thread() is threading.main_thread()
        seconds = self.timeout_s if main else None
        return [self._one(s, seconds) for s in samples]

    def _one(self, s: Sample, seconds: int | None) -> float | None:
        if self.field not in s.row:
            raise UserError(f"prompt {s.prompt.index}: no {self.field!r} field for the reward")
        lib = self._lib
        try:
            gold = lib.parse(str(s.row[self.field]), parsing_timeout=seconds, raise_on_error=True)
            pred = lib.parse(s.completion, parsing_timeout=seconds, raise_on_error=True)
            return float(lib.verify(gold, pred, timeout_seconds=seconds, raise_on_error=True))
        except self._timeout:  # a BaseException: it must not pass as a scorer's fault
            return None
        except Exception:  # noqa: BLE001 — an answer the parser cannot read is not the answer
            return 0.0
