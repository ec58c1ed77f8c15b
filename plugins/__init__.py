"""mxmoe.plugins — the plugin system: hookspecs, discovery, selection of a backend per op.

Every engine, built-in or third party, is a plugin: a module with ``@hookimpl`` functions for the hooks
of :mod:`mxmoe.plugins.hookspecs` (``mxmoe_register_backends`` returns backend classes), found through
the entry-point group ``mxmoe``::

    [project.entry-points.mxmoe]
    compile = "mxmoe_compile"

Environment variables
  ``MXMOE_BACKEND``                  backend spec, when no explicit one is given (see below)
  ``MXMOE_CONFIG``                   path of the TOML config file (default ``./mxmoe.toml`` if present)
  ``MXMOE_STRICT=1``                 strict selection: refuse any fallback
  ``MXMOE_PLUGINS=a,b``              allow-list of entry-point plugins (entry-point or distribution names)
  ``MXMOE_DISABLE_PLUGINS=a,b``      block-list; wins over the allow-list
  ``MXMOE_DISABLE_PLUGIN_AUTOLOAD=1`` load no entry point but those named in ``MXMOE_PLUGINS``
                                     (the built-ins are always registered)

Backend spec: ``auto`` | ``NAME`` | ``OP=NAME,...`` | ``NAME,OP=NAME,...`` (a default, then overrides),
or the same as a dict. OP is one of :data:`mxmoe.core.backend.OPS` (embedding, rms_norm, linear,
rope, attention, router, experts) or a group: ``moe`` = router+experts, ``attn`` = attention,
``norm`` = rms_norm. Precedence: explicit argument / CLI flag > ``MXMOE_BACKEND`` > config file > auto.

Config file (TOML)::

    [backend]
    default = "auto"     # or a backend name
    strict = false
    [backend.ops]
    attention = "compile"
    moe = "torch"

A plugin that fails to import, whose hook or probe raises, or whose API range excludes this mxmoe's
(:data:`mxmoe.core.backend.BACKEND_API_VERSION`) is reported with its reason (``mxmoe backends``) and
never stops the process.
"""

from __future__ import annotations

from .discovery import (ENV_ALLOW, ENV_BLOCK, ENV_NO_AUTOLOAD, GROUP, BackendInfo, PluginInfo, Registry,
                        api_compatible, discover)
from .hookspecs import hookimpl, hookspec
from .selection import (ENV_BACKEND, ENV_CONFIG, ENV_STRICT, OP_GROUPS, BackendFallbackWarning,
                        BackendSelectionError, BackendSpec, OpDecision, Rejection, Resolution, SpecError,
                        backend_status, parse_spec, resolve_backends)

__all__ = [
    "ENV_ALLOW", "ENV_BACKEND", "ENV_BLOCK", "ENV_CONFIG", "ENV_NO_AUTOLOAD", "ENV_STRICT", "GROUP", "OP_GROUPS",
    "BackendFallbackWarning", "BackendInfo", "BackendSelectionError", "BackendSpec", "OpDecision", "PluginInfo",
    "Registry", "Rejection", "Resolution", "SpecError", "api_compatible", "backend_status", "discover",
    "hookimpl", "hookspec", "parse_spec", "resolve_backends",
]
