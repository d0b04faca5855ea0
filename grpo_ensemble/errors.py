"""Domain errors. The library raises these; only the CLI turns them into messages and exit codes.

A `UserError` is something the user can fix (a recipe field, an input file, a plugin name):
the CLI prints its one-line message and exits with code 2. Any other `GrpoEnsembleError` is a
run that failed (exit code 1).
"""

from __future__ import annotations


class GrpoEnsembleError(Exception):
    """Base class of every error this package raises on purpose."""


class UserError(GrpoEnsembleError):
    """Bad invocation, recipe or input file: exit code 2, one line, no traceback."""


class RecipeError(UserError):
    """A recipe field is wrong. `field` is the dotted path, e.g. `train.steps`."""

    def __init__(self, field: str, message: str, source: str | None = None):
        self.field = field
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}: {message}")


class InputFileError(UserError):
    """A prompt or config file cannot be read or has a bad row."""

    def __init__(self, path: str, message: str, line: int | None = None):
        self.path = path
        self.line = line
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")


class PluginError(GrpoEnsembleError):
    """A plugin misbehaved (raised, returned the wrong length, NaN). Names the plugin."""

    def __init__(self, plugin: str, message: str):
        self.plugin = plugin
        super().__init__(f"plugin {plugin!r}: {message}")


class RunError(GrpoEnsembleError):
    """A run failed for a reason other than its input (exit code 1)."""


class Interrupted(GrpoEnsembleError):
    """The run stopped on SIGINT/SIGTERM; exits 128 + signal. `resumable`: it wrote a
    checkpoint to continue from (a stop during an evaluation has none to write)."""

    def __init__(self, message: str, exit_code: int = 130, resumable: bool = True):
        self.exit_code = exit_code
        self.resumable = resumable
        super().__init__(message)


class AlertStopped(Interrupted):
    """An alert rule whose action is `stop` fired: the run saved a checkpoint and stopped.
    Exit code 3."""

    EXIT_CODE = 3

    def __init__(self, message: str):
        super().__init__(message, exit_code=self.EXIT_CODE, resumable=True)
