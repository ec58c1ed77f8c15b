"""mxmoe.core — hardware-agnostic: config, MXFP4, checkpoints, model graph, tokenizer, Backend interface."""

from .backend import BACKEND_API_VERSION, Backend, Capabilities, NotSupported
from .config import ModelConfig, load_config, preset


def load_model(*args, **kwargs):
    """See :func:`mxmoe.core.model.load_model`."""
    from .model import load_model as _load_model

    return _load_model(*args, **kwargs)


__all__ = ["BACKEND_API_VERSION", "Backend", "Capabilities", "NotSupported", "ModelConfig", "load_config",
           "preset", "load_model"]
