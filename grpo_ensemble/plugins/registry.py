"""The plugin manager: built-in plugins plus those found through the `grpo_ensemble` entry points.

Which installed third-party plugins load can be limited with the environment variable
``GRPO_ENSEMBLE_LOAD_PLUGINS``: unset loads all, a comma-separated list loads only those entry
point names, an empty string loads none (the test suite uses this).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import inspect
import os
import sys
import typing
from dataclasses import dataclass, field

import pluggy

from ..errors import PluginError, RecipeError
from . import hookspecs

KINDS = {
    "generator": "register_generators",
    "reward_scorer": "register_reward_scorers",
    "group_evaluator": "register_group_evaluators",
    "tracker": "register_trackers",
}
DEFAULT_PLUGINS = {  # plugin name → module
    "builtin-generators": "grpo_ensemble.plugins.builtin.generators",
    "builtin-rewards": "grpo_ensemble.plugins.builtin.rewards",
    "builtin-evaluators": "grpo_ensemble.plugins.builtin.evaluators",
    "builtin-trackers": "grpo_ensemble.plugins.builtin.trackers",
}

_pm: pluggy.PluginManager | None = None
_versions: dict[str, str] = {}  # entry-point plugin name → its distribution's version
_dists: dict[str, str] = {}  # entry-point plugin name → its distribution's name
# plugins left out because they misbehave (an entry point that does not import, a name
# already taken, a hook that raises): plugin name → why. One broken plugin must not take down
# every command, recipes that do not use it included; a recipe that names a component it
# would have registered is told why the name is unknown.
broken: dict[str, str] = {}


def _leave_out(plugin: str, why: str) -> None:
    """Note a misbehaving plugin, and say so once on stderr."""
    if broken.get(plugin) != why:
        broken[plugin] = why
        sys.stderr.write(f"warning: plugin {plugin!r} left out: {why}\n")


@dataclass
class PluginInfo:
    name: str  # the entry-point name (what GRPO_ENSEMBLE_LOAD_PLUGINS lists)
    version: str
    hooks: list[str]
    components: dict[str, list[str]] = field(default_factory=dict)
    distribution: str = ""  # the package that installed it
    left_out: str | None = None  # why the plugin was left out, if it was
    # component name → its kind, first docstring line and parameters (name, type, default)
    details: dict[str, dict] = field(default_factory=dict)


def component_details(kind: str, cls: type) -> dict:
    """What `plugins` shows of a component: its kind, the first line of its docstring, and
    its constructor's parameters with their types and defaults (what a recipe's `params` may
    hold)."""
    own = cls.__dict__.get("__doc__")  # its own, not a base class's
    doc = inspect.cleandoc(own).strip().splitlines() if isinstance(own, str) else []
    params = []
    try:
        sig = inspect.signature(cls)
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 — a signature that cannot be read: shown without
        sig, hints = None, {}
    for name, p in sig.parameters.items() if sig is not None else ():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        hint = hints.get(name, p.annotation)
        shown = "" if hint is inspect.Parameter.empty else getattr(hint, "__name__", str(hint))
        default = None if p.default is p.empty else repr(p.default)
        params.append({"name": name, "type": shown.replace("typing.", ""), "default": default})
    return {"kind": kind, "doc": doc[0] if doc else "", "params": params}


def _version() -> str:
    try:
        return importlib.metadata.version("grpo-ensemble")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _build() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name, path in DEFAULT_PLUGINS.items():
        pm.register(importlib.import_module(path), name=name)
    allowed = os.environ.get("GRPO_ENSEMBLE_LOAD_PLUGINS")
    owner = dict.fromkeys(DEFAULT_PLUGINS, "grpo-ensemble (built in)")
    for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT):
        if allowed is not None and ep.name not in {a.strip() for a in allowed.split(",")}:
            continue
        dist = ep.dist.name if ep.dist else "an unknown distribution"
        if ep.name in owner:  # two distributions, one name: the later one is left out
            # (noted under its own label: the name itself belongs to the plugin that has it)
            _leave_out(f"{ep.name} of {dist}", f"the name is taken by {owner[ep.name]}")
            continue
        owner[ep.name] = dist
        _dists[ep.name] = dist
        try:
            plugin = ep.load()
        except Exception as exc:  # noqa: BLE001 — left out, said, not fatal to the CLI
            _leave_out(ep.name, f"entry point {ep.value!r} failed to load: {_one_line(exc)}")
            continue
        if register_checked(pm, plugin, ep.name):
            _versions[ep.name] = ep.dist.version if ep.dist else "unknown"
    if allowed is not None:  # a name the variable allows that no installed plugin has
        found = {ep.name for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT)}
        for name in sorted({a.strip() for a in allowed.split(",") if a.strip()} - found):
            known = ", ".join(sorted(found)) or "none"
            _leave_out(
                name,
                f"GRPO_ENSEMBLE_LOAD_PLUGINS names it, but no installed plugin "
                f"has that entry-point name (installed: {known})",
            )
    return pm


def excluded_plugins() -> list[str]:
    """Installed plugins that GRPO_ENSEMBLE_LOAD_PLUGINS keeps from loading."""
    allowed = os.environ.get("GRPO_ENSEMBLE_LOAD_PLUGINS")
    if allowed is None:
        return []
    keep = {a.strip() for a in allowed.split(",")}
    eps = importlib.metadata.entry_points(group=hookspecs.PROJECT)
    return sorted({ep.name for ep in eps if ep.name not in keep})


def _spec_names() -> list[str]:
    return [
        n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), f"{hookspecs.PROJECT}_spec")
    ]


def hook_problem(plugin) -> str | None:
    """Why a plugin's hook implementations cannot work, or None: a hook name no hookspec has
    (a misspelling: the hook would never be called), or an argument its hook does not pass
    (pluggy would refuse the whole plugin manager)."""
    specs = _spec_names()
    for attr in dir(plugin):
        fn = getattr(plugin, attr, None)
        opts = getattr(fn, f"{hookspecs.PROJECT}_impl", None)
        if not callable(fn) or not isinstance(opts, dict):
            continue
        hook = opts.get("specname") or attr
        if hook not in specs:
            close = difflib.get_close_matches(hook, specs, n=1)
            fix = f": did you mean {close[0]!r}?" if close else f" (hooks: {', '.join(specs)})"
            return f"its hook {hook!r} is no hook of grpo-ensemble{fix}"
        given = list(inspect.signature(getattr(hookspecs, hook)).parameters)
        takes = [a for a in inspect.signature(fn).parameters if a != "self"]
        extra = [a for a in takes if a not in given]
        if extra:
            return (
                f"its hook {hook}({', '.join(takes)}) asks for {', '.join(map(repr, extra))}, "
                f"which the hook does not pass: write it as {hook}({', '.join(given)}) (any "
                "of these arguments, by these names)"
            )
    return None


def register_checked(pm: pluggy.PluginManager, plugin, name: str) -> bool:
    """Register `plugin` unless a hook of it cannot work (`hook_problem`): then it is left
    out, named in one line, and every command goes on without it."""
    problem = hook_problem(plugin)
    if problem is None:
        try:
            pm.register(plugin, name=name)
            return True
        except (pluggy.PluginValidationError, ValueError) as exc:
            problem = _one_line(exc)
    _leave_out(name, problem)
    return False


def _one_line(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text[:300]


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, built on first use."""
    global _pm
    if _pm is None:
        _pm = _build()
    return _pm


def reset_plugin_manager() -> None:
    """Forget the plugin manager so the next use rediscovers entry points (for tests)."""
    global _pm
    _pm = None
    broken.clear()


def call_each(hook_name: str, **kwargs) -> None:
    """Call every plugin's implementation of a hook whose results are not needed (observers,
    CLI commands); one that raises is left out from then on and named, and the others and
    the run go on: a failing logger must not end a training run."""
    for impl in getattr(get_plugin_manager().hook, hook_name).get_hookimpls():
        if impl.plugin_name in broken:
            continue
        try:  # as pluggy calls it: the arguments the implementation names, no others
            impl.function(**{k: kwargs[k] for k in impl.argnames if k in kwargs})
        except Exception as exc:  # noqa: BLE001 — named and left out
            _leave_out(impl.plugin_name, f"its {hook_name} hook raised {_one_line(exc)}")


def components(kind: str) -> dict[str, tuple[type, str]]:
    """All registered components of one kind: name → (class, plugin name).

    Each plugin's hook is called on its own so that a duplicate name can name both plugins.
    """
    hook = getattr(get_plugin_manager().hook, KINDS[kind])
    found: dict[str, tuple[type, str]] = {}
    for impl in hook.get_hookimpls():

        def register(cls: type, _plugin: str = impl.plugin_name) -> None:
            name = getattr(cls, "name", "")
            if not name:
                raise PluginError(_plugin, f"{kind} {cls!r} has no `name`")
            if name in found:
                raise PluginError(
                    _plugin, f"{kind} {name!r} is already registered by plugin {found[name][1]!r}"
                )
            found[name] = (cls, _plugin)

        if impl.plugin_name in broken:
            continue
        before = dict(found)
        try:
            impl.function(register=register)
        except PluginError:
            raise
        except Exception as exc:  # noqa: BLE001 — this plugin's components are left out
            found.clear()
            found.update(before)
            _leave_out(impl.plugin_name, f"its {KINDS[kind]} hook raised {_one_line(exc)}")
    return found


def get_component(kind: str, name: str, field_path: str) -> type:
    """Look up a component class by name; an unknown name is a recipe error on `field_path`."""
    table = components(kind)
    if name not in table:
        known = ", ".join(sorted(table)) or "none"
        left = "; ".join(f"plugin {p!r} was left out: {why}" for p, why in sorted(broken.items()))
        more = f"; {left}" if left else ""
        if excluded_plugins():
            more += (
                f"; installed but not loaded (GRPO_ENSEMBLE_LOAD_PLUGINS): "
                f"{', '.join(excluded_plugins())}"
            )
        raise RecipeError(
            field_path, f"unknown {kind.replace('_', ' ')} {name!r} (known: {known}){more}"
        )
    return table[name][0]


def plugin_infos() -> list[PluginInfo]:
    """Every registered plugin with its version, hooks and the components it registers."""
    pm = get_plugin_manager()
    infos = {
        name: PluginInfo(
            name=name,
            version=_versions.get(name, _version()),
            hooks=sorted(h.name for h in pm.get_hookcallers(plugin) or []),
        )
        for name, plugin in pm.list_name_plugin()
    }
    for info in infos.values():
        info.distribution = _dists.get(info.name, "grpo-ensemble")
    for kind in KINDS:
        for comp, (cls, plugin_name) in sorted(components(kind).items()):
            infos[plugin_name].components.setdefault(kind, []).append(comp)
            infos[plugin_name].details[comp] = component_details(kind, cls)
    for name, why in sorted(broken.items()):  # left out: listed with the reason
        info = infos.setdefault(name, PluginInfo(name, _versions.get(name, ""), []))
        info.distribution, info.left_out = _dists.get(name, ""), why
    return list(infos.values())
