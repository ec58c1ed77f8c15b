"""``mxmoe`` command line: one sub-command per module, each adding itself through ``register_cli``.

Errors are handled here, once, for every sub-command. A user error (:data:`user_errors`: a bad checkpoint,
config, backend spec, device, dtype or argument value) prints one message, ``mxmoe COMMAND: …``, and exits
with status 2; ``--debug`` (or ``MXMOE_DEBUG=1``) prints its traceback too. Anything else is a bug and keeps
its traceback. Every sub-command's ``--device`` and ``--dtype`` are checked here before it runs (see
:data:`_CHECKS_OWN_DEVICE` for the exceptions), and mxmoe's warnings print as one line each.

Under torchrun (``torchrun --nproc-per-node N -m mxmoe.core.cli COMMAND ...``) rank 0 runs the command and the
other ranks follow it (core/launch.py); a collective that fails (another rank failed or stopped answering)
prints one message and exits with status 1.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import traceback
import warnings
from typing import Any

ENV_DEBUG = "MXMOE_DEBUG"

# Each module defines ``register_cli(subparsers)``, adding parsers whose ``func(args) -> int`` runs them.
_COMMAND_MODULES = [
    "mxmoe.core.generate",  # generate
    "mxmoe.core.checkpoint",  # checkpoint random / checkpoint inspect
    "mxmoe.plugins.cli",  # backends
    "mxmoe.conformance.cli",  # conformance
    "mxmoe.core.harmony.cli",  # harmony render / harmony parse / chat
    "mxmoe.core.serve",  # serve
    "mxmoe.core.bench",  # bench
]

# Sub-commands whose --device / --dtype are not checked here: `backends` probes a device that may be absent
# (saying why each engine is unavailable there is its job); `bench` checks its own (cpu and cuda only).
_CHECKS_OWN_DEVICE = frozenset({"backends", "bench"})


class UsageError(Exception):
    """A command-line value that cannot work, found before any work is done (message for the user; exit 2)."""


class ContextLimitError(UsageError):
    """A prompt that, with the tokens asked for, does not fit the model's context (the message has the numbers)."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception family the CLI reports as a user error: one message, exit status 2, no traceback.

    Only exceptions whose message is written for the user belong here; a plain ValueError or RuntimeError
    may be a bug and keeps its traceback."""
    from mxmoe.plugins.selection import BackendSelectionError, SpecError

    from .config import ConfigError
    from .parallel import ShardingError
    from .safetensors_io import CheckpointError
    from .tokenizer import VocabError

    return (UsageError, CheckpointError, ConfigError, SpecError, BackendSelectionError, VocabError, ShardingError)


# ---- checks shared by the sub-commands (raise UsageError) ---------------------------------------------

def check_device(name: str, flag: str = "--device"):
    """``name`` as a torch.device that exists here: a known device type, and for CUDA (or another
    accelerator torch can query) a device that is present."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as e:
        raise UsageError(f"{flag} {name!r}: not a torch device ({e}); expected e.g. cpu, cuda or cuda:1") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {name}: no CUDA device here (torch.cuda.is_available() is False; torch "
                             f"{torch.__version__}, built for CUDA {torch.version.cuda or 'none'}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {name}: there are only {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None)  # torch.mps, torch.xpu, ...: ask where torch can tell
        available = getattr(backend, "is_available", None)
        if callable(available) and not available():
            raise UsageError(f"{flag} {name}: no {device.type} device here (torch.{device.type}.is_available() "
                             "is False)")
    return device


def check_dtype(name: str, flag: str = "--dtype"):
    """``name`` as a torch dtype mxmoe knows (float64, float32, bfloat16, float16 and their short names)."""
    from .backend import parse_dtype

    try:
        return parse_dtype(name)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{flag} {name!r}: {e}") from None


def check_sampling(max_tokens: int | None = None, temperature: float | None = None,
                   top_p: float | None = None) -> None:
    """The sampling flags' ranges: --max-tokens >= 0, --temperature finite and >= 0, 0 < --top-p <= 1."""
    if max_tokens is not None and max_tokens < 0:
        raise UsageError(f"--max-tokens {max_tokens}: expected an integer >= 0")
    if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
        raise UsageError(f"--temperature {temperature}: expected a finite number >= 0 (0 is greedy decoding)")
    if top_p is not None and not 0 < top_p <= 1:
        raise UsageError(f"--top-p {top_p}: expected a number in (0, 1] (1 turns nucleus sampling off)")


def check_positive(**values: int | None) -> None:
    """Each given value (named by its flag, ``max_batch`` → ``--max-batch``) is None or a positive integer."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} {value}: expected a positive integer")


def config_context_limit(config: Any) -> int:
    """The positions a model of ``config`` serves (YaRN's extended context): what engines may lower."""
    return int(config.initial_context_length * config.rope_scaling_factor)


def check_context(prompt_lens: list[int], max_tokens: int, limit: int, where: str = "",
                  what: str = "the prompt") -> None:
    """Refuse prompts that, with ``max_tokens`` more tokens, pass the model's context limit
    (:class:`ContextLimitError`, saying by how much). ``where`` says where the limit comes from (e.g. the
    config's numbers); ``what`` names a single prompt in the message."""
    over = [(i, n) for i, n in enumerate(prompt_lens) if n + max_tokens > limit]
    if not over:
        return
    i, n = max(over, key=lambda x: x[1])
    which = f"prompt {i + 1} of {len(prompt_lens)}" if len(prompt_lens) > 1 else what
    more = f" ({len(over)} prompts are too long)" if len(over) > 1 else ""
    room = limit - n
    hint = (f"use --max-tokens {room} or less, or a shorter prompt" if room > 0
            else "the prompt alone leaves no room: shorten it")
    raise ContextLimitError(f"{which} has {n} tokens; with --max-tokens {max_tokens} that is {n + max_tokens} "
                            f"positions, more than the model's context of {limit} tokens{where}{more}; {hint}")


def context_limit_source(config: Any, limit: int) -> str:
    """Where ``limit`` comes from, for messages: the config's numbers, or an engine's claim when lower."""
    own = config_context_limit(config)
    text = f"initial_context_length {config.initial_context_length} × rope_scaling_factor {config.rope_scaling_factor}"
    return f" ({text})" if limit == own else f" (an engine in use claims at most {limit}; the model's is {own}: {text})"


# ---- the parser and main -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mxmoe",
        description="Run and certify OpenAI's gpt-oss mixture-of-experts models (MXFP4 experts) "
                    "on pluggable hardware engines.",
        epilog=f"Errors in what you asked for print one message and exit with status 2; --debug (or "
               f"{ENV_DEBUG}=1) shows their Python traceback too.")
    parser.add_argument("--debug", action="store_true", help=f"show Python tracebacks of errors (also {ENV_DEBUG}=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register_cli(sub)
    _add_shard_flag(sub)
    _add_debug_flag(sub)
    return parser


def _add_shard_flag(sub: argparse._SubParsersAction) -> None:
    """--shard-experts on every command that loads a model (those with --backend): how a torchrun launch
    splits the experts over the ranks (core/parallel.py)."""
    for p in set(sub.choices.values()):
        nested = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        for a in nested:
            _add_shard_flag(a)
        if not nested and "--backend" in p._option_string_actions and "--shard-experts" not in p._option_string_actions:
            p.add_argument("--shard-experts", choices=["intermediate", "expert"], default=None,
                           help="under torchrun: split the experts by their intermediate dimension (default: every "
                                "rank a slice of every expert, one all-reduce per layer; best for batch-1 latency) "
                                "or by expert (whole experts per rank, tokens exchanged by all-to-all; for "
                                "throughput); also $MXMOE_SHARD_EXPERTS. Ignored in a single process")


def _add_debug_flag(sub: argparse._SubParsersAction) -> None:
    """--debug after the sub-command too (``mxmoe generate ... --debug``), on every leaf parser."""
    for p in set(sub.choices.values()):
        nested = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        for a in nested:
            _add_debug_flag(a)
        if not nested and "--debug" not in p._option_string_actions:
            # SUPPRESS: an absent flag leaves the top-level value alone
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                           help=f"show Python tracebacks of errors (also {ENV_DEBUG}=1)")


def _command_name(args: argparse.Namespace) -> str:
    words = ["mxmoe", args.command]
    action = getattr(args, f"{args.command}_command", None)
    if isinstance(action, str):
        words.append(action)
    return " ".join(words)


def _check_common(args: argparse.Namespace) -> None:
    """--device and --dtype of any sub-command, before it runs (one dtype, or a comma-separated list)."""
    if args.command in _CHECKS_OWN_DEVICE:
        return
    device = getattr(args, "device", None)
    if isinstance(device, str):
        check_device(device)
    dtype = getattr(args, "dtype", None)
    if isinstance(dtype, str):
        for name in dtype.split(","):
            check_dtype(name.strip())


def _format_warning(prog: str):
    """warnings.formatwarning for the CLI: mxmoe's own warnings as one line (no file name, no source line).
    (formatwarning, not showwarning: code that records warnings, such as pytest's, still records them.)"""
    default = warnings.formatwarning

    def one_line(message, category, filename, lineno, line=None):
        if not category.__module__.startswith("mxmoe."):
            return default(message, category, filename, lineno, line)
        return f"{prog}: warning: {' '.join(str(message).splitlines())}\n"

    return one_line


def _user_message(e: BaseException) -> str:
    from mxmoe.plugins.selection import BackendSelectionError

    text = str(e)
    if isinstance(e, BackendSelectionError):  # the head; the trace is for `mxmoe backends --explain` / --debug
        text = text.split("\n\n", 1)[0]
        if "cannot choose a backend for every op" in text:
            text += "\n(`mxmoe backends --explain` with the same --backend, --device and --dtype, or --debug, shows " \
                    "why each engine was passed over)"
    return text


def main(argv: list[str] | None = None) -> int:
    from .launch import init_from_env
    from .parallel import ShardingError

    try:
        launch = init_from_env()  # None in a single process; under torchrun, this rank's place in the group
    except ShardingError as e:
        print(f"mxmoe: {e}", file=sys.stderr)
        return 2
    if launch is None:
        return _main(argv)
    if not launch.drives:  # ranks > 0 never see the command: they do what rank 0 tells them
        return launch.follow()
    code = 1
    try:
        code = _main(argv, launch)
    except SystemExit as e:  # argparse: --help, or a bad flag
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        raise
    except BaseException:  # a bug: its traceback, before finish() may end the process at once
        traceback.print_exc()
        sys.stderr.flush()
        raise
    finally:
        launch.finish(code)  # tell the other ranks to exit (or, after a failure, end at once)
    return code


def _main(argv: list[str] | None, launch=None) -> int:
    from .parallel import ParallelError

    args = build_parser().parse_args(argv)
    if launch is not None and getattr(args, "shard_experts", None):
        launch.shard_experts = args.shard_experts
    debug = bool(getattr(args, "debug", False)) or os.environ.get(ENV_DEBUG, "").strip().lower() in (
        "1", "true", "yes", "on")
    prog = _command_name(args)
    family = user_errors()
    previous = warnings.formatwarning
    warnings.formatwarning = _format_warning(prog)
    try:
        _check_common(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except ParallelError as e:  # another rank failed (it said why) or stopped answering: no traceback here
        if debug:
            traceback.print_exc()
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except family as e:
        if debug:
            traceback.print_exc()
        print(f"{prog}: {_user_message(e)}", file=sys.stderr)
        return 2
    except SystemExit as e:
        # A command that exits with a message (SystemExit("…")) is refusing its input: a usage error.
        if isinstance(e.code, str):
            if debug:
                traceback.print_exc()
            print(e.code, file=sys.stderr)
            return 2
        raise
    finally:
        warnings.formatwarning = previous


if __name__ == "__main__":
    # Through the package's module, not this __main__ copy: the commands raise mxmoe.core.cli.UsageError.
    from mxmoe.core.cli import main as _package_main

    sys.exit(_package_main())
