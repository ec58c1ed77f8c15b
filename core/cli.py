"""``mxmoe`` command line: one sub-command per module, each adding itself through ``register_cli``."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines ``register_cli(subparsers)``, adding parsers whose ``func(args) -> int`` runs them.
_COMMAND_MODULES = [
    "mxmoe.core.generate",  # generate
    "mxmoe.core.checkpoint",  # checkpoint random / checkpoint inspect
    "mxmoe.plugins.cli",  # backends
    "mxmoe.conformance.cli",  # conformance
    "mxmoe.core.harmony.cli",  # harmony render / harmony parse / chat
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mxmoe",
        description="Run and certify OpenAI's gpt-oss mixture-of-experts models (MXFP4 experts) "
                    "on pluggable hardware engines.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
