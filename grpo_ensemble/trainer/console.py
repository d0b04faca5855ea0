"""The lines a run prints on the console (rank 0's): one line each, never wrapped."""

from __future__ import annotations

from .evaluation import EvalResult


def say_eval(console, when: str, res: EvalResult | None) -> None:
    if res is not None:
        say_row(console, f"{when} training", res.row(0, when))


def say_row(console, when: str, row: dict) -> None:
    """An evaluation's line: accuracy with its interval, and pass@k where measured."""
    passed = "".join(f", {k} {100 * v:.1f}%" for k, v in row.items() if k.startswith("pass@"))
    say(
        console,
        f"held-out accuracy {when}: {100 * row['accuracy']:.1f}% "
        f"(±{100 * row['ci95']:.1f}, n={row['n']}{passed})",
    )


def say_summary(console, summary: dict) -> None:
    """The run's closing lines: steps and time, accuracy before → after, alerts, where the
    run directory is and the report command."""
    seconds = summary["seconds"]
    took = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
    say(console, f"summary: {summary['steps']} steps in {took}")
    before, after = summary["before"], summary["after"]
    if before and after:
        change = 100 * summary["change"]
        say(
            console,
            f"  held-out accuracy {100 * before['accuracy']:.1f}% → {100 * after['accuracy']:.1f}% "
            f"({change:+.1f} points)",
        )
    rules = ", ".join(f"{k} ×{v}" for k, v in summary["alerts_by_rule"].items())
    say(console, f"  alerts: {summary['alerts']}" + (f" ({rules})" if rules else ""))
    say(console, f"  run directory: {summary['run_dir']}; report: {summary['report']}")


def say(console, text: str) -> None:
    """One line on the console, never wrapped (a log read by a machine keeps it whole)."""
    if console is not None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)
