"""The plugin manager: built-ins first, then entry points of group `agentbench_npu`.

`AGENTBENCH_NPU_PLUGINS` (comma-separated distribution names) is an allow-list: when it is set, only
those external distributions load ("" loads none). `AGENTBENCH_NPU_DISABLE_PLUGINS` blocks the named
distributions. Built-ins always load: they are plugins like any other, but the core needs them.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import os
from dataclasses import dataclass
from typing import Any, Callable

import pluggy

from . import __version__, hookspecs
from .errors import PluginError, UserError, close_names, one_line

ENTRY_POINT_GROUP = "agentbench_npu"
ALLOW_ENV = "AGENTBENCH_NPU_PLUGINS"
DISABLE_ENV = "AGENTBENCH_NPU_DISABLE_PLUGINS"
CORE_DISTRIBUTION = "agentbench-npu"

BUILTIN_PLUGINS = (
    "agentbench_npu.devices.plugin",
    "agentbench_npu.engines.plugin",
    "agentbench_npu.gates.plugin",
    "agentbench_npu.sandbox.plugin",
    "agentbench_npu.builtin.plugin",
)

# kind -> the hook that registers it
KINDS = {
    "scenario": "register_scenarios",
    "device": "register_devices",
    "engine": "register_engines",
    "sandbox": "register_sandboxes",
    "gate": "register_gates",
    "fault": "register_faults",
}


@dataclass(frozen=True)
class Registered:
    """One thing a plugin registered, and who is behind it."""

    kind: str
    name: str
    obj: Any
    plugin: str
    distribution: str
    version: str

    @property
    def description(self) -> str:
        text = getattr(self.obj, "description", "") or (getattr(self.obj, "__doc__", "") or "")
        return text.strip().splitlines()[0] if text.strip() else ""


@dataclass(frozen=True)
class PluginInfo:
    name: str
    distribution: str
    version: str
    hooks: tuple[str, ...]


def _names_from_env(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {_normalise(part) for part in raw.split(",") if part.strip()}


def _normalise(dist: str) -> str:
    return dist.strip().lower().replace("_", "-").replace(".", "-")


class Plugins:
    """Everything registered by every loaded plugin, by kind and name."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("agentbench_npu")
        self.pm.add_hookspecs(hookspecs)
        self._owners: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version)
        self._items: dict[str, dict[str, Registered]] = {kind: {} for kind in KINDS}

    # -- loading -------------------------------------------------------------------------------
    def load(self) -> Plugins:
        for module_name in BUILTIN_PLUGINS:
            module = importlib.import_module(module_name)
            self.pm.register(module, name=module_name)
            self._owners[module_name] = (CORE_DISTRIBUTION, __version__)
        self._load_entry_points()
        for kind, hook in KINDS.items():
            self._collect(kind, hook)
        return self

    def _load_entry_points(self) -> None:
        allow = _names_from_env(ALLOW_ENV)
        deny = _names_from_env(DISABLE_ENV) or set()
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "unknown"
            version = ep.dist.version if ep.dist is not None else "?"
            key = _normalise(dist)
            if (allow is not None and key not in allow) or key in deny:
                continue
            where = f"plugin '{ep.name}' (distribution {dist} {version})"
            try:
                module = ep.load()
            except Exception as exc:  # an import error of any kind is the plugin's, not ours
                raise PluginError(
                    f"{where} failed to import: {one_line(exc)}; "
                    f"fix or uninstall it, or set {DISABLE_ENV}={dist}"
                ) from exc
            if ep.name in self._owners:
                other_dist = self._owners[ep.name][0]
                raise PluginError(
                    f"{where} has the same plugin name as one from {other_dist}; "
                    f"set {DISABLE_ENV}={dist} to skip it"
                )
            try:
                self.pm.register(module, name=ep.name)
            except Exception as exc:
                raise PluginError(f"{where} could not be registered: {one_line(exc)}") from exc
            self._owners[ep.name] = (dist, version)

    def _where(self, plugin: str) -> str:
        dist, version = self._owners.get(plugin, ("unknown", "?"))
        return f"plugin '{plugin}' (distribution {dist} {version})"

    def _collect(self, kind: str, hook: str) -> None:
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            plugin = impl.plugin_name
            dist, version = self._owners.get(plugin, ("unknown", "?"))

            def register(obj: Any, _plugin: str = plugin, _dist: str = dist, _version: str = version) -> None:
                name = getattr(obj, "name", None)
                if not isinstance(name, str) or not name:
                    raise PluginError(f"{self._where(_plugin)} registered a {kind} without a string `name`: {obj!r}")
                existing = self._items[kind].get(name)
                if existing is not None:
                    raise PluginError(
                        f"{kind} '{name}' is registered twice: by {self._where(existing.plugin)} "
                        f"and by {self._where(_plugin)}; uninstall one or set {DISABLE_ENV}={_dist}"
                    )
                self._items[kind][name] = Registered(kind, name, obj, _plugin, _dist, _version)

            self._call_impl(impl, hook, {"register": register})

    def _call_impl(self, impl: Any, hook: str, kwargs: dict[str, Any]) -> Any:
        try:
            return impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
        except UserError:
            raise
        except Exception as exc:
            raise PluginError(
                f"{self._where(impl.plugin_name)} raised in {hook}: {one_line(exc)}"
            ) from exc

    # -- use -----------------------------------------------------------------------------------
    def items(self, kind: str) -> dict[str, Registered]:
        return dict(self._items[kind])

    def get(self, kind: str, name: str) -> Registered:
        items = self._items[kind]
        if name not in items:
            choices = sorted(items)
            raise UserError(
                f"unknown {kind} '{name}'{close_names(name, choices)}; "
                f"available: {', '.join(choices) or 'none'} (see `agentbench-npu list`)"
            )
        return items[name]

    def plugins(self) -> list[PluginInfo]:
        infos = []
        for name, module in self.pm.list_name_plugin():
            dist, version = self._owners.get(name, ("unknown", "?"))
            hooks = tuple(sorted(h.name for h in self.pm.get_hookcallers(module) or ()))
            infos.append(PluginInfo(name, dist, version, hooks))
        return infos

    def call(self, hook: str, **kwargs: Any) -> list[Any]:
        """Call every implementation of a hook, naming the plugin if one raises."""
        return [self._call_impl(impl, hook, kwargs) for impl in getattr(self.pm.hook, hook).get_hookimpls()]

    def add_commands(self, cli: Callable[..., Any]) -> None:
        self.call("register_commands", cli=cli)


def load_plugins() -> Plugins:
    """Load built-ins and every allowed entry point; errors are PluginError (exit 2)."""
    return Plugins().load()
