"""``mxmoe serve``: load a checkpoint, start the generation engine, serve the OpenAI API over HTTP."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

TINY_MODEL_NAME = "mxmoe-tiny-random"


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a checkpoint over an OpenAI-compatible HTTP API",
        description="Serve a gpt-oss checkpoint over HTTP with the OpenAI API: /v1/chat/completions and "
                    "/v1/responses (streaming, tool calls, reasoning effort; harmony parsed per request), "
                    "/v1/models, /health and /metrics (Prometheus). Concurrent requests share decode steps "
                    "through the generation engine. Without --model, a tiny random checkpoint is written to a "
                    "temporary folder and served (its text is gibberish). Needs the serve extra: "
                    "pip install 'mxmoe[serve]'. SIGINT/SIGTERM shut down cleanly: no new requests, "
                    "--shutdown-grace seconds for the ones in flight, then the rest are cut off.")
    p.add_argument("--model", metavar="DIR", help="checkpoint folder (original, Hugging Face MXFP4 or bf16); "
                                                  "default: a tiny random checkpoint")
    p.add_argument("--served-model-name", metavar="NAME", default=None,
                   help="the model id clients ask for (default: the checkpoint folder's name, or "
                        f"{TINY_MODEL_NAME!r} without --model)")
    p.add_argument("--backend", default=None,
                   help="engine: 'auto', a backend name or per-op overrides (see `mxmoe generate --help`)")
    p.add_argument("--strict", action="store_true", help="refuse any backend fallback")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--dtype", default=None, help="activation dtype: bfloat16 (default), float32, float16")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0 picks a free one)")
    p.add_argument("--api-key", default=os.environ.get("MXMOE_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                        "(default: $MXMOE_API_KEY; none: no key needed)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="KV-cache rows: requests generating at once (default: as many as memory allows, at most 64)")
    p.add_argument("--max-context", type=int, default=None,
                   help="tokens per request, prompt + completion (default: the model's context limit, as memory "
                        "allows)")
    p.add_argument("--max-step-tokens", type=int, default=None,
                   help="token budget of one engine step; long prompts are prefilled in chunks (default: 2048)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="requests that may wait for a row; past that, 429 (default: 4 x --max-batch)")
    p.add_argument("--max-body-bytes", type=int, default=None, help="largest request body (default: 8 MiB)")
    p.add_argument("--reasoning-effort", choices=["low", "medium", "high"], default="medium",
                   help="reasoning effort when a request names none (default: %(default)s)")
    p.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                   help="replay decode steps from CUDA graphs (see `mxmoe generate --help`)")
    p.add_argument("--shutdown-grace", type=float, default=10.0, metavar="SECONDS",
                   help="on SIGINT/SIGTERM, how long requests in flight may still run (default: %(default)s)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default: %(default)s)")
    p.set_defaults(func=_cli_serve)


def _model_name(model_dir: str) -> str:
    path = Path(model_dir).resolve()
    return path.parent.name if path.name == "original" else path.name


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _cli_serve(args: argparse.Namespace) -> int:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"mxmoe serve: {' and '.join(missing)} not installed; install the serve extra: "
              f"pip install 'mxmoe[serve]'", file=sys.stderr)
        return 2
    import tempfile

    from ..engine import Engine
    from ..model import load_model
    from .app import DEFAULT_MAX_BODY_BYTES, make_app, run

    for name in ("max_batch", "max_context", "max_step_tokens", "max_body_bytes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            print(f"mxmoe serve: --{name.replace('_', '-')} must be a positive integer, found {value}", file=sys.stderr)
            return 2
    if args.max_queue is not None and args.max_queue < 0:
        print(f"mxmoe serve: --max-queue must be >= 0, found {args.max_queue}", file=sys.stderr)
        return 2
    if not 0 <= args.port < 65536:
        print(f"mxmoe serve: --port must be 0..65535, found {args.port}", file=sys.stderr)
        return 2
    tmp = None
    model_dir = args.model
    name = args.served_model_name
    if model_dir is None:
        from ..checkpoint import write_random_checkpoint
        from ..config import preset

        tmp = tempfile.TemporaryDirectory(prefix="mxmoe-tiny-")
        model_dir = tmp.name
        print(f"[no --model: writing a tiny random checkpoint to {model_dir}]", file=sys.stderr)
        write_random_checkpoint(model_dir, preset("tiny"), "original", seed=0)
        name = name or TINY_MODEL_NAME
    try:
        model = load_model(model_dir, backend=args.backend, device=args.device, dtype=args.dtype, strict=args.strict)
        graphs = {"auto": None, "on": True, "off": False}[args.cuda_graphs]
        try:
            engine = Engine(model, max_batch=args.max_batch, max_context=args.max_context,
                            max_step_tokens=args.max_step_tokens, use_graphs=graphs)
        except ValueError as e:
            print(f"mxmoe serve: {e}", file=sys.stderr)
            return 2
        name = name or _model_name(model_dir)
        app = make_app(engine, model_name=name, api_key=args.api_key or None, max_queue=args.max_queue,
                       max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES,
                       default_effort=args.reasoning_effort)
        if not _is_loopback(args.host):
            print(f"[listening on {args.host}: reachable from other machines"
                  + ("" if args.api_key else ", and no --api-key is set") + "]", file=sys.stderr)
        print(f"[serving {name!r}: {engine.num_rows} rows of {engine.cache_len} tokens on {model.device}; "
              f"http://{args.host}:{args.port}/v1]", file=sys.stderr)
        return run(app, app.state.driver, host=args.host, port=args.port, shutdown_grace=args.shutdown_grace,
                   log_level=args.log_level)
    finally:
        if tmp is not None:
            tmp.cleanup()
