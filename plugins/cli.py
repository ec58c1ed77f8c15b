"""``mxmoe backends``: every discovered backend and plugin, and (``--explain``) the resolution trace."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

import torch

from mxmoe.core.backend import BACKEND_API_VERSION, OPS, parse_dtype

from .discovery import ENV_ALLOW, ENV_BLOCK, ENV_NO_AUTOLOAD, GROUP, discover
from .selection import (ENV_BACKEND, ENV_CONFIG, ENV_STRICT, OP_GROUPS, BackendFallbackWarning,
                        BackendSelectionError, SpecError,
                        backend_status, resolve_backends)


def _env_lines() -> str:
    rows = [(f"{ENV_BACKEND}=SPEC", "backend spec when --backend is not given"),
            (f"{ENV_CONFIG}=PATH", "config file"),
            (f"{ENV_STRICT}=1", "strict selection (refuse any fallback)"),
            (f"{ENV_ALLOW}=a,b", f"load only these plugins (entry-point group '{GROUP}'; entry-point or "
                                 "distribution names)"),
            (f"{ENV_BLOCK}=a,b", "never load these plugins (wins over the allow-list)"),
            (f"{ENV_NO_AUTOLOAD}=1", f"load no plugin entry point except those in {ENV_ALLOW} "
                                     "(the built-in engines are always there)")]
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join(f"  {k:<{width}}{v}" for k, v in rows)


_EPILOG = f"""\
backend spec (--backend, ${ENV_BACKEND}, or [backend] in the config file, in that order):
  auto                       best available backend per op, by declared priority (the default)
  NAME                       one backend for every op, e.g. torch
  OP=NAME,...                per-op overrides, e.g. attention=compile,moe=torch
  NAME,OP=NAME,...           a default, then overrides, e.g. torch,attention=compile
  ops: {", ".join(OPS)};
  groups: {", ".join(f"{g} = {'+'.join(ops)}" for g, ops in OP_GROUPS.items())}

config file (--config, ${ENV_CONFIG}, or ./mxmoe.toml), TOML:
  [backend]
  default = "auto"
  strict = false
  [backend.ops]
  attention = "compile"

environment:
{_env_lines()}
"""


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "backends", help="list the discovered backends (engines) and explain which serves each op",
        description="List every backend that the plugins register, with version, backend-API range, "
                    "availability on the device (and why not), priority and capabilities; with --explain, "
                    "the resolution trace of the current selection.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--explain", action="store_true", help="show which backend serves each op, and why not the others")
    p.add_argument("--backend", metavar="SPEC", default=None, help="backend spec to explain (see below)")
    p.add_argument("--device", default="cpu", help="device to probe and select for (default: cpu)")
    p.add_argument("--dtype", default="bfloat16", help="activation dtype (default: bfloat16)")
    p.add_argument("--strict", action="store_true", help="refuse any fallback")
    p.add_argument("--config", metavar="PATH", default=None, help="TOML config file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        torch.device(args.device)
    except (RuntimeError, ValueError, TypeError) as e:
        print(f"error: --device {args.device!r}: {e}", file=sys.stderr)
        return 2
    try:
        parse_dtype(args.dtype)
    except (ValueError, TypeError, KeyError) as e:
        print(f"error: --dtype {args.dtype!r}: {e}", file=sys.stderr)
        return 2
    registry = discover()
    rows = backend_status(registry, device=args.device, dtype=args.dtype)
    payload: dict[str, Any] = {
        "backend_api_version": BACKEND_API_VERSION,
        "device": args.device,
        "dtype": args.dtype,
        "backends": rows,
        "plugins": [p.model_dump(mode="json") for p in registry.plugins],
    }
    rc, error, resolution = 0, None, None
    if args.explain:
        try:
            with warnings.catch_warnings():  # the trace below states every fallback
                warnings.simplefilter("ignore", BackendFallbackWarning)
                resolution = resolve_backends(args.backend, device=args.device, dtype=args.dtype,
                                              strict=args.strict, config_file=args.config)
            payload["resolution"] = resolution.to_dict()
        except BackendSelectionError as e:
            rc, error = 2, str(e)
            payload["resolution"] = e.resolution.to_dict()
            payload["error"] = str(e).split("\n\n")[0]
        except SpecError as e:
            rc, error = 2, str(e)
            payload["error"] = error
    if args.json:
        json.dump(payload, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return rc

    out = [f"backend API {BACKEND_API_VERSION}; probed for device {args.device}, dtype {args.dtype}", ""]
    for r in rows:
        state = "available" if r["available"] else "UNAVAILABLE"
        out.append(f"{r['name']} {r['version']}  [{state}]  priority {r['priority']}  "
                   f"API {r['api_version']}{'' if r['api_compatible'] else ' (INCOMPATIBLE)'}")
        src = r["distribution"] or "?"
        out.append(f"    plugin {r['plugin']} ({src} {r['dist_version'] or ''}".rstrip() + f"), {r['cls']}")
        if r["reason"]:
            out.append(f"    {'reason' if not r['available'] else 'probe'}: {r['reason']}")
        if r["capabilities"]:
            out.append(f"    {_caps(r['capabilities'])}")
    others = [p for p in registry.plugins if p.status != "loaded" or p.reason]
    if others:
        out += ["", "plugins not loaded, or with problems:"]
        for p in others:
            out.append(f"  {p.name} ({p.distribution or '?'} {p.dist_version or ''}".rstrip()
                       + f"): {p.status}: {p.reason}")
    notes = [p for p in registry.plugins if p.note]
    if notes:
        out += ["", "plugin notes:"]
        out += [f"  {p.name} ({p.distribution or '?'}): {p.note}" for p in notes]
    if resolution is not None:
        out += ["", resolution.explain()]
    print("\n".join(out))
    if error:
        print(f"\nerror: {error}", file=sys.stderr)
    return rc


def _caps(c: dict[str, Any]) -> str:
    def opt(v: Any) -> str:
        return "any" if v is None else str(v)

    return (f"ops {','.join(c['ops']) or 'none'}; devices {','.join(c['devices']) or 'none'}; "
            f"dtypes {','.join(c['dtypes'])}; head dims {opt(c['head_dims'] and ','.join(map(str, c['head_dims'])))}; "
            f"sinks {c['attention_sinks']}; window {c['sliding_window']}; mxfp4 {c['mxfp4']}; "
            f"max experts {opt(c['max_experts'])}, top-k {opt(c['max_experts_per_token'])}, "
            f"context {opt(c['max_context'])}; cuda graphs {c['cuda_graphs']}; determinism {c['determinism']}")
