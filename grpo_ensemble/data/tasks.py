"""Built-in synthetic tasks with verifiable answers, so tests and the quickstart need no data set.

A task is a function `split -> rows`, each row `{"prompt": str, "answer": str}`; the reward
compares a completion with `answer`. `TASKS` maps task names to these functions.
"""

from __future__ import annotations

import random
from collections.abc import Callable

_SEED = 1234  # fixed, so every process and every run sees the same rows
_MAX_OPERAND = 99
_SPLIT_SIZES = {"test": 300, "train": 4000}


def _shuffled_pairs() -> list[tuple[int, int]]:
    """All (a, b) operand pairs in one fixed order, from a private RNG (global RNG untouched)."""
    pairs = [(a, b) for a in range(_MAX_OPERAND + 1) for b in range(_MAX_OPERAND + 1)]
    random.Random(_SEED).shuffle(pairs)
    return pairs


def arithmetic_rows(split: str) -> list[dict[str, str]]:
    """Two-operand addition rows like `{"prompt": "37+45=", "answer": "82"}`.

    Operands are 0..99. "test" takes the first 300 pairs of one fixed shuffle and "train" the
    next 4000, so the splits never share an (a, b) pair and a reported test accuracy is honest.
    """
    if split not in _SPLIT_SIZES:
        raise ValueError(
            f"unknown split {split!r} for task 'arithmetic'; choose one of {sorted(_SPLIT_SIZES)}"
        )
    pairs = _shuffled_pairs()
    start = 0 if split == "test" else _SPLIT_SIZES["test"]
    chosen = pairs[start : start + _SPLIT_SIZES[split]]
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in chosen]


def arithmetic_chat_rows(split: str) -> list[dict]:
    """The `arithmetic` rows as conversations (TRL's conversational format): a system message
    and the sum as the user's turn, e.g. `{"prompt": [{"role": "system", ...}, {"role":
    "user", "content": "37+45="}], "answer": "82"}`."""
    system = {"role": "system", "content": "Complete the sum with its value."}
    return [
        {"prompt": [system, {"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
        for r in arithmetic_rows(split)
    ]


TASKS: dict[str, Callable[[str], list[dict]]] = {
    "arithmetic": arithmetic_rows,
    "arithmetic-chat": arithmetic_chat_rows,
}
