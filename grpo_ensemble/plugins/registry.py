"""The plugin manager: built-in plugins plus those found through the `grpo_ensemble` entry points.

Which installed third-party plugins load can be limited with the environment variable
``GRPO_ENSEMBLE_LOAD_PLUGINS``: unset loads all, a comma-separated list loads only those entry
point names, an empty string loads none (the test suite uses this).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
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
    name: str
    version: str
    hooks: list[str]
    components: dict[str, list[str]] = field(default_factory=dict)


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
        try:
            plugin = ep.load()
        except Exception as exc:  # noqa: BLE001 — left out, said, not fatal to the CLI
            _leave_out(ep.name, f"entry point {ep.value!r} failed to load: {_one_line(exc)}")
            continue
        pm.register(plugin, name=ep.name)
        _versions[ep.name] = ep.dist.version if ep.dist else "unknown"
    return pm


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
        try:
            impl.function(**kwargs)
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
    for kind in KINDS:
        for comp, (_cls, plugin_name) in sorted(components(kind).items()):
            infos[plugin_name].components.setdefault(kind, []).append(comp)
    return list(infos.values())
