"""The plugin manager: built-in plugins plus those found through the `grpo_ensemble` entry points.

Which installed third-party plugins load can be limited with the environment variable
``GRPO_ENSEMBLE_LOAD_PLUGINS``: unset loads all, a comma-separated list loads only those entry
point names, an empty string loads none (the test suite uses this).
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass, field

import pluggy

from . import hookspecs
from .errors import PluginError, RecipeError

KINDS = {
    "generator": "register_generators",
    "reward_scorer": "register_reward_scorers",
    "group_evaluator": "register_group_evaluators",
}
DEFAULT_PLUGINS = {  # plugin name → module
    "builtin-generators": "grpo_ensemble.default_plugins.generators",
    "builtin-rewards": "grpo_ensemble.default_plugins.rewards",
    "builtin-evaluators": "grpo_ensemble.default_plugins.evaluators",
}

_pm: pluggy.PluginManager | None = None
_versions: dict[str, str] = {}  # entry-point plugin name → its distribution's version


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
    for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT):
        if allowed is not None and ep.name not in {a.strip() for a in allowed.split(",")}:
            continue
        if pm.get_plugin(ep.name) is not None:
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must not take the CLI down unexplained
            raise PluginError(ep.name, f"failed to load entry point {ep.value!r}: {exc}") from exc
        pm.register(plugin, name=ep.name)
        _versions[ep.name] = ep.dist.version if ep.dist else "unknown"
    return pm


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

        impl.function(register=register)
    return found


def get_component(kind: str, name: str, field_path: str) -> type:
    """Look up a component class by name; an unknown name is a recipe error on `field_path`."""
    table = components(kind)
    if name not in table:
        known = ", ".join(sorted(table)) or "none"
        raise RecipeError(field_path, f"unknown {kind.replace('_', ' ')} {name!r} (known: {known})")
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
