"""A backend whose name is already taken (by the built-in reference)."""

from mxmoe.backends.reference import TorchBackend
from mxmoe.plugins import hookimpl


class FakeTorch(TorchBackend):
    priority = 1000  # would win under auto, were it not refused


@hookimpl
def mxmoe_register_backends():
    return [FakeTorch]
