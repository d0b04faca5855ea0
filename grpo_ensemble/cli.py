"""The `grpo-ensemble` command. Only this module turns errors into messages and exit codes:
0 success, 1 a run that failed, 2 a bad invocation, recipe or input file.
Set GRPO_ENSEMBLE_DEBUG=1 to see the traceback of any error.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shlex
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .errors import GrpoEnsembleError, Interrupted, UserError

app = typer.Typer(
    name="grpo-ensemble",
    help="GRPO for language models with groups pooled from an ensemble of models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=False, quiet=os.environ.get("RANK", "0") != "0")  # rank 0 speaks

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe field: key.path=value (repeatable)."),
]


ResumeOpt = Annotated[
    str | None,
    typer.Option(
        "--resume",
        help="Continue a run: 'auto' (its newest checkpoint, if any) or a checkpoint directory.",
    ),
]


@app.command()
def train(recipe: RecipeArg, set_: SetOpt = None, resume: ResumeOpt = None) -> None:
    """Train the policy of a recipe; writes the run directory."""
    from . import stopping

    with stopping.handling():  # from here on a stop signal ends with its own line and code
        try:
            from .recipe import load_recipe
            from .trainer.loop import train as run_train

            r = load_recipe(recipe, set_ or [])
        except stopping.Stop as stop:
            raise Interrupted(
                f"stopped by {stop.name} during start-up; nothing was trained",
                exit_code=128 + stop.signum,
                resumable=False,
            ) from None
    console.print(f"run directory: {r.output_dir}")
    result = run_train(r, console=console, resume=resume, source=recipe)
    last = result.metrics[-1] if result.metrics else {}
    reward = f", last reward {last['reward']:.3f}" if "reward" in last else ""
    where = f"final model in {result.model_dir}"
    if result.policies:  # co-training: each policy's own figure and folder
        rewards = [
            f"{n} {p.metrics[-1]['reward']:.3f}" for n, p in result.policies.items() if p.metrics
        ]
        reward = f", last reward {', '.join(rewards)}" if rewards else ""
        where = f"final models in {result.model_dir}/<{'|'.join(result.policies)}>"
    console.print(f"done: step {r.train.steps} of {r.train.steps}{reward}; {where}", soft_wrap=True)


@app.command()
def validate(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Check a recipe (schema, plugins, models, prompt files) without training."""
    from .recipe import load_recipe
    from .trainer.build import check_recipe

    r = load_recipe(recipe, set_ or [])

    def note(line: str) -> None:
        console.print(f"{line} …", markup=False, highlight=False)

    if r.policies is None:
        check_recipe(r, note=note)
        console.print(f"{recipe}: ok (group size {r.group_size}, {r.train.steps} steps)")
        return
    from .recipe.cotraining import field_of, policy_recipes, renamed

    sizes = []
    for i, (name, own) in enumerate(policy_recipes(r)):  # each policy's own recipe

        def named(line: str, i=i) -> None:  # its fields by the co-training recipe's names
            note(re.sub(r"\b(policy|peers\.\d+)\.model\b", lambda m: field_of(r, i, m[0]), line))

        with renamed(r, i):
            check_recipe(own, note=named)
        sizes.append(f"{name} {own.group_size}")
    groups = ", ".join(sizes)
    steps = r.train.steps
    console.print(f"{recipe}: ok ({len(sizes)} policies, group sizes {groups}, {steps} steps)")


@app.command("plugins")
def plugins_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List every plugin with its version and the components it registers."""
    from .plugins.registry import plugin_infos

    infos = plugin_infos()
    if as_json:
        typer.echo(json.dumps([vars(i) for i in infos], indent=2))
        return
    table = Table("plugin", "distribution", "version", "components", "hooks")
    for col in table.columns:  # names cut short are no use: wrap instead
        col.overflow = "fold"
    for i in infos:
        comps = "; ".join(f"{k}: {', '.join(v)}" for k, v in i.components.items())
        hooks = ", ".join(i.hooks) if i.left_out is None else f"left out: {i.left_out}"
        table.add_row(i.name, i.distribution, i.version, comps or "-", hooks)
    console.print(table)
    params = Table("component", "kind", "parameters (recipe `params`)", "what it is")
    for col in params.columns:
        col.overflow = "fold"
    for i in infos:
        for comp, d in sorted(i.details.items()):
            shown = ", ".join(
                f"{p['name']}: {p['type'] or '?'}" + (f" = {p['default']}" if p["default"] else "")
                for p in d["params"]
            )
            params.add_row(comp, d["kind"].replace("_", " "), shown or "-", d["doc"])
    console.print(params)


RunDirsArg = Annotated[
    list[Path],
    typer.Argument(
        metavar="RUN_DIR", help="Run directories (a run's output_dir); several are overlaid."
    ),
]
OutputOpt = Annotated[
    Path,
    typer.Option("--output", "-o", metavar="FILE", help="The HTML file to write (self-contained)."),
]
PngOpt = Annotated[
    Path | None,
    typer.Option(
        "--png", metavar="DIR", help="Also write each plot as a PNG file into this directory."
    ),
]


@app.command()
def report(
    run_dirs: RunDirsArg, output: OutputOpt = Path("report.html"), png: PngOpt = None
) -> None:
    """Draw runs as one HTML page: curves, evaluations, alerts, completions, comparison."""
    from .report import write_report

    written = write_report(run_dirs, output, png_dir=png)
    runs = len(written.runs)
    console.print(
        f"report: {written.path} ({runs} run{'s' if runs != 1 else ''}, "
        f"{len(written.plots)} plots)",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    if png is not None:
        console.print(
            f"png: {len(written.pngs)} files in {png}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


@app.command("new-plugin")
def new_plugin_cmd(
    name: Annotated[str, typer.Argument(help="The component's name in recipes, e.g. my_judge.")],
    kind: Annotated[
        str, typer.Option("--kind", help="reward, evaluator, generator or tracker.")
    ] = "reward",
    where: Annotated[Path, typer.Option("--dir", help="Where to write the package.")] = Path("."),
) -> None:
    """Write a ready plugin package: entry point, one component, a passing test, a README."""
    from .scaffold import new_plugin

    root = new_plugin(name, kind, where)
    console.print(f"plugin package: {root}", markup=False, highlight=False, soft_wrap=True)
    console.print(
        f"next: cd {root} && pip install -e '.[test]' && python -m pytest",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def _version(value: bool) -> None:
    if value:
        from .report import package_version

        typer.echo(f"grpo-ensemble {package_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """GRPO for language models with groups pooled from an ensemble of models."""


def _register_plugin_commands() -> None:
    from .plugins.registry import call_each

    call_each("register_commands", app=app)


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(exit, usage error, abort) classes of click and of the click that typer vendors."""
    import click

    exit_, usage, abort = (
        [click.exceptions.Exit, typer.Exit],
        [click.ClickException],
        [
            click.exceptions.Abort,
            typer.Abort,
        ],
    )
    try:
        from typer._click import exceptions as vendored

        usage.append(vendored.ClickException)
    except ImportError:  # a typer that uses click itself
        pass
    return tuple(exit_), tuple(usage), tuple(abort)


def _resume_hint(args: list[str]) -> str:
    """This command line with `--resume auto` instead of any --resume it had."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        elif not a.startswith("--resume="):
            out.append(shlex.quote(a))
    return " ".join(["grpo-ensemble", *out, "--resume", "auto"])


def _launcher_args(argv: list[str]) -> list[str]:
    """Drop the `--local_rank=N` that the `deepspeed` launcher puts before the command (the
    rank is also in the LOCAL_RANK environment variable, which is what we read)."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app and maps errors to exit codes."""
    try:
        code = _main(argv)
    except BaseException:  # GRPO_ENSEMBLE_DEBUG: the traceback goes out the usual way
        _leave_process_group()
        raise
    if _leave_process_group():
        _exit_rank(code)
    return code


def _leave_process_group() -> bool:
    """Shut the process group down; True if this process was a rank of a multi-process run."""
    if "torch" not in sys.modules:  # nothing to leave
        return False
    d = sys.modules["torch"].distributed
    if d.is_available() and d.is_initialized() and os.environ.get("WORLD_SIZE", "1") != "1":
        try:
            d.destroy_process_group()
        except Exception:  # noqa: BLE001 — best effort on the way out
            pass
        return True
    return False


def _exit_rank(code: int) -> None:
    """End a rank without finalizing the interpreter.

    A gloo worker thread frees the tensors of the collective it ran just after the collective
    ends, and it takes the GIL to do so. When the rank exits right after that collective (as
    after an error every rank agreed on), the interpreter may already be finalizing; the thread
    then cannot take the GIL and the process dies of SIGABRT ("terminate called without an
    active exception") instead of exiting with `code`. So this does what a normal exit does
    that matters (wait for non-daemon threads, run exit handlers, flush output) and leaves with
    `os._exit`.
    """
    for t in threading.enumerate():
        if t is not threading.current_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 — a closed stream: nothing to flush
            pass
    os._exit(code)


def _main(argv: list[str] | None) -> int:
    debug = os.environ.get("GRPO_ENSEMBLE_DEBUG") == "1"
    # an error every rank agreed on is printed by rank 0 only
    err = _Stderr(quiet_agreed=os.environ.get("RANK", "0") != "0")
    argv = _launcher_args(sys.argv[1:] if argv is None else list(argv))
    try:
        _register_plugin_commands()
        code = app(args=argv, prog_name="grpo-ensemble", standalone_mode=False)
        if isinstance(code, int) and code:  # typer.Exit(code), or 130 for a KeyboardInterrupt
            if code == 130:
                err.print("interrupted")
            return code
    except UserError as exc:
        if debug:
            raise
        where = _where_in_recipe(exc, argv)
        err.print(f"error: {where}{exc}", markup=False, highlight=False, soft_wrap=True, exc=exc)
        return 2
    except Interrupted as exc:
        message = f"{exc}; continue with: {_resume_hint(argv)}" if exc.resumable else str(exc)
        err.print(message, markup=False, highlight=False, soft_wrap=True, exc=exc)
        return exc.exit_code
    except GrpoEnsembleError as exc:
        if debug:
            raise
        err.print(f"run failed: {exc}", markup=False, highlight=False, soft_wrap=True, exc=exc)
        return 1
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except Exception as exc:  # click usage errors, then anything unexpected
        exit_, usage, abort = _click_exceptions()
        if isinstance(exc, exit_):
            return exc.exit_code
        if isinstance(exc, usage):  # one line, as every other error (click's own takes four)
            if not exc.format_message().strip():  # the help, printed already (no arguments)
                return 2
            ctx = getattr(exc, "ctx", None)
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            message = f"error: {exc.format_message()}{hint}"
            err.print(message, markup=False, highlight=False, soft_wrap=True)
            return 2
        if isinstance(exc, abort):
            return 1
        if debug:
            raise
        err.print(
            f"run failed: {type(exc).__name__}: {exc} (GRPO_ENSEMBLE_DEBUG=1 shows the traceback)",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        return 1
    return 0


def _where_in_recipe(exc: UserError, argv: list[str]) -> str:
    """'FILE:LINE: ' (or '--set: ') for a recipe error found after the schema check (an unknown
    plugin, rejected parameters, a model that does not load), which names only its field: the
    line of that field (or of the nearest part of it written) in the recipe file given on the
    command line. '' where it is not such an error or no recipe file was given."""
    from .errors import RecipeError

    if not isinstance(exc, RecipeError) or exc.source is not None or not exc.field:
        return ""
    sets, files = [], []
    it = iter(argv[1:])
    for arg in it:
        if arg == "--set":
            sets.append(next(it, ""))
        elif arg.startswith("--set="):
            sets.append(arg.removeprefix("--set="))
        elif arg in ("--resume",):
            next(it, None)
        elif not arg.startswith("-") and Path(arg).suffix in (".yaml", ".yml", ".json"):
            files.append(arg)
    field = exc.field
    if any(field == k or field.startswith(k + ".") for k in (s.split("=", 1)[0] for s in sets)):
        return "--set: "
    if not files or not Path(files[0]).is_file():
        return ""
    import yaml

    from .recipe import _line_of

    try:
        root = yaml.compose(Path(files[0]).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return ""
    loc = tuple(int(k) if k.isdigit() else k for k in field.split("."))
    line = _line_of(root, loc)
    return f"{files[0]}:{line}: " if line is not None else ""


class _Stderr:
    """Error output. On ranks other than 0 an error marked `agreed` (raised on every rank
    with the same message) is not printed again."""

    def __init__(self, quiet_agreed: bool):
        self.console = Console(stderr=True)
        self.quiet_agreed = quiet_agreed

    def print(self, *args, exc: BaseException | None = None, **kwargs) -> None:
        if not (self.quiet_agreed and getattr(exc, "agreed", False)):
            self.console.print(*args, **kwargs)


def entry() -> None:
    sys.exit(main())
