"""A backend that claims nothing: no op, no device."""

from mxmoe.core.backend import Backend, Capabilities
from mxmoe.plugins import hookimpl


class NothingBackend(Backend):
    name = "nothing"
    priority = 1000
    capabilities = Capabilities(ops=(), devices=(), dtypes=())


@hookimpl
def mxmoe_register_backends():
    return [NothingBackend]
