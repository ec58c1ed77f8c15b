"""A backend whose probe raises instead of saying why it is unavailable."""

from mxmoe.backends.reference import TorchBackend
from mxmoe.plugins import hookimpl


class ProbeRaisesBackend(TorchBackend):
    name = "proberaises"
    priority = 1000

    def probe(self, device=None):
        raise RuntimeError("driver exploded")


@hookimpl
def mxmoe_register_backends():
    return [ProbeRaisesBackend]
