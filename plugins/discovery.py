"""Finding plugins and the backends they register.

The built-in engines (``mxmoe.backends``) are registered first, under the plugin name ``builtin``; then
every entry point of the group ``mxmoe`` is loaded (``ep.load()``) and registered with pluggy under its
entry-point name, one entry point at a time (see :func:`_discover` for why not through pluggy's
``load_setuptools_entrypoints``): a plugin failing to import is reported (status ``failed`` with the
reason) and never stops the others; a second plugin with an entry-point name already taken is refused
(status ``duplicate``, the reason naming both distributions) and never displaces the first. Then each
plugin's ``mxmoe_register_backends`` is called, and every class it returns is checked (a Backend
subclass, a unique lowercase name, a str ``version`` and ``api_version``, an int ``priority``,
capabilities as data, a compatible API range); a refused class is listed with its reason. A plugin
that registers no backend is loaded and listed with the note ``registers no backends`` (the hookspec
allows it), not as a problem.

Environment (read at each discovery; names compared case-insensitively, as entry-point name or
distribution name):

* ``MXMOE_PLUGINS=a,b`` — allow-list: only these entry-point plugins load (the others are listed as
  ``not_allowed``).
* ``MXMOE_DISABLE_PLUGINS=a,b`` — block-list: these never load (``blocked``); wins over the allow-list.
* ``MXMOE_DISABLE_PLUGIN_AUTOLOAD=1`` — load no entry point except those named in ``MXMOE_PLUGINS``;
  the built-ins are always there.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

import pluggy
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version
from pydantic import BaseModel, ConfigDict

from mxmoe.core.backend import BACKEND_API_VERSION, Backend, Capabilities

from . import hookspecs

log = logging.getLogger("mxmoe.plugins")

GROUP = hookspecs.PROJECT  # entry-point group
BUILTIN = "builtin"  # plugin name of mxmoe.backends
BUILTIN_MODULE = "mxmoe.backends"

ENV_ALLOW = "MXMOE_PLUGINS"
ENV_BLOCK = "MXMOE_DISABLE_PLUGINS"
ENV_NO_AUTOLOAD = "MXMOE_DISABLE_PLUGIN_AUTOLOAD"

PluginStatus = Literal["loaded", "failed", "blocked", "not_allowed", "autoload_disabled", "duplicate"]


class PluginInfo(BaseModel):
    """One plugin: where it comes from, whether it loaded, and what it registered."""

    model_config = ConfigDict(extra="forbid")

    name: str  # entry-point name (``builtin`` for mxmoe.backends)
    value: str  # the entry point's target, "module" or "module:attr"
    distribution: str | None = None
    dist_version: str | None = None
    status: PluginStatus
    reason: str = ""  # why not loaded, or what went wrong while registering its backends
    note: str = ""  # informational, not a problem (e.g. "registers no backends")
    backends: list[str] = []


class BackendInfo(BaseModel):
    """One registered backend class, as declared (device-independent; availability comes from probe)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    version: str
    plugin: str
    distribution: str | None = None
    dist_version: str | None = None
    cls: str  # "module:QualName"
    api_version: str  # the range it asks for
    api_compatible: bool
    priority: int
    capabilities: Capabilities | None
    problem: str = ""  # non-empty: refused at registration (API range, duplicate name, bad declaration)
    problem_kind: Literal["", "api_version", "duplicate", "invalid"] = ""

    @property
    def usable(self) -> bool:
        return not self.problem


@dataclass(frozen=True)
class Settings:
    """The discovery settings, from the environment."""

    allow: tuple[str, ...] = ()
    block: tuple[str, ...] = ()
    autoload: bool = True

    @classmethod
    def from_env(cls, environ: Any = None) -> "Settings":
        env = os.environ if environ is None else environ
        return cls(allow=_names(env.get(ENV_ALLOW, "")), block=_names(env.get(ENV_BLOCK, "")),
                   autoload=not _truthy(env.get(ENV_NO_AUTOLOAD, "")))


@dataclass
class Registry:
    """The outcome of one discovery: plugins (loaded or not) and backend classes (usable or refused)."""

    manager: pluggy.PluginManager
    settings: Settings
    plugins: list[PluginInfo]
    infos: list[BackendInfo]  # every backend class found, in registration order
    classes: dict[str, type[Backend]] = field(default_factory=dict)  # usable ones, by name

    def info(self, name: str) -> BackendInfo | None:
        return next((i for i in self.infos if i.name == name and i.usable), None) or \
            next((i for i in self.infos if i.name == name), None)

    def plugin(self, name: str) -> PluginInfo | None:
        return next((p for p in self.plugins if _matches(p, (_norm(name),))), None)


def api_compatible(spec: str, version: str = BACKEND_API_VERSION) -> tuple[bool, str]:
    """Is interface ``version`` inside the range ``spec`` (a PEP 440 specifier such as ">=1.0,<2")?"""
    try:
        ok = SpecifierSet(spec).contains(Version(version), prereleases=True)
    except InvalidSpecifier as e:
        return False, f"invalid api_version {spec!r} ({e})"
    if ok:
        return True, ""
    return False, f"written for backend API {spec}, but this mxmoe provides backend API {version}"


_cache: dict[tuple, Registry] = {}


def discover(*, refresh: bool = False) -> Registry:
    """Discover plugins and backends (cached per settings and ``sys.path``; ``refresh`` forces a new scan)."""
    settings = Settings.from_env()
    key = (settings, tuple(sys.path))
    if refresh or key not in _cache:
        importlib.invalidate_caches()
        _cache.clear()
        _cache[key] = _discover(settings)
    return _cache[key]


def _discover(settings: Settings) -> Registry:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    plugins: list[PluginInfo] = []

    import mxmoe.backends as builtin

    pm.register(builtin, name=BUILTIN)
    plugins.append(PluginInfo(name=BUILTIN, value=BUILTIN_MODULE, distribution="mxmoe",
                              dist_version=_dist_version("mxmoe"), status="loaded"))

    # Entry points are loaded here one by one, not through pluggy's load_setuptools_entrypoints: that
    # helper loads, for a given name, the first entry point of that name in its own scan order (not
    # necessarily the one in hand), and one exception there would stop the whole scan. Loading each
    # ``ep`` ourselves gives per-entry-point error isolation and attributes every plugin to the
    # distribution it really comes from. A registered name is never set_blocked: that would unregister
    # the plugin already loaded under it.
    for ep, dist in _entry_points():
        info = PluginInfo(name=ep.name, value=ep.value, distribution=dist.metadata["Name"],
                          dist_version=dist.version, status="loaded")
        names = (_norm(ep.name), _norm(info.distribution or ""))
        if ep.value.split(":")[0].strip() == BUILTIN_MODULE:
            continue  # our own pyproject's entry point for the built-ins, registered above already
        first = next((p for p in plugins if p.name == ep.name and p.status == "loaded"), None)
        if first is not None or pm.has_plugin(ep.name):
            info.status, info.reason = "duplicate", _duplicate_reason(ep.name, info, first)
        elif any(n in settings.block for n in names):
            info.status, info.reason = "blocked", f"named in {ENV_BLOCK}"
        elif settings.allow and not any(n in settings.allow for n in names):
            info.status, info.reason = "not_allowed", f"not named in {ENV_ALLOW}={','.join(settings.allow)}"
        elif not settings.autoload and not any(n in settings.allow for n in names):
            info.status, info.reason = "autoload_disabled", f"{ENV_NO_AUTOLOAD} is set"
        if info.status != "loaded":
            plugins.append(info)
            if info.status == "duplicate":
                log.warning("mxmoe plugin %r (%s) not loaded: %s", ep.name, info.distribution, info.reason)
            elif not pm.has_plugin(ep.name):
                pm.set_blocked(ep.name)  # refused by the settings: so that no other route loads it either
            continue
        obj: Any = None
        try:
            if pm.is_blocked(ep.name):  # blocked for another distribution's entry point of the same name
                _unblock(pm, ep.name)
            obj = ep.load()
            other = pm.get_name(obj)
            if other is not None:  # the same module under another entry-point name
                info.status, info.reason = "duplicate", (f"{ep.value!r} is already registered as plugin "
                                                         f"{other!r}")
            else:
                pm.register(obj, name=ep.name)
        except (Exception, SystemExit) as e:  # a plugin must never take the process down
            if obj is not None and pm.get_plugin(ep.name) is obj:
                pm.unregister(name=ep.name)  # half-registered (a hookimpl failed validation)
            info.status, info.reason = "failed", f"cannot load {ep.value!r}: {type(e).__name__}: {e}"
            log.warning("mxmoe plugin %r (%s) failed to load: %s", ep.name, info.distribution, info.reason)
        plugins.append(info)

    registry = Registry(manager=pm, settings=settings, plugins=plugins, infos=[])
    _collect_backends(registry)
    return registry


def _unblock(pm: pluggy.PluginManager, name: str) -> None:
    if hasattr(pm, "unblock"):  # pluggy >= 1.4
        pm.unblock(name)
    else:
        pm._name2plugin.pop(name, None)  # what unblock does


def _duplicate_reason(name: str, info: PluginInfo, first: PluginInfo | None) -> str:
    def where(p: PluginInfo | None) -> str:
        if p is None:
            return "a plugin registered directly"
        return f"distribution {p.distribution or '?'} {p.dist_version or ''}".rstrip()

    return (f"entry-point name {name!r} is already taken by {where(first)}; this one, from {where(info)} "
            f"({info.value}), is not loaded")


def _collect_backends(registry: Registry) -> None:
    pm = registry.manager
    by_name = {p.name: p for p in registry.plugins if p.status == "loaded"}
    # Each implementation is called on its own (as pluggy's own loop does) so that a plugin whose hook
    # raises is reported against that plugin. Registration order: built-ins first.
    impls = sorted(pm.hook.mxmoe_register_backends.get_hookimpls(),
                   key=lambda impl: list(by_name).index(impl.plugin_name) if impl.plugin_name in by_name else 1 << 30)
    for impl in impls:
        plugin = by_name.get(impl.plugin_name)
        if plugin is None:  # registered directly (not through discovery): describe it on the fly
            plugin = PluginInfo(name=impl.plugin_name, value=repr(impl.plugin), status="loaded")
            registry.plugins.append(plugin)
        try:
            result = impl.function()
        except (Exception, SystemExit) as e:
            _problem(plugin, f"mxmoe_register_backends raised {type(e).__name__}: {e}")
            continue
        if result is None:
            result = []
        if not isinstance(result, (list, tuple)):
            _problem(plugin, f"mxmoe_register_backends returned {type(result).__name__}, expected a list of "
                             "Backend classes")
            continue
        if not result:  # allowed by the hookspec: informational, not a problem
            plugin.note = "registers no backends"
            log.info("mxmoe plugin %r registers no backends", plugin.name)
        for cls in result:
            try:
                info = _describe(cls, plugin, registry)
            except (Exception, SystemExit) as e:  # e.g. a class attribute that raises when read
                _problem(plugin, f"cannot read the declaration of {cls!r}: {type(e).__name__}: {e}")
                continue
            if info is None:
                continue
            registry.infos.append(info)
            plugin.backends.append(info.name)
            if info.usable:
                registry.classes[info.name] = cls
            else:
                log.warning("mxmoe backend %r (plugin %r) refused: %s", info.name, plugin.name, info.problem)


def _describe(cls: Any, plugin: PluginInfo, registry: Registry) -> BackendInfo | None:
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        _problem(plugin, f"registered {cls!r}, which is not a subclass of mxmoe.core.backend.Backend")
        return None
    name = getattr(cls, "name", None)
    where = f"backend class {cls.__module__}.{cls.__qualname__}"
    if not isinstance(name, str) or not name or name == Backend.name or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        _problem(plugin, f"{where} has no valid name ({name!r}); set the class attribute `name` (lowercase "
                         "letters, digits, '_', '.', '-')")
        return None
    if name != name.lower():
        # Backend specs are case-insensitive (lowercased when parsed), so a name with capitals could never
        # be requested: refuse it here, where the plugin author sees why.
        _problem(plugin, f"{where} is named {name!r}: backend names must be lowercase (backend specs are "
                         f"case-insensitive); use {name.lower()!r}")
        return None
    caps = getattr(cls, "capabilities", None)
    version, api_version, priority = (getattr(cls, a, None) for a in ("version", "api_version", "priority"))
    bad = [f"{attr} is {value!r} ({type(value).__name__}), expected {expected}"
           for attr, value, ok, expected in (
               ("version", version, isinstance(version, str), "a str"),
               ("api_version", api_version, isinstance(api_version, str), "a str such as '>=1.0,<2'"),
               ("priority", priority, isinstance(priority, int) and not isinstance(priority, bool), "an int"))
           if not ok]
    compatible, why = api_compatible(api_version) if isinstance(api_version, str) else (False, "")
    info = BackendInfo(name=name, version=version if isinstance(version, str) else repr(version),
                       plugin=plugin.name, distribution=plugin.distribution,
                       dist_version=plugin.dist_version, cls=f"{cls.__module__}:{cls.__qualname__}",
                       api_version=api_version if isinstance(api_version, str) else repr(api_version),
                       api_compatible=compatible,
                       priority=priority if isinstance(priority, int) and not isinstance(priority, bool) else 0,
                       capabilities=caps if isinstance(caps, Capabilities) else None)
    if bad:
        info.problem, info.problem_kind = "; ".join(bad), "invalid"
    elif not compatible:
        info.problem, info.problem_kind = why, "api_version"
    elif info.capabilities is None:
        info.problem, info.problem_kind = (f"capabilities is {type(caps).__name__}, expected "
                                           "mxmoe.core.backend.Capabilities"), "invalid"
    elif name in registry.classes:
        other = registry.info(name)
        info.problem, info.problem_kind = (f"name {name!r} is already registered by plugin "
                                           f"{other.plugin if other else '?'!r}"), "duplicate"
    return info


def _problem(plugin: PluginInfo, msg: str) -> None:
    plugin.reason = f"{plugin.reason}; {msg}" if plugin.reason else msg
    log.warning("mxmoe plugin %r: %s", plugin.name, msg)


def _entry_points() -> list[tuple[importlib.metadata.EntryPoint, importlib.metadata.Distribution]]:
    found, seen = [], set()
    for dist in importlib.metadata.distributions():
        try:
            eps = [ep for ep in dist.entry_points if ep.group == GROUP]
        except Exception as e:  # a broken dist-info must not stop discovery
            log.warning("cannot read entry points of %s: %s", getattr(dist, "_path", dist), e)
            continue
        for ep in eps:
            # The same distribution may be visible twice on sys.path (e.g. an editable install and a build
            # folder); the first one wins, like the import system.
            key = (_norm(dist.metadata["Name"] or ""), ep.name, ep.value)
            if key not in seen:
                seen.add(key)
                found.append((ep, dist))
    return sorted(found, key=lambda pair: (pair[0].name, _norm(pair[1].metadata["Name"] or "")))


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).strip().lower()


def _names(value: str) -> tuple[str, ...]:
    return tuple(n for n in (_norm(v) for v in value.split(",")) if n)


def _matches(plugin: PluginInfo, names: tuple[str, ...]) -> bool:
    return _norm(plugin.name) in names or (plugin.distribution is not None and _norm(plugin.distribution) in names)


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")
