"""mxmoe-compile: the ``compile`` engine, registered through the entry-point group ``mxmoe``."""

from __future__ import annotations

from mxmoe.core.backend import Backend
from mxmoe.plugins import hookimpl

__version__ = "0.1.0"


@hookimpl
def mxmoe_register_backends() -> list[type[Backend]]:
    from .backend import CompileBackend

    return [CompileBackend]
