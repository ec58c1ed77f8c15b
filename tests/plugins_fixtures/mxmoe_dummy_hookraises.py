"""A plugin whose registration hook raises."""

from mxmoe.plugins import hookimpl


@hookimpl
def mxmoe_register_backends():
    raise ValueError("cannot read my own config")
