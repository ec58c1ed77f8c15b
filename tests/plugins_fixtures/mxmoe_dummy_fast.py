"""A valid backend that serves only attention and RMSNorm, in float32, with a high priority."""

from mxmoe.backends.reference import TorchBackend
from mxmoe.core.backend import Capabilities
from mxmoe.plugins import hookimpl

RESOLUTIONS = []  # what mxmoe_resolution_done saw


class FastBackend(TorchBackend):
    name = "fast"
    version = "9.9"
    priority = 100
    capabilities = Capabilities(ops=("attention", "rms_norm"), devices=("cpu",), dtypes=("float32",),
                                head_dims=(16, 64), mxfp4="none")


@hookimpl
def mxmoe_register_backends():
    return [FastBackend]


@hookimpl
def mxmoe_resolution_done(resolution):
    RESOLUTIONS.append(resolution)
