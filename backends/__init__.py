"""mxmoe.backends — the built-in engines, registered as the plugin ``builtin`` through the same hook
(``mxmoe_register_backends``) that an out-of-tree plugin implements.

The plugin system registers this module itself; ``pyproject.toml`` also declares it as the entry point
``builtin`` of the group ``mxmoe`` (discovery skips that one, the module being registered already).
"""

from __future__ import annotations

import logging

from mxmoe.core.backend import Backend
from mxmoe.plugins.hookspecs import hookimpl

log = logging.getLogger("mxmoe.plugins")


@hookimpl
def mxmoe_register_backends() -> list[type[Backend]]:
    from .reference import TorchBackend

    backends: list[type[Backend]] = [TorchBackend]
    # Imported here, not at module level: the triton engine's package imports without triton (its
    # kernel modules load on first use), and any failure only drops that engine, never the reference.
    try:
        from .triton_engine import TritonBackend
    except Exception as e:  # noqa: BLE001
        log.warning("mxmoe built-in engine 'triton' not registered: %s: %s", type(e).__name__, e)
    else:
        backends.append(TritonBackend)
    try:
        from .megablocks import MegaBlocksBackend
    except Exception as e:  # noqa: BLE001
        log.warning("mxmoe built-in engine 'megablocks' not registered: %s: %s", type(e).__name__, e)
    else:
        backends.append(MegaBlocksBackend)
    return backends
