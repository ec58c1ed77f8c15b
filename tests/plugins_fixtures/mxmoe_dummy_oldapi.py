"""A backend written for an older, incompatible backend API."""

from mxmoe.backends.reference import TorchBackend
from mxmoe.plugins import hookimpl


class OldApiBackend(TorchBackend):
    name = "oldapi"
    api_version = ">=0.1,<1"
    priority = 1000


@hookimpl
def mxmoe_register_backends():
    return [OldApiBackend]
