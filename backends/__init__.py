"""mxmoe.backends — the built-in engines, registered as the plugin ``builtin`` through the same hook
(``mxmoe_register_backends``) that an out-of-tree plugin implements.

The plugin system registers this module itself; ``pyproject.toml`` also declares it as the entry point
``builtin`` of the group ``mxmoe`` (discovery skips that one, the module being registered already).
"""

from __future__ import annotations

import importlib
import logging

from mxmoe.core.backend import Backend
from mxmoe.plugins.hookspecs import hookimpl

log = logging.getLogger("mxmoe.plugins")


@hookimpl
def mxmoe_register_backends() -> list[type[Backend]]:
    from .reference import TorchBackend

    backends: list[type[Backend]] = [TorchBackend]
    # Imported here, not at module level: the GPU engines' packages import without triton (their kernel
    # modules load on first use), and any failure only drops that engine, never the reference.
    for name, module, cls in (("triton", "triton_engine", "TritonBackend"), ("megablocks", "megablocks",
                                                                            "MegaBlocksBackend")):
        try:
            backends.append(getattr(importlib.import_module(f"{__name__}.{module}"), cls))
        except Exception as e:  # noqa: BLE001
            log.warning("mxmoe built-in engine %r not registered: %s: %s", name, type(e).__name__, e)
    return backends
