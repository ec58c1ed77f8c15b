"""mxmoe.backends — the built-in engines, registered as the plugin ``builtin`` through the same hook
(``mxmoe_register_backends``) that an out-of-tree plugin implements.

The plugin system registers this module itself; ``pyproject.toml`` also declares it as the entry point
``builtin`` of the group ``mxmoe`` (discovery skips that one, the module being registered already).
"""

from __future__ import annotations

from mxmoe.core.backend import Backend
from mxmoe.plugins.hookspecs import hookimpl


@hookimpl
def mxmoe_register_backends() -> list[type[Backend]]:
    from .reference import TorchBackend

    return [TorchBackend]
