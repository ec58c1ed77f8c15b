"""A plugin that registers no backend."""

from mxmoe.plugins import hookimpl


@hookimpl
def mxmoe_register_backends():
    return []
