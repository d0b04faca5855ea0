"""Plugins: the hooks (`hookspecs`), the registry that finds them through entry points
(`registry`), the component interfaces they implement (`interfaces`) and the built-in plugins
(`builtin`), which are ordinary plugins of the same hooks."""

from .registry import (
    DEFAULT_PLUGINS,
    KINDS,
    PluginInfo,
    broken,
    call_each,
    components,
    get_component,
    get_plugin_manager,
    plugin_infos,
    reset_plugin_manager,
)

__all__ = [
    "DEFAULT_PLUGINS",
    "KINDS",
    "PluginInfo",
    "broken",
    "call_each",
    "components",
    "get_component",
    "get_plugin_manager",
    "plugin_infos",
    "reset_plugin_manager",
]
