"""The plugin API of mxmoe: its hook specifications.

A plugin is a module (or object) with functions marked ``@mxmoe.plugins.hookimpl`` whose names match the
specs below; it is found through the entry-point group ``mxmoe``::

    # the plugin's pyproject.toml
    [project.entry-points.mxmoe]
    myengine = "my_package"          # a module holding the hook implementations

The built-in engines (``mxmoe.backends``) register through exactly these hooks. Hooks are called with
keyword arguments only; an implementation may accept any subset of a spec's parameters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from mxmoe.core.backend import Backend

    from .selection import Resolution

PROJECT = "mxmoe"  # the pluggy project name, the hook prefix and the entry-point group

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def mxmoe_register_backends() -> list[type[Backend]]:
    """Return the backend classes this plugin provides.

    Called once per discovery (the first time backends are listed or resolved in a process, and again
    when the discovery settings change), after every plugin has been registered, never per model or per
    token.

    Not firstresult: every plugin contributes; the results are concatenated. Each implementation is
    called on its own, so one that raises is reported against its plugin and does not affect the others.

    :return: subclasses of :class:`mxmoe.core.backend.Backend` (classes, not instances), each with a
        name unique across all plugins, an ``api_version`` range that must contain
        :data:`mxmoe.core.backend.BACKEND_API_VERSION`, and :class:`~mxmoe.core.backend.Capabilities`.
        Names must be lowercase (letters, digits, ``_``, ``.``, ``-``): backend specs are
        case-insensitive. ``version`` and ``api_version`` must be str, ``priority`` an int; a class
        that breaks these rules is refused and listed with the reason.
        Return an empty list (or ``None``) to provide nothing, e.g. when an optional dependency is absent:
        the plugin is then listed as loaded, with the note "registers no backends" (not a problem) —
        although letting the backend's ``probe()`` say so is friendlier, since the backend is then
        listed with its reason.
    """


@hookspec
def mxmoe_resolution_done(resolution: Resolution) -> None:
    """Observe the outcome of backend selection.

    Called at the end of every successful :func:`mxmoe.plugins.resolve_backends` (e.g. once per
    ``load_model``), after each op has been given a backend and before any weight is prepared.

    Not firstresult; return values are ignored. Meant for logging and telemetry: implementations must
    not modify the resolution. Each implementation is called on its own (in pluggy's order, but not
    through pluggy's call loop), so one that raises anything, SystemExit included, is logged and ignored,
    and the others are still called. Hook wrappers are not supported for this hook (they are ignored).

    :param resolution: the chosen backend per op (``resolution.ops``) and the trace of the decision
        (``resolution.trace``).
    """
